"""The book's stages: which notebook each is, what it reads, where it writes.

A run directory holds one folder per stage (``<run_dir>/<stage>/``) with the
executed notebook, its parameters, a provenance record and the stage's
artifacts. Notebooks find their own folder and their inputs through
:func:`stage_dir`; the runner (:mod:`chexanatomy_lib.runner`) decides whether a
stage must be executed or can be reused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"


class UnknownStageError(KeyError):
    """A stage name that is not in :data:`STAGES`."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class Stage:
    """One chapter of the book.

    ``library`` lists the parts of ``chexanatomy_lib`` (sub-packages or modules,
    relative to the package) whose source counts as an input of the stage: a
    change there makes the stage run again, a change elsewhere does not.
    """

    name: str  # e.g. "01_ct_projection"; also the notebook's file stem
    title: str  # chapter title shown in the book
    upstream: tuple[str, ...]  # stages whose artifacts this stage reads
    library: tuple[str, ...]  # library parts that are inputs of this stage
    budget_s: float | None  # smoke-profile time budget on 2 CPU cores (s)
    notebook_path: Path | None = None  # defaults to notebooks/<name>.py
    # files read besides upstream stages: glob patterns relative to the project root
    # (``{run_dir}`` is the run directory); their content counts as an input
    reads: tuple[str, ...] = ()

    @property
    def notebook(self) -> Path:
        return self.notebook_path or NOTEBOOK_DIR / f"{self.name}.py"


_CHAPTERS = ("01_ct_projection", "02_token_codec", "03_vlm_finetune", "04_unet_baseline", "05_shift",
             "06_real_radiographs", "07_few_shot", "08_ablations", "09_claims")

#: Stages in execution order (every stage after its upstream stages).
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("01_ct_projection", "CT projection", (), ("ct", "evaluation", "real", "devices.py", "records.py"), 180),
        Stage("02_token_codec", "Token codec", ("01_ct_projection",),
              ("ct", "codec", "evaluation", "training.py", "checkpoints.py", "devices.py", "records.py"), 120),
        Stage(
            "03_vlm_finetune",
            "VLM fine-tuning",
            ("01_ct_projection", "02_token_codec"),
            ("ct", "codec", "evaluation", "vlm", "training.py", "checkpoints.py", "augment.py", "devices.py",
             "radiograph.py", "records.py"),
            360,
        ),
        Stage(
            "04_unet_baseline",
            "U-Net baseline",
            ("01_ct_projection", "02_token_codec", "03_vlm_finetune"),
            ("ct", "codec", "evaluation", "unet", "training.py", "checkpoints.py", "augment.py", "devices.py"),
            180,
        ),
        Stage("05_shift", "Robustness under shift", ("01_ct_projection", "03_vlm_finetune", "04_unet_baseline"),
              ("ct", "codec", "evaluation", "vlm", "unet", "augment.py", "checkpoints.py", "devices.py", "radiograph.py"),
              180),
        Stage("06_real_radiographs", "Real radiographs", ("01_ct_projection", "03_vlm_finetune", "04_unet_baseline"),
              ("ct", "codec", "evaluation", "real", "vlm", "unet", "augment.py", "checkpoints.py", "devices.py",
               "radiograph.py"), 90),
        Stage("07_few_shot", "Few-shot adaptation",
              ("01_ct_projection", "02_token_codec", "03_vlm_finetune", "04_unet_baseline"),
              ("ct", "codec", "evaluation", "fewshot", "vlm", "unet", "training.py", "checkpoints.py", "augment.py",
               "devices.py", "radiograph.py"), 300),
        # Chapter 8 reads the recorded sweeps and those in the run directory (make sweeps runs them).
        Stage("08_ablations", "Ablations", (), ("evaluation", "records.py"), 45,
              reads=("records/sweeps/*/*", "{run_dir}/sweeps/*/sweep.json")),
        Stage("09_claims", "The claims, measured",
              ("04_unet_baseline", "05_shift", "06_real_radiographs", "07_few_shot", "08_ablations"),
              ("evaluation", "records.py"), 45, reads=("records/*/record.json",)),
        # The introduction reports every chapter's measured time, so it runs last.
        Stage("00_introduction", "Introduction", _CHAPTERS, ("pipeline.py", "records.py"), None),
    )
}

#: Order of chapters in the book (the introduction first).
BOOK_ORDER: tuple[str, ...] = ("00_introduction", *_CHAPTERS)

#: Time budget of the whole smoke book on 2 CPU cores and of its HTML build (s).
SMOKE_BOOK_BUDGET_S = 30 * 60
HTML_BUILD_BUDGET_S = 60


def get_stage(name: str) -> Stage:
    """Stage by name (``"03_vlm_finetune"``) or by notebook path."""
    key = Path(name).stem if name.endswith(".py") or "/" in name else name
    if key not in STAGES:
        raise UnknownStageError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return STAGES[key]


def stage_for_notebook(notebook: str | Path) -> Stage:
    """The registered stage of a notebook, or an ad-hoc stage with no upstream.

    Ad-hoc stages let the runner execute any Jupytext notebook with a parameters
    cell (a user's own analysis, a test notebook) with the same checks and
    provenance as the book's chapters.
    """
    path = Path(notebook)
    if path.suffix != ".py":
        return get_stage(str(notebook))
    if path.stem in STAGES and (not path.exists() or path.resolve() == STAGES[path.stem].notebook.resolve()):
        return STAGES[path.stem]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such notebook (book stages: {', '.join(STAGES)})")
    return Stage(path.stem, path.stem, (), (), None, path.resolve())


def upstream_closure(stage: Stage | str) -> list[Stage]:
    """The stages ``stage`` reads, directly or not, in execution order, then ``stage`` itself.

    ``stage``: a :class:`Stage` (also an ad-hoc one from :func:`stage_for_notebook`)
    or a stage name.
    """
    target = get_stage(stage) if isinstance(stage, str) else stage
    needed: set[str] = set()

    def visit(s: Stage) -> None:
        for u in s.upstream:
            if u not in needed:
                needed.add(u)
                visit(get_stage(u))

    visit(target)
    return [STAGES[n] for n in STAGES if n in needed] + [target]


def stage_dir(run_dir: str | Path, stage: str, create: bool = True) -> Path:
    """The folder of ``stage`` inside ``run_dir`` (created unless ``create=False``)."""
    d = Path(run_dir) / stage
    if create:
        d.mkdir(parents=True, exist_ok=True)
    return d


def write_metrics(run_dir: str | Path, stage: str, metrics: dict[str, float]) -> Path:
    """Write a stage's headline metrics (flat ``name -> number``) to ``metrics.json``.

    Sweeps gather these files into one table; the introduction and the tests read
    them too. Values must be finite numbers or None.
    """
    clean: dict[str, float | None] = {}
    for k, v in metrics.items():
        if v is None:
            clean[k] = None
            continue
        fv = float(v)
        clean[k] = fv if math.isfinite(fv) else None
    path = stage_dir(run_dir, stage) / "metrics.json"
    path.write_text(json.dumps(clean, indent=2, sort_keys=True))
    return path


def read_metrics(run_dir: str | Path, stage: str) -> dict[str, float | None]:
    """Metrics written by :func:`write_metrics`; empty when the stage wrote none."""
    path = Path(run_dir) / stage / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else {}


def stage_timings(run_dir: str | Path, stages: tuple[str, ...] = _CHAPTERS):
    """One row per stage from its provenance record: wall time, budget, status, device, revision.

    Returns a pandas DataFrame (stages never run are listed with status "missing").
    """
    import pandas as pd

    rows = []
    for name in stages:
        st = STAGES[name]
        p = Path(run_dir) / name / "provenance.json"
        rec = json.loads(p.read_text()) if p.exists() else {}
        dev = rec.get("device", {})
        rows.append(
            {
                "chapter": f"{name[:2]} {st.title}",
                "status": rec.get("status", "missing"),
                "wall time (s)": rec.get("wall_time_s"),
                "smoke budget (s)": st.budget_s,
                "device": dev.get("cuda_device") or (f"{dev.get('cpu_count')} x {dev.get('cpu')}" if dev else None),
                "revision": ((rec.get("git") or {}).get("revision") or "")[:10] or None,
                "finished": rec.get("finished"),
            }
        )
    return pd.DataFrame(rows)
