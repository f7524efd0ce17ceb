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

:func:`score_masks` scores any masks against references the same way (the codec's
round trips in chapter 2), and :func:`summarize` is the one summary of every score
table: per group, the mean and 95% bootstrap interval of each metric.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..codec.geometry import masks_to_boxes
from .metrics import (
    box_iou, bootstrap_ci, bootstrap_table, confusion_counts, dice_from_counts, difference_verdict, hd95, invalid_rate,
    iou_from_counts,
)
from .predictions import Predictions, PredictionsError

METRICS = ("dice", "iou", "hd95", "box_iou", "box_acc@0.5", "box_acc@0.75")
#: Columns of a per-image score table (:func:`score_images`, :func:`evaluate_predictions`).
SCORE_COLUMNS = ("image_id", "view", "structure", "tp", "fp", "fn", *METRICS, "valid", "absent")


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
        keep = np.ones(len(names), bool)
        if not include_absent:
            keep &= ~dataset.absent[i, dch]
        if exclude_truncated:
            keep &= ~dataset.truncated[i, dch]
        frames.append(score_images(pred.masks[r, pch][None], pred.boxes[r, pch][None], pred.valid[r, pch][None],
                                   dataset.masks_for([i], names), names, [ids[i]], [views[i]], keep[None],
                                   dataset.absent[i, dch][None], hd_cols, spacing_mm))
    per_image = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SCORE_COLUMNS))
    return per_image, summarize(per_image, "structure", METRICS, n_boot=n_boot, seed=seed, groups=names)


def score_images(masks: np.ndarray, boxes: np.ndarray, valid: np.ndarray, ref: np.ndarray, structures: Sequence[str],
                 image_ids: Sequence[str], views: Sequence[str], keep: np.ndarray, absent: np.ndarray,
                 hd95_columns: np.ndarray | None = None, spacing_mm: float | None = None) -> pd.DataFrame:
    """Per (image, structure) scores of predicted masks and boxes against reference masks.

    masks: bool [N, S, H, W] predicted; boxes: float [N, S, 4] normalised ``(ymin, xmin,
    ymax, xmax)``, NaN when none; valid: bool [N, S] (an invalid output scores as an
    empty mask and no box); ref: bool [N, S, H, W]; ``structures`` [S], ``image_ids`` and
    ``views`` [N] name them; keep: bool [N, S], the pairs to score; absent: bool [N, S],
    the reference is empty (Dice and IoU 1 for an empty prediction, else 0; box metrics
    NaN); hd95_columns: bool [S], structures to compute HD95 for (None: all), in pixels
    unless ``spacing_mm``. Returns one row per kept pair, columns :data:`SCORE_COLUMNS`. The scoring of
    :func:`evaluate_predictions` and of the shift sets (:mod:`~chexanatomy_lib.evaluation.shift`).
    """
    names = list(structures)
    hd_cols = np.ones(len(names), bool) if hd95_columns is None else np.asarray(hd95_columns, bool)
    frames = []
    for k in range(len(image_ids)):
        ok = np.asarray(valid[k], bool)
        pm = np.asarray(masks[k], bool) & ok[:, None, None]
        rm = np.asarray(ref[k], bool)
        gone = np.asarray(absent[k], bool)
        tp = np.count_nonzero(pm & rm, axis=(1, 2))
        fp = np.count_nonzero(pm & ~rm, axis=(1, 2))
        fn = np.count_nonzero(~pm & rm, axis=(1, 2))
        pb = np.where(ok[:, None], np.asarray(boxes[k], np.float64), np.nan)
        biou = np.where(gone, np.nan, box_iou(pb, masks_to_boxes(rm)))
        hd = np.full(len(names), np.nan)
        sel = np.flatnonzero(np.asarray(keep[k], bool) & hd_cols & ~gone)
        if sel.size:
            hd[sel] = hd95(pm[sel], rm[sel], spacing=spacing_mm)
        frame = pd.DataFrame({
            "image_id": image_ids[k], "view": views[k], "structure": names,
            "tp": tp, "fp": fp, "fn": fn, "dice": dice_from_counts(tp, fp, fn, empty_value=1.0),
            "iou": iou_from_counts(tp, fp, fn, empty_value=1.0), "hd95": hd, "box_iou": biou,
            "box_acc@0.5": np.where(gone, np.nan, biou >= 0.5), "box_acc@0.75": np.where(gone, np.nan, biou >= 0.75),
            "valid": ok, "absent": gone,
        })
        frames.append(frame[np.asarray(keep[k], bool)])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SCORE_COLUMNS))


def score_masks(pred: np.ndarray, ref: np.ndarray, table: pd.DataFrame | None = None) -> pd.DataFrame:
    """Score masks against references: bool [M, H, W] each -> one row per mask.

    ``table`` (M rows: what each mask is, e.g. ``structure``) gets the columns ``tp``,
    ``fp``, ``fn``, ``dice`` and ``iou`` (NaN where both masks are empty).
    """
    tp, fp, fn = confusion_counts(pred, ref)
    out = (table.copy() if table is not None else pd.DataFrame(index=range(len(tp)))).reset_index(drop=True)
    out["tp"], out["fp"], out["fn"] = tp, fp, fn
    out["dice"] = dice_from_counts(tp, fp, fn)
    out["iou"] = iou_from_counts(tp, fp, fn)
    return out


def score_routes(routes: dict[str, np.ndarray], ref: np.ndarray, table: pd.DataFrame) -> pd.DataFrame:
    """:func:`score_masks` of several predictions of the same masks: ``{route: bool [M, H, W]}``
    against ref bool [M, H, W] -> one row per (mask, route), ``route`` column added."""
    return pd.concat([score_masks(masks, ref, table.assign(route=route)) for route, masks in routes.items()],
                     ignore_index=True)


def summarize(scores: pd.DataFrame, by: str | Sequence[str] = "structure", metrics: Sequence[str] = METRICS,
              n_boot: int = 1000, seed: int = 0, groups: Sequence | None = None) -> pd.DataFrame:
    """Per group of ``by``: ``n`` (rows), and per metric the mean, ``<metric>_lo`` and ``<metric>_hi``
    (95% percentile bootstrap over rows, all metrics resampled together; NaN entries are not scored).

    groups: the group keys to report, in order (default: the order of first appearance);
    a group without rows gets ``n = 0`` and NaN. The bootstrap of the k-th group is seeded
    with ``seed + k``. Where ``scores`` has a ``valid`` column the summary has
    ``invalid_rate``; where it has ``tp``, ``fp``, ``fn`` their sums. Returns a DataFrame
    indexed by ``by``.
    """
    keys = [by] if isinstance(by, str) else list(by)
    metrics = list(metrics)
    found = dict(tuple(scores.groupby(keys if len(keys) > 1 else keys[0], sort=False))) if len(scores) else {}
    order = list(groups) if groups is not None else list(found)
    rows = []
    for k, key in enumerate(order):
        g = found.get(key)
        row: dict = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["n"] = 0 if g is None else len(g)
        if "valid" in scores.columns:
            row["invalid_rate"] = np.nan
        if g is None or len(g) == 0:
            for m in metrics:
                row[m] = row[f"{m}_lo"] = row[f"{m}_hi"] = np.nan
        else:
            mean, lo, hi = bootstrap_table(g[metrics].to_numpy(dtype=np.float64), n_boot=n_boot, seed=seed + k)
            for c, m in enumerate(metrics):
                row[m], row[f"{m}_lo"], row[f"{m}_hi"] = mean[c], lo[c], hi[c]
            if "valid" in g.columns:
                row["invalid_rate"] = invalid_rate(g["valid"].to_numpy(dtype=bool))
            for c in ("tp", "fp", "fn"):
                if c in g.columns:
                    row[c] = int(g[c].sum())
        rows.append(row)
    columns = [*keys, "n", *(c for m in metrics for c in (m, f"{m}_lo", f"{m}_hi")),
               *(["invalid_rate"] if "valid" in scores.columns else []),
               *(c for c in ("tp", "fp", "fn") if c in scores.columns)]
    table = pd.DataFrame(rows, columns=columns)
    return table.set_index(keys[0] if len(keys) == 1 else keys)


def paired_difference(a: pd.DataFrame, b: pd.DataFrame, structures: Sequence[str], metric: str = "dice",
                      n_boot: int = 1000, seed: int = 0,
                      together: dict[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """Model A minus model B on the same images: the paired form of a comparison.

    a, b: per-image tables of :func:`evaluate_predictions` (``image_id``, ``structure``,
    ``metric``); only (image, structure) pairs scored in both count. One row per
    structure, and one per entry of ``together`` (``{row name: structures}``, e.g.
    ``{"lung fields": ["lung_field_left", "lung_field_right"]}``: the per-image mean over
    those structures): ``n`` images, the mean difference and its 95% percentile bootstrap
    interval over images (the k-th row seeded ``seed + k``), ``a`` and ``b``, the two
    means on those images, and the ``verdict`` read from the interval: ``"A better"``
    (above zero), ``"A worse"`` (below zero), ``"not distinguishable"`` (contains zero)
    or ``"n/a"`` (no image scored by both). Returns a DataFrame indexed by row name.
    """
    key = ["image_id", "structure"]
    wanted = list(dict.fromkeys([*structures, *(s for ss in (together or {}).values() for s in ss)]))
    both = a.set_index(key)[[metric]].merge(b.set_index(key)[[metric]], how="inner", left_index=True,
                                            right_index=True, suffixes=("_a", "_b"))
    both = both.dropna().reset_index()
    both = both[both["structure"].isin(wanted)]
    both["diff"] = both[f"{metric}_a"] - both[f"{metric}_b"]
    cols = [f"{metric}_a", f"{metric}_b", "diff"]
    groups = [(s, both[both["structure"] == s]) for s in structures]
    for name, members in (together or {}).items():
        part = both[both["structure"].isin(list(members))]
        groups.append((name, part.groupby("image_id", sort=False)[cols].mean()))
    rows = []
    for k, (name, g) in enumerate(groups):
        est, lo, hi = bootstrap_ci(g["diff"].to_numpy(), n_boot=n_boot, seed=seed + k)
        verdict = difference_verdict(lo, hi) if len(g) else "n/a"
        rows.append({"structure": name, "n": len(g), "a": g[f"{metric}_a"].mean() if len(g) else np.nan,
                     "b": g[f"{metric}_b"].mean() if len(g) else np.nan, "difference": est,
                     "difference_lo": lo, "difference_hi": hi, "verdict": verdict})
    return pd.DataFrame(rows).set_index("structure")
