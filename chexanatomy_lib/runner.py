"""Execute notebooks with papermill: checked parameters, reuse, provenance.

A stage runs in four steps:

1. its parameters are the notebook's defaults, updated by the profile and then by
   explicit overrides, each checked against the notebook's parameters cell
   (unknown key or wrong type: :class:`ParameterError`, before any kernel starts);
2. its *key* hashes the notebook source, the parameters, the library code the
   stage depends on, the files its parameters name, and the upstream stages' runs;
3. a stage whose folder holds a successful run with the same key is reused;
   otherwise the folder is cleared (kept when the last attempt with the same key
   did not finish, so training can resume from its checkpoints) and papermill
   executes the notebook into it;
4. ``params.json`` and ``provenance.json`` are written beside the artifacts.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from . import provenance as prov
from .pipeline import PROJECT_ROOT, STAGES, Stage, get_stage, stage_for_notebook, upstream_closure

PROFILE_DIR = PROJECT_ROOT / "notebooks" / "profiles"
REQUIRED_PARAMETERS = ("run_dir", "seed")
#: Bumped when the key's recipe changes, so old runs are not mistaken for new ones.
KEY_VERSION = 1


class ParameterError(ValueError):
    """A parameter override that the notebook does not accept."""


class ProfileError(ValueError):
    """A profile file that cannot be used."""


class StageFailedError(RuntimeError):
    """A notebook raised while executing; the message names the cell and the error."""


class StageInterruptedError(RuntimeError):
    """A chapter stopped by the user (Ctrl-C); running it again resumes it from its last saved state."""


# --------------------------------------------------------------------------- parameters


def parameters_cell(notebook: str | Path) -> tuple[dict[str, Any], set[str]]:
    """The defaults of a Jupytext notebook's ``parameters`` cell and its optional names.

    The cell must be flat assignments of literals (numbers, strings, booleans,
    None, lists, dicts). Returns ``({name: default}, optional)``: the defaults in
    the cell's order, and the names whose annotation admits None (``x: int | None
    = 1`` or ``Optional[int]``).
    """
    import jupytext

    path = Path(notebook)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such notebook")
    nb = jupytext.read(path)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ParameterError(f"{path}: needs exactly one cell tagged 'parameters', found {len(cells)}")
    try:
        tree = ast.parse(cells[0].source)
    except SyntaxError as e:
        raise ParameterError(f"{path}: parameters cell is not valid Python: {e}") from None
    params: dict[str, Any] = {}
    optional: set[str] = set()
    for node in tree.body:
        if not isinstance(node, (ast.Assign, ast.AnnAssign)):
            raise ParameterError(f"{path}: parameters cell line {node.lineno}: only assignments are allowed")
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        if len(targets) != 1 or not isinstance(targets[0], ast.Name) or node.value is None:
            raise ParameterError(f"{path}: parameters cell line {node.lineno}: assign one name at a time")
        if isinstance(node, ast.AnnAssign):
            annotation = ast.unparse(node.annotation)
            if "None" in annotation or annotation.startswith("Optional"):
                optional.add(targets[0].id)
        try:
            params[targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise ParameterError(
                f"{path}: parameter {targets[0].id!r} (line {node.lineno}) must be a literal value"
            ) from None
    missing = [k for k in REQUIRED_PARAMETERS if k not in params]
    if missing:
        raise ParameterError(f"{path}: parameters cell lacks required parameter(s) {missing}")
    return params, optional


def read_parameters(notebook: str | Path) -> dict[str, Any]:
    """The defaults of a notebook's ``parameters`` cell, in its order (see :func:`parameters_cell`)."""
    return parameters_cell(notebook)[0]


def optional_parameters(notebook: str | Path) -> set[str]:
    """Names whose annotation admits None (``x: int | None = 1`` or ``Optional[int]``)."""
    return parameters_cell(notebook)[1]


def _type_name(v: Any) -> str:
    return "None" if v is None else type(v).__name__


def coerce_parameter(name: str, value: Any, default: Any, where: str) -> Any:
    """``value`` converted to the type of ``default``, or :class:`ParameterError`.

    Rules: a None default accepts anything; a float default accepts ints (made
    float); an int default accepts ints only (not bools); other types must match;
    a string that spells a number is accepted for numeric defaults (YAML reads
    ``1e-4`` as a string).
    """
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return int(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return float(value)
    elif isinstance(value, type(default)):
        return value
    raise ParameterError(
        f"{where}: parameter {name!r} expects {_type_name(default)} (default {default!r}), "
        f"got {_type_name(value)} {value!r}"
    )


def validate_parameters(
    defaults: dict[str, Any], overrides: dict[str, Any], where: str, optional: set[str] = frozenset()
) -> dict[str, Any]:
    """Defaults updated by ``overrides``, each checked (see :func:`coerce_parameter`).

    Names in ``optional`` also accept None (their annotation says ``| None``).
    """
    merged = dict(defaults)
    for k, v in overrides.items():
        if v is None and k in optional:
            merged[k] = None
            continue
        if k not in defaults:
            close = difflib.get_close_matches(k, list(defaults), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ParameterError(f"{where}: unknown parameter {k!r}{hint} (known: {', '.join(defaults)})")
        merged[k] = coerce_parameter(k, v, defaults[k], where)
    return merged


def parse_assignments(items: list[str] | None) -> dict[str, Any]:
    """``["steps=100", "model=tiny"]`` -> ``{"steps": 100, "model": "tiny"}`` (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"-p {item!r}: expected key=value")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


# --------------------------------------------------------------------------- profiles


@dataclass
class Profile:
    """Parameters for every stage of one kind of run (``smoke``, ``paper``, ...)."""

    name: str  # profile name
    path: Path | None  # the YAML it came from
    run_dir: Path  # default run directory (absolute)
    description: str = ""  # one line shown in the book
    common: dict[str, Any] = field(default_factory=dict)  # applied to every stage that declares the key
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-stage overrides

    def overrides_for(self, stage: Stage, defaults: dict[str, Any]) -> dict[str, Any]:
        """The profile's overrides for ``stage``: matching common keys, then the stage's own."""
        out = {k: v for k, v in self.common.items() if k in defaults}
        out.update(self.stages.get(stage.name, {}))
        return out


def load_profile(name_or_path: str | Path) -> Profile:
    """A profile by name (``notebooks/profiles/<name>.yaml``) or by path."""
    p = Path(name_or_path)
    if p.suffix not in {".yaml", ".yml"}:
        p = PROFILE_DIR / f"{name_or_path}.yaml"
    if not p.exists():
        known = sorted(f.stem for f in PROFILE_DIR.glob("*.yaml"))
        raise ProfileError(f"{p}: no such profile (known: {', '.join(known)})")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ProfileError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ProfileError(f"{p}: expected a mapping at the top level")
    unknown = set(raw) - {"name", "description", "run_dir", "common", "stages"}
    if unknown:
        raise ProfileError(f"{p}: unknown keys {sorted(unknown)}")
    stages = raw.get("stages") or {}
    for s, params in stages.items():
        if s not in STAGES:
            raise ProfileError(f"{p}: unknown stage {s!r} (stages: {', '.join(STAGES)})")
        if not isinstance(params or {}, dict):
            raise ProfileError(f"{p}: stage {s!r} must map parameter names to values")
    run_dir = Path(raw.get("run_dir") or f"runs/{p.stem}")
    return Profile(
        name=raw.get("name", p.stem),
        path=p.resolve(),
        run_dir=run_dir if run_dir.is_absolute() else PROJECT_ROOT / run_dir,
        description=raw.get("description", ""),
        common=raw.get("common") or {},
        stages={k: (v or {}) for k, v in stages.items()},
    )


def stage_parameters(stage: Stage, profile: Profile, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Checked parameters of ``stage`` under ``profile`` plus ``overrides`` (``run_dir`` not yet set)."""
    defaults, opt = parameters_cell(stage.notebook)
    where = str(stage.notebook.relative_to(PROJECT_ROOT) if stage.notebook.is_relative_to(PROJECT_ROOT) else stage.notebook)
    params = validate_parameters(defaults, profile.overrides_for(stage, defaults), f"{where} (profile {profile.name})", opt)
    return validate_parameters(params, overrides or {}, where, opt)


# --------------------------------------------------------------------------- running


@dataclass
class StageResult:
    """What :func:`run_stage` did for one stage."""

    stage: str  # stage name
    directory: Path  # the stage folder
    reused: bool  # True when an earlier run with the same key was kept
    provenance: dict[str, Any]  # the stage's provenance record

    @property
    def wall_time_s(self) -> float:
        return float(self.provenance.get("wall_time_s", float("nan")))


def _input_files(params: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of every existing file a string parameter names (relative to the project root)."""
    out: dict[str, str] = {}
    for k, v in params.items():
        if k == "run_dir" or not isinstance(v, str) or not v or len(v) > 500:
            continue
        p = Path(v) if Path(v).is_absolute() else PROJECT_ROOT / v
        with contextlib.suppress(OSError):
            if p.is_file():
                out[v] = prov.sha256_file(p)
    return out


def _read_files(patterns: tuple[str, ...], run_dir: str | None) -> dict[str, str]:
    """SHA-256 of every file matching a stage's ``reads`` patterns (see :class:`~chexanatomy_lib.pipeline.Stage`)."""
    out: dict[str, str] = {}
    for pattern in patterns:
        if "{run_dir}" in pattern:
            if not run_dir:
                continue
            rd = Path(run_dir) if Path(run_dir).is_absolute() else PROJECT_ROOT / run_dir
            root, pattern = rd, pattern.replace("{run_dir}/", "")
        else:
            root = PROJECT_ROOT
        for f in sorted(root.glob(pattern)):
            if f.is_file():
                out[str(f.relative_to(root))] = prov.sha256_file(f)
    return out


def stage_key(stage: Stage, params: dict[str, Any], upstream: dict[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The reuse key of a stage run and the inputs it was computed from."""
    import hashlib

    lib_root = PROJECT_ROOT / "chexanatomy_lib"
    inputs = {
        "key_version": KEY_VERSION,
        "notebook_sha256": prov.sha256_file(stage.notebook),
        "library": list(stage.library),
        "library_sha256": prov.sha256_tree([lib_root / part for part in stage.library], PROJECT_ROOT),
        "params": {k: v for k, v in params.items() if k != "run_dir"},
        "files": _input_files(params),
        # An upstream stage that ran again (even with equal parameters) counts as a new input.
        "upstream": {u: {"key": p.get("key"), "finished": p.get("finished")} for u, p in upstream.items()},
    }
    if stage.reads:
        inputs["reads"] = _read_files(stage.reads, params.get("run_dir"))
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest(), inputs


def read_provenance(directory: Path) -> dict[str, Any] | None:
    """A stage folder's ``provenance.json``, or None."""
    p = directory / "provenance.json"
    try:
        return json.loads(p.read_text()) if p.exists() else None
    except json.JSONDecodeError:
        return None


class _UnknownParameterFilter:
    """Drops papermill's "Passed unknown parameter" warnings (see `_kernel_environment`)."""

    def filter(self, record) -> bool:
        return not str(record.getMessage()).startswith("Passed unknown parameter")


def _kernel_manager_logging_to(path: Path):
    """A kernel manager class whose kernels write their own stderr (ZMQ warnings, the
    shutdown noise of an interrupted kernel) to ``path`` instead of the terminal; cell
    outputs are not affected (they travel over ZMQ)."""
    from jupyter_client.manager import AsyncKernelManager

    class LoggedKernelManager(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            with open(path, "ab") as log:  # the child keeps its own copy of the descriptor
                kw["stderr"] = log
                return await super()._async_launch_kernel(kernel_cmd, **kw)

    return LoggedKernelManager


@contextlib.contextmanager
def _kernel_environment() -> Iterator[None]:
    # NOTE: MPLBACKEND=Agg in the kernel's environment silently drops figures from
    # executed notebooks; the kernel must use matplotlib's inline backend.
    import logging

    # papermill re-parses the parameters cell for its own warnings and cannot read
    # annotated or commented assignments; the runner has already checked every
    # parameter (read_parameters, validate_parameters), so its warnings are noise.
    logging.getLogger("papermill.translators").setLevel(logging.ERROR)
    pm_logger = logging.getLogger("papermill")
    if not any(isinstance(f, _UnknownParameterFilter) for f in pm_logger.filters):
        pm_logger.addFilter(_UnknownParameterFilter())
    saved = {k: os.environ.get(k) for k in ("MPLBACKEND", "PYTHONWARNINGS", "TQDM_MININTERVAL")}
    os.environ.pop("MPLBACKEND", None)
    # Without ipywidgets, tqdm.auto falls back to a text bar inside a kernel and
    # warns about it in every executed notebook; the text bar is what we want.
    os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [saved["PYTHONWARNINGS"], "ignore:IProgress not found"]))
    # Few refreshes keep progress bars readable in the executed notebooks.
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _artifacts(directory: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for f in sorted(directory.rglob("*")):
        if f.is_file() and f.name not in {"provenance.json"} and not f.name.startswith("."):
            out[str(f.relative_to(directory))] = {"bytes": f.stat().st_size}
    return out


def execute_stage(
    stage: Stage,
    params: dict[str, Any],
    run_dir: Path,
    upstream: dict[str, dict[str, Any]],
    *,
    force: bool = False,
    profile: str | None = None,
    kernel_name: str = "python3",
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> StageResult:
    """Run one stage's notebook into ``run_dir/<stage>/`` unless an equal run is there."""
    import nbformat
    import papermill as pm

    run_dir = Path(run_dir).resolve()
    directory = run_dir / stage.name
    params = {**params, "run_dir": str(run_dir)}
    key, inputs = stage_key(stage, params, upstream)
    old = read_provenance(directory)
    executed = directory / f"{stage.name}.ipynb"
    if not force and old and old.get("key") == key and old.get("status") == "ok" and executed.exists():
        log(f"[{stage.name}] reused (unchanged parameters and inputs; {old.get('wall_time_s', 0):.0f} s when it ran)")
        return StageResult(stage.name, directory, True, old)

    resume = not force and old is not None and old.get("key") == key and \
        old.get("status") in {"running", "failed", "interrupted"}
    if directory.is_symlink() and not resume:
        raise StageFailedError(
            f"{directory} links to {directory.resolve()}, whose run of {stage.name} was made with other inputs; a "
            f"linked stage folder is read, never replaced: run the chapter where it lives, or remove the link")
    if directory.exists() and not resume:
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    log(f"[{stage.name}] {'resuming' if resume else 'executing'} {stage.notebook.name} -> {directory}")

    record: dict[str, Any] = {
        "stage": stage.name,
        "notebook": str(stage.notebook.relative_to(PROJECT_ROOT) if stage.notebook.is_relative_to(PROJECT_ROOT) else stage.notebook),
        "profile": profile,
        "key": key,
        "status": "running",
        "inputs": inputs,
        "params": params,
        "versions": prov.package_versions(),
        "device": prov.device_info(),
        "git": prov.git_revision(),
        "command": prov.command_line(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (directory / "params.json").write_text(json.dumps(params, indent=2, sort_keys=True))
    (directory / "provenance.json").write_text(json.dumps(record, indent=2, default=str))

    import jupytext

    source = directory / f".{stage.name}.input.ipynb"
    nb = jupytext.read(stage.notebook)
    # A Jupytext file may carry no kernel header; papermill needs one.
    nb.metadata["kernelspec"] = {"name": kernel_name, "language": "python", "display_name": "Python 3"}
    nb.metadata.setdefault("language_info", {"name": "python"})
    nbformat.write(nb, source)
    t0 = time.perf_counter()
    error: BaseException | None = None
    try:
        with _kernel_environment():
            pm.execute_notebook(
                str(source),
                str(executed),
                parameters=params,
                kernel_name=kernel_name,
                cwd=str(PROJECT_ROOT),
                progress_bar=progress,
                log_output=False,
                kernel_manager_class=_kernel_manager_logging_to(directory / ".kernel_stderr.log"),
            )
    except pm.PapermillExecutionError as e:
        error = e
    except BaseException as e:  # KeyboardInterrupt included: record it, then re-raise
        error = e
    finally:
        source.unlink(missing_ok=True)
    record["wall_time_s"] = round(time.perf_counter() - t0, 2)
    record["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if error is not None:
        interrupted = isinstance(error, KeyboardInterrupt) or (
            isinstance(error, pm.PapermillExecutionError) and error.ename == "KeyboardInterrupt")
        record["status"] = "interrupted" if interrupted else "failed"
        record["error"] = f"{type(error).__name__}: {error}"[:2000]
        (directory / "provenance.json").write_text(json.dumps(record, indent=2, default=str))
        if interrupted:
            import logging

            # the client's event loop is left with the dead kernel's pending tasks; their
            # "exception was never retrieved" reports are expected here, not news
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            raise StageInterruptedError(
                f"chapter {stage.name} was interrupted; run the same command again to resume it from its last "
                f"saved step (its folder: {directory})") from None
        if isinstance(error, pm.PapermillExecutionError):
            raise StageFailedError(
                f"stage {stage.name} failed in cell {error.exec_count} with {error.ename}: {error.evalue}\n"
                f"  the executed notebook with the full traceback: {executed}"
            ) from None
        raise error
    record["status"] = "ok"
    record["artifacts"] = _artifacts(directory)
    (directory / "provenance.json").write_text(json.dumps(record, indent=2, default=str))
    log(f"[{stage.name}] done in {record['wall_time_s']:.0f} s")
    return StageResult(stage.name, directory, False, record)


def run_stage(
    notebook_or_stage: str | Path,
    profile: str | Path | Profile = "smoke",
    *,
    run_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
    force_upstream: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[StageResult]:
    """Run a stage after the stages it reads (each reused when unchanged).

    ``overrides`` apply to the named stage only; upstream stages run with the
    profile's parameters. All parameters are checked before anything executes.
    Returns one :class:`StageResult` per stage, in execution order.
    """
    prof = profile if isinstance(profile, Profile) else load_profile(profile)
    target = stage_for_notebook(notebook_or_stage) if str(notebook_or_stage).endswith(".py") else get_stage(str(notebook_or_stage))
    order = upstream_closure(target)
    rd = Path(run_dir).resolve() if run_dir else prof.run_dir
    # Check every stage's parameters first: a typo must not cost an hour of upstream work.
    plan = [(s, stage_parameters(s, prof, overrides if s is target else None)) for s in order]
    results: list[StageResult] = []
    done: dict[str, dict[str, Any]] = {}
    for s, params in plan:
        up = {u: done[u] for u in s.upstream}
        r = execute_stage(
            s,
            params,
            rd,
            up,
            force=force if s is target else force_upstream,
            profile=prof.name,
            progress=progress,
            log=log,
        )
        done[s.name] = r.provenance
        results.append(r)
    return results


def run_all(
    profile: str | Path | Profile = "smoke",
    *,
    run_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[StageResult]:
    """Every stage of the book, in order (the introduction last: it reports the others' timings)."""
    results = run_stage(
        "00_introduction", profile, run_dir=run_dir, force=force, force_upstream=force, progress=progress, log=log
    )
    return results
