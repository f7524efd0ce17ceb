"""Score any model's :class:`Predictions` against a projected dataset, the same way for all.

Per image and structure: ``tp``, ``fp``, ``fn``, Dice, IoU, HD95 (pixels), box IoU
(normalised coordinates, prediction box vs the reference mask's tight box), box
accuracy at IoU 0.5 and 0.75, and whether the output was valid. Per structure: the
mean of each metric with a 95% percentile-bootstrap interval over images (seeded),
``n`` (scored images) and the invalid-output rate.

Policies (documented choices):

* An invalid output (``valid`` False) scores as an empty mask and a missing box
  (Dice 0 and box IoU 0 when the structure is present), as big_vision's evaluator does.
* Structures absent from the reference image are not scored unless
  ``include_absent=True``; then an empty prediction scores Dice/IoU 1 and any
  predicted pixel scores 0 (box metrics stay NaN for absent structures).
* Structures cut by the CT's field of view (``truncated``) are excluded by default.
* HD95 is computed for ``hd95_structures`` only (default: all); pass a short list
  (or ``[]``) when time matters: it is by far the slowest metric.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..codec.tokens import masks_to_boxes
from .metrics import box_iou, bootstrap_table, dice_from_counts, hd95, iou_from_counts
from .predictions import Predictions, PredictionsError

METRICS = ("dice", "iou", "hd95", "box_iou", "box_acc@0.5", "box_acc@0.75")


def evaluate_predictions(
    pred: Predictions,
    dataset,
    split: str = "test",
    structures: Sequence[str] | None = None,
    exclude_truncated: bool = True,
    n_boot: int = 1000,
    seed: int = 0,
    include_absent: bool = False,
    hd95_structures: Sequence[str] | None = None,
    spacing_mm: float | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score ``pred`` on ``split`` of ``dataset`` (a ``ProjectedDataset``).

    structures: names to score (default: those in both ``pred`` and the dataset).
    hd95_structures: names to compute HD95 for (default None = all scored; ``[]`` = none).
    spacing_mm: pixel spacing for HD95 in mm (default: pixels).
    Returns ``(per_image, summary)``:

    * per_image: one row per (image, structure) scored, columns ``image_id, view,
      structure, tp, fp, fn, dice, iou, hd95, box_iou, box_acc@0.5, box_acc@0.75,
      valid, absent``;
    * summary: one row per structure, ``n``, ``invalid_rate``, and for each metric
      ``<metric>`` (mean), ``<metric>_lo``, ``<metric>_hi`` (95% bootstrap CI).
    """
    targets = dataset.split_indices(split)
    ids = dataset.index["image_id"].to_numpy().astype(str)
    row_of = {k: i for i, k in enumerate(pred.image_ids.tolist())}
    missing = [ids[i] for i in targets if ids[i] not in row_of]
    if missing:
        raise PredictionsError(f"predictions lack {len(missing)} image(s) of split {split!r}: {missing[:5]}")
    if structures is None:
        have = set(pred.structures.tolist())
        names = [s for s in dataset.structures if s in have]
    else:
        names = list(structures)
        unknown = [s for s in names if s not in set(pred.structures.tolist())]
        if unknown:
            raise PredictionsError(f"predictions lack structures {unknown}")
    size = int(dataset.image_size)
    if pred.image_size != (size, size):
        raise PredictionsError(f"prediction masks are {pred.image_size}, dataset images are {(size, size)}")
    pch = np.array([pred.channel(s) for s in names], dtype=np.int64)
    dch = np.array([dataset.structures.index(s) for s in names], dtype=np.int64)
    hd_set = set(names) if hd95_structures is None else set(hd95_structures)
    hd_cols = np.array([s in hd_set for s in names])
    views = dataset.index["view"].to_numpy()

    frames = []
    for i in targets:
        r = row_of[ids[i]]
        ref = dataset.masks_for([i], names)[0]  # [S, H, W]
        valid = pred.valid[r, pch]
        pm = pred.masks[r, pch] & valid[:, None, None]
        tp = np.count_nonzero(pm & ref, axis=(1, 2))
        fp = np.count_nonzero(pm & ~ref, axis=(1, 2))
        fn = np.count_nonzero(~pm & ref, axis=(1, 2))
        absent = dataset.absent[i, dch]
        truncated = dataset.truncated[i, dch]
        keep = np.ones(len(names), bool)
        if not include_absent:
            keep &= ~absent
        if exclude_truncated:
            keep &= ~truncated
        d = dice_from_counts(tp, fp, fn, empty_value=1.0)
        j = iou_from_counts(tp, fp, fn, empty_value=1.0)
        gt_box = masks_to_boxes(ref)
        pb = np.where(valid[:, None], pred.boxes[r, pch].astype(np.float64), np.nan)
        biou = np.where(absent, np.nan, box_iou(pb, gt_box))
        hd = np.full(len(names), np.nan)
        sel = np.flatnonzero(keep & hd_cols & ~absent)
        if sel.size:
            hd[sel] = hd95(pm[sel], ref[sel], spacing=spacing_mm)
        frame = pd.DataFrame({
            "image_id": ids[i], "view": views[i], "structure": names,
            "tp": tp, "fp": fp, "fn": fn, "dice": d, "iou": j, "hd95": hd, "box_iou": biou,
            "box_acc@0.5": np.where(absent, np.nan, biou >= 0.5),
            "box_acc@0.75": np.where(absent, np.nan, biou >= 0.75),
            "valid": valid, "absent": absent,
        })
        frames.append(frame[keep])
    per_image = (pd.concat(frames, ignore_index=True) if frames else
                 pd.DataFrame(columns=["image_id", "view", "structure", "tp", "fp", "fn", *METRICS,
                                       "valid", "absent"]))
    return per_image, summarize(per_image, names, n_boot=n_boot, seed=seed)


def summarize(per_image: pd.DataFrame, structures: Sequence[str] | None = None, n_boot: int = 1000,
              seed: int = 0) -> pd.DataFrame:
    """Per-structure means and 95% bootstrap CIs (over images) of a ``per_image`` table."""
    names = list(structures) if structures is not None else list(dict.fromkeys(per_image["structure"]))
    rows = []
    groups = dict(tuple(per_image.groupby("structure", sort=False))) if len(per_image) else {}
    for k, name in enumerate(names):
        g = groups.get(name)
        row: dict = {"structure": name, "n": 0 if g is None else len(g)}
        if g is None or len(g) == 0:
            row["invalid_rate"] = np.nan
            for m in METRICS:
                row[m] = row[f"{m}_lo"] = row[f"{m}_hi"] = np.nan
        else:
            vals = g[list(METRICS)].to_numpy(dtype=np.float64)
            mean, lo, hi = bootstrap_table(vals, n_boot=n_boot, seed=seed + k)
            for c, m in enumerate(METRICS):
                row[m], row[f"{m}_lo"], row[f"{m}_hi"] = mean[c], lo[c], hi[c]
            row["invalid_rate"] = float(1.0 - g["valid"].astype(float).mean())
            row["tp"], row["fp"], row["fn"] = int(g["tp"].sum()), int(g["fp"].sum()), int(g["fn"].sum())
        rows.append(row)
    return pd.DataFrame(rows).set_index("structure")


def plot_summary(summaries: dict[str, pd.DataFrame], metric: str = "dice", structures: Sequence[str] | None = None,
                 ax=None, title: str | None = None):
    """Per-structure bar chart with 95% CIs comparing models.

    summaries: ``{model name: summary DataFrame}`` (from :func:`evaluate_predictions`).
    Returns the matplotlib Axes.
    """
    import matplotlib.pyplot as plt

    if metric not in METRICS and metric != "invalid_rate":
        raise ValueError(f"metric must be one of {METRICS + ('invalid_rate',)}; got {metric!r}")
    models = list(summaries)
    if structures is None:
        seen: dict = {}
        for s in summaries.values():
            for name in s.index:
                seen.setdefault(name, None)
        structures = list(seen)
    structures = list(structures)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(structures) * max(1, len(models)) + 2), 4))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(structures))
    for k, model in enumerate(models):
        s = summaries[model].reindex(structures)
        mean = s[metric].to_numpy(dtype=float)
        if f"{metric}_lo" in s:
            lo = s[f"{metric}_lo"].to_numpy(dtype=float)
            hi = s[f"{metric}_hi"].to_numpy(dtype=float)
            err = np.vstack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])
            err = np.nan_to_num(err)
        else:
            err = None
        ax.bar(x + (k - (len(models) - 1) / 2) * width, np.nan_to_num(mean), width, yerr=err,
               capsize=2, label=model)
    ax.set_xticks(x)
    ax.set_xticklabels(structures, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(metric + (" (mean, 95% CI)" if metric != "invalid_rate" else ""))
    if metric in ("dice", "iou", "box_iou", "box_acc@0.5", "box_acc@0.75", "invalid_rate"):
        ax.set_ylim(0, 1.05)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax
