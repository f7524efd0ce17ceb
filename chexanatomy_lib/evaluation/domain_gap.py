"""How projected masks differ from real annotations: shape and position statistics,
computed the same way for any set of masks on a square grid.

Per mask (bool [H, W], H = W): the *area fraction* of the image it covers, its
bounding box's *height / width*, its *vertical centroid* (mean row / H, 0 = top) and
its *box fill* (area over bounding-box area: how much of its box a shape covers).
Per set: the *mean-mask Dice*, how well the set's own average predicts its members
(the mean mask of a seeded half, thresholded at 0.5, scored by Dice on the other
half): high when the structure sits and looks alike in every image, low when position
and shape vary. Chapter 1 calibrates its cohort on these against real lung fields.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

STATISTICS = ("area_fraction", "box_aspect", "centroid_y", "box_fill")


def shape_statistics(masks: np.ndarray) -> pd.DataFrame:
    """One row per mask of bool [N, H, W]: ``area_fraction``, ``box_aspect`` (height / width
    of the bounding box), ``centroid_y`` (mean row / H) and ``box_fill`` (pixels over
    bounding-box pixels); NaN for an empty mask."""
    m = np.asarray(masks, dtype=bool)
    n, h, w = m.shape
    area = m.reshape(n, -1).mean(1)
    rows, cols = m.any(2), m.any(1)
    present = rows.any(1)
    r = np.arange(h)
    c = np.arange(w)
    height = np.where(present, np.where(rows, r, -1).max(1) - np.where(rows, r, h).min(1) + 1, 0)
    width = np.where(present, np.where(cols, c, -1).max(1) - np.where(cols, c, w).min(1) + 1, 0)
    counts = m.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        centroid = (m.sum(2) * r).sum(1) / counts / h
        aspect = height / width
        fill = counts / (height * width)
    out = pd.DataFrame({"area_fraction": area, "box_aspect": aspect, "centroid_y": centroid, "box_fill": fill})
    out[~present] = np.nan
    return out


def mean_mask_dice(masks: np.ndarray, seed: int = 0) -> np.ndarray:
    """Dice of each mask of a seeded half of bool [N, H, W] against the mean mask (``>= 0.5``)
    of the other half: float64 [N - N // 2]."""
    m = np.asarray(masks, dtype=bool)
    order = np.random.default_rng(seed).permutation(len(m))
    half = len(m) // 2
    mean = m[order[:half]].mean(0) >= 0.5
    held = m[order[half:]]
    inter = (held & mean).sum((1, 2))
    return 2.0 * inter / np.maximum(held.sum((1, 2)) + mean.sum(), 1)


def compare_sets(sets: Mapping[str, np.ndarray], seed: int = 0) -> pd.DataFrame:
    """Shape statistics of several mask sets side by side: for each set (column) the p10,
    median and p90 of every statistic, the mean-mask Dice and the number of masks."""
    cols = {}
    for name, masks in sets.items():
        stats = shape_statistics(masks)
        row = {}
        for s in STATISTICS:
            p10, p50, p90 = np.nanpercentile(stats[s], [10, 50, 90]) if len(stats) else (np.nan,) * 3
            row[f"{s} p10"], row[f"{s} median"], row[f"{s} p90"] = p10, p50, p90
        row["mean-mask Dice"] = float(np.mean(mean_mask_dice(masks, seed))) if len(masks) > 1 else np.nan
        row["masks"] = len(masks)
        cols[name] = row
    return pd.DataFrame(cols)
