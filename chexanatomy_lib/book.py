"""Render the book from executed notebooks (Jupyter Book 1.x, execution off).

Execution and rendering are separate: :func:`chexanatomy_lib.runner.run_all`
executes every chapter into a run directory; :func:`build_book` copies the
executed notebooks beside the prose of ``book/`` into a source folder and asks
Jupyter Book to render it with warnings as errors.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .pipeline import BOOK_ORDER, PROJECT_ROOT
from .runner import Profile, StageResult, load_profile, run_all

#: Files and folders of the repository that make up the book's source.
BOOK_SOURCES = ("_config.yml", "_toc.yml", "book")
CHAPTER_DIR = "_chapters"


class BookBuildError(RuntimeError):
    """Jupyter Book failed; the message holds the end of its log."""


@dataclass
class BookResult:
    """A built book."""

    run_dir: Path  # where the executed notebooks are
    html_dir: Path | None  # the rendered HTML (index.html inside), None if not built
    stages: list[StageResult]  # what ran or was reused
    build_time_s: float | None  # seconds the HTML build took


def assemble_source(run_dir: Path, dest: Path) -> Path:
    """Copy the book's prose, config and the executed chapters of ``run_dir`` into ``dest``."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in BOOK_SOURCES:
        src = PROJECT_ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    chapters = dest / CHAPTER_DIR
    chapters.mkdir()
    for stage in BOOK_ORDER:
        nb = run_dir / stage / f"{stage}.ipynb"
        if not nb.exists():
            raise FileNotFoundError(f"{nb}: chapter {stage} has not been executed in {run_dir}")
        (chapters / nb.name).write_text(json.dumps(reader_notebook(json.loads(nb.read_text())), indent=1))
    return dest


#: Parameters that say where a run was made, not how: never shown to a reader.
MACHINE_PARAMETERS = ("run_dir",)


def _literals(source: str) -> dict[str, object]:
    """``name = literal`` assignments of a cell (others skipped)."""
    out: dict[str, object] = {}
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return out
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else \
            node.target if isinstance(node, ast.AnnAssign) else None
        if isinstance(target, ast.Name) and node.value is not None:
            try:
                out[target.id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return out


def reader_notebook(nb: dict) -> dict:
    """An executed notebook as the book shows it: the parameters once.

    papermill adds a cell (tagged ``injected-parameters``) with every parameter it set,
    the run directory's absolute path included. The book drops that cell and ends the
    chapter's own parameters cell with the values this run changed (run directory
    excluded), so a reader sees each parameter once and no path of the machine that
    built the book. Returns a new notebook dict (nbformat JSON).
    """
    nb = json.loads(json.dumps(nb))
    cells = nb.get("cells", [])

    def tags(c):
        return c.get("metadata", {}).get("tags", [])

    injected = [c for c in cells if "injected-parameters" in tags(c)]
    params = [c for c in cells if "parameters" in tags(c)]
    if injected and params:
        source = "".join(params[0]["source"]) if isinstance(params[0]["source"], list) else params[0]["source"]
        defaults = _literals(source)
        given = _literals("".join(injected[0]["source"]) if isinstance(injected[0]["source"], list)
                          else injected[0]["source"])
        changed = {k: v for k, v in given.items()
                   if k not in MACHINE_PARAMETERS and (k not in defaults or defaults[k] != v)}
        if changed:
            lines = [f"#   {k} = {v!r}" for k, v in changed.items()]
            source = source.rstrip("\n") + "\n\n# set by this run's profile:\n" + "\n".join(lines)
        params[0]["source"] = source
    nb["cells"] = [c for c in cells if "injected-parameters" not in tags(c)]
    return nb


def build_html(source: Path, output: Path, log: Callable[[str], None] = print) -> Path:
    """``jupyter-book build`` of ``source`` into ``output/_build/html``, warnings as errors."""
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe) if exe.exists() else "jupyter-book", "build", str(source), "--path-output", str(output), "-W", "-n", "--keep-going", "--quiet"]
    log("[book] " + " ".join(cmd[1:]))
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + "\n" + r.stderr).strip().splitlines()[-40:])
        raise BookBuildError(f"jupyter-book build failed (exit {r.returncode}):\n{tail}")
    html = output / "_build" / "html"
    if not (html / "index.html").exists():
        raise BookBuildError(f"jupyter-book reported success but {html / 'index.html'} is missing")
    return html


def build_book(
    profile: str | Path | Profile = "smoke",
    *,
    run_dir: str | Path | None = None,
    output: str | Path | None = None,
    force: bool = False,
    html: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> BookResult:
    """Execute every chapter with ``profile`` (reusing unchanged ones), then render the HTML book.

    The HTML lands in ``<output>/_build/html`` (``output`` defaults to the project
    root, so ``_build/html/index.html``).
    """
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    results = run_all(prof, run_dir=run_dir, force=force, progress=progress, log=log)
    rd = results[-1].directory.parent
    if not html:
        return BookResult(rd, None, results, None)
    out = Path(output).resolve() if output else PROJECT_ROOT
    source = assemble_source(rd, rd / "_book_source")
    t0 = time.perf_counter()
    html_dir = build_html(source, out, log)
    dt = time.perf_counter() - t0
    log(f"[book] HTML in {dt:.0f} s: {html_dir / 'index.html'}")
    return BookResult(rd, html_dir, results, dt)
