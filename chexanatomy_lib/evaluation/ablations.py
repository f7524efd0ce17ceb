"""Ablation sweeps read back: the score against the swept value, and the effect of the sweep.

A sweep (:mod:`chexanatomy_lib.sweep`) over chapter 3 gathers every cell's per-image
scores into ``per_image.csv``: one row per (cell, seed, method, test image, structure)
with the swept value(s), ``seed``, ``method`` (``vlm`` or ``baseline``), ``image_id``,
``structure`` and the metrics of :func:`~chexanatomy_lib.evaluation.evaluate.score_images`.
Every cell is scored on the same held-out images, so two cells are compared image by
image.

Two sources of variation are resampled together, as for the k-shot curves: the seed
(weight initialisation, data order, augmentation) and the test image
(:func:`~chexanatomy_lib.evaluation.metrics.two_level_bootstrap`). A difference between
two cells resamples the test images once for both (they are paired) and each cell's
seeds on their own (they are not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .metrics import difference_verdict, two_level_bootstrap

#: Structure groups scored as one (the per-image mean over their members).
GROUPS = {"lung fields": ("lung_field_left", "lung_field_right")}


class SweepReadError(ValueError):
    """A sweep folder that cannot be read back."""


@dataclass
class SweepTables:
    """One finished sweep, recorded or in a run directory.

    name: the sweep's record name (``ablation_model_scale``, ``ablation_model_scale.paper``).
    source: where its numbers come from, for labels (``"recorded 2026-11-29, 04d8f53, <cpu>"``
        or ``"this run"``).
    varied: the swept parameter(s); values: each one's values in the sweep file's order.
    per_image: the gathered per-image scores (see the module docstring).
    meta: ``sweep.json`` (plan, device, revision, command, wall time).
    """

    name: str
    source: str
    folder: Path
    varied: list[str]
    values: list[Any]
    per_image: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The swept parameter the curves are drawn against (the first varied one)."""
        return self.varied[0]

    @property
    def profile(self) -> str:
        return str(self.meta.get("profile", ""))


def _shown(v: Any) -> Any:
    return "-".join(map(str, v)) if isinstance(v, (list, tuple)) else v


def read_sweep(folder: str | Path, source: str | None = None) -> SweepTables:
    """Read a finished sweep folder (``<run_dir>/sweeps/<name>/`` or ``records/sweeps/<name>/``).

    ``source``: the label of its numbers; None: ``"recorded <date>, <revision>, <device>"``
    when the folder is a record, the folder otherwise. Raises :class:`SweepReadError`
    naming the folder when ``sweep.json`` or ``per_image.csv`` is missing or unreadable.
    """
    d = Path(folder)
    meta_path, table_path = d / "sweep.json", d / "per_image.csv"
    for p in (meta_path, table_path):
        if not p.is_file():
            raise SweepReadError(f"{d}: no {p.name}; the sweep did not finish or gathered no per-image table")
    try:
        meta = json.loads(meta_path.read_text())
        per_image = pd.read_csv(table_path)
    except (json.JSONDecodeError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise SweepReadError(f"{d}: unreadable sweep files: {e}") from None
    varied = list(meta.get("varied") or [])
    missing = [c for c in (*varied, "seed", "method", "image_id", "structure") if c not in per_image.columns]
    if not varied or missing:
        raise SweepReadError(f"{table_path}: lacks columns {missing or ['(no varied parameter)']}")
    values = list(dict.fromkeys(_shown(c[varied[0]]) for c in meta.get("cells", []) if varied[0] in c))
    if source is None:
        device = meta.get("device") or {}
        where = device.get("cuda_device") or device.get("cpu") or "unknown device"
        source = (f"recorded {str(meta.get('date', ''))[:10]}, {str(meta.get('revision') or 'no revision')[:7]}, "
                  f"{where}")
    return SweepTables(str(meta.get("name", d.name)), source, d, varied, values, per_image, meta)


def _scores(sweep: SweepTables, structure: str, metric: str, method: str) -> pd.DataFrame:
    """Per (value, seed, image): ``metric`` of one structure or group, for one method."""
    t = sweep.per_image[sweep.per_image["method"] == method]
    members = GROUPS.get(structure, (structure,))
    t = t[t["structure"].isin(members)]
    return t.groupby([sweep.key, "seed", "image_id"], sort=False)[metric].mean().reset_index()


def _matrix(t: pd.DataFrame, key: str, value: Any, metric: str, images: Sequence[str]) -> np.ndarray:
    g = t[t[key] == value]
    return g.pivot_table(index="seed", columns="image_id", values=metric, aggfunc="mean").reindex(
        columns=list(images)).to_numpy(dtype=np.float64)


def ablation_curve(sweep: SweepTables, structures: Sequence[str], metric: str = "dice", n_boot: int = 1000,
                   seed: int = 0) -> pd.DataFrame:
    """Per swept value and structure (or group of :data:`GROUPS`): the VLM's mean ``metric``
    over seeds and test images with its 95% two-level bootstrap interval, and the mean-mask
    baseline's mean on the same images. Returns a DataFrame with columns ``structure``,
    ``value``, ``position`` (the value's place in the sweep, 0, 1, …), ``metric``,
    ``<metric>_lo``, ``<metric>_hi``, ``baseline``, ``seeds``, ``images``, ``source``."""
    rows = []
    for j, s in enumerate(structures):
        t = _scores(sweep, s, metric, "vlm")
        base = _scores(sweep, s, metric, "baseline")
        images = sorted(t["image_id"].unique())
        for pos, v in enumerate(sweep.values):
            v = _as_in_table(sweep, v)
            mat = _matrix(t, sweep.key, v, metric, images)
            if mat.size == 0:
                continue
            m, lo, hi, _ = two_level_bootstrap(mat, n_boot, seed + 97 * j + pos)
            b = base[base[sweep.key] == v][metric].mean()
            rows.append({"structure": s, "value": v, "position": pos, metric: m, f"{metric}_lo": lo,
                         f"{metric}_hi": hi, "baseline": b, "seeds": mat.shape[0], "images": mat.shape[1],
                         "source": sweep.source})
    return pd.DataFrame(rows, columns=["structure", "value", "position", metric, f"{metric}_lo", f"{metric}_hi",
                                       "baseline", "seeds", "images", "source"])


def ablation_difference(sweep: SweepTables, a: Any, b: Any, structure: str, metric: str = "dice",
                        n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The VLM's mean ``metric`` at swept value ``a`` minus at ``b``, on the images both
    scored, with its 95% bootstrap interval: each resample draws test images once for both
    cells and each cell's seeds on its own. Returns ``{"a", "b", "structure", "mean_a",
    "mean_b", "difference", "difference_lo", "difference_hi", "verdict", "seeds_a",
    "seeds_b", "images"}``; the verdict as :func:`~chexanatomy_lib.evaluation.metrics.difference_verdict`."""
    t = _scores(sweep, structure, metric, "vlm")
    images = sorted(set(t.loc[t[sweep.key] == a, "image_id"]) & set(t.loc[t[sweep.key] == b, "image_id"]))
    ma, mb = (_matrix(t, sweep.key, v, metric, images) for v in (a, b))
    out = {"a": a, "b": b, "structure": structure, "seeds_a": ma.shape[0], "seeds_b": mb.shape[0],
           "images": len(images)}
    if not images or not ma.size or not mb.size:
        return {**out, "mean_a": np.nan, "mean_b": np.nan, "difference": np.nan, "difference_lo": np.nan,
                "difference_hi": np.nan, "verdict": difference_verdict(np.nan, np.nan)}
    rng = np.random.default_rng(seed)
    n = len(images)
    boots = np.empty(int(n_boot))
    for i in range(int(n_boot)):
        im = rng.integers(0, n, n)
        sa = rng.integers(0, ma.shape[0], ma.shape[0])
        sb = rng.integers(0, mb.shape[0], mb.shape[0])
        boots[i] = np.nanmean(ma[np.ix_(sa, im)]) - np.nanmean(mb[np.ix_(sb, im)])
    lo, hi = np.nanquantile(boots, [0.025, 0.975])
    mean_a, mean_b = float(np.nanmean(ma)), float(np.nanmean(mb))
    return {**out, "mean_a": mean_a, "mean_b": mean_b, "difference": mean_a - mean_b, "difference_lo": float(lo),
            "difference_hi": float(hi), "verdict": difference_verdict(float(lo), float(hi))}


#: Each ablation's contrast: the claim it measures and which two swept values it compares
#: (``"last"`` / ``"first"``: the sweep's last and first value; or a literal value).
CONTRASTS = {
    "ablation_model_scale": ("C4", "last", "first"),
    "ablation_resolution": ("C5", "last", "first"),
    "ablation_vision_finetuning": ("C6", True, False),
}


def sweep_effects(sweeps: Sequence[SweepTables], structures: Sequence[str], metric: str = "dice",
                  n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Every sweep's contrast (:data:`CONTRASTS`) per structure: one row per (sweep, source,
    structure) with ``claim``, ``sweep``, ``source``, ``profile``, ``contrast`` (``"base −
    tiny"``) and the columns of :func:`ablation_difference`. Sweeps without a contrast are
    left out."""
    rows = []
    for k, sw in enumerate(sweeps):
        family = sw.name.split(".")[0]
        if family not in CONTRASTS:
            continue
        claim, a, b = CONTRASTS[family]
        pick = {"last": sw.values[-1] if sw.values else None, "first": sw.values[0] if sw.values else None}
        va, vb = pick.get(a, a) if isinstance(a, str) else a, pick.get(b, b) if isinstance(b, str) else b
        va, vb = _as_in_table(sw, va), _as_in_table(sw, vb)
        for j, s in enumerate(structures):
            d = ablation_difference(sw, va, vb, s, metric, n_boot, seed + 31 * k + j)
            rows.append({"claim": claim, "sweep": sw.name, "source": sw.source, "profile": sw.profile,
                         "contrast": f"{sw.key}: {va} − {vb}", **d})
    return pd.DataFrame(rows)


def _as_in_table(sw: SweepTables, v: Any) -> Any:
    """A contrast value as the per-image table spells it (booleans and numbers read back from CSV)."""
    col = sw.per_image[sw.key]
    for x in col.unique():
        if str(x) == str(v):
            return x
    return v


def find_sweeps(names: Sequence[str], records_dir: str | Path, run_dir: str | Path) -> list[SweepTables]:
    """Every finished sweep of the families ``names``: the recorded ones
    (``records_dir/sweeps/<name>[.<variant>]/``) and those in the run directory
    (``run_dir/sweeps/<name>/``, labelled ``"this run's sweep"``). A run-directory sweep
    that is the same run as a record (same date and revision: it was recorded from
    there) is shown once, as the record. Order: by family, records first."""
    found: list[SweepTables] = []
    for name in names:
        recorded = [read_sweep(p.parent) for p in sorted(Path(records_dir).glob(f"sweeps/{name}*/sweep.json"))
                    if p.parent.name == name or p.parent.name.startswith(f"{name}.")]
        found += recorded
        local = Path(run_dir) / "sweeps" / name
        if (local / "sweep.json").is_file():
            sw = read_sweep(local, source="this run's sweep")
            same = any(r.meta.get("date") == sw.meta.get("date") and r.meta.get("revision") == sw.meta.get("revision")
                       for r in recorded)
            if not same:
                found.append(sw)
    return found
