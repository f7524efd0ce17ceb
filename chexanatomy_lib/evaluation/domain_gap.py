"""How projected radiographs differ from real ones: shape statistics of masks,
intensity histograms and power spectra of images, and distances between the two
with bootstrap intervals, computed the same way for any sets on a square grid.

Shape, per mask (bool [H, W], H = W): the *area fraction* of the image it covers, its
bounding box's *height / width*, its *vertical* and *horizontal centroid* (mean row /
H, 0 = top; mean column / W, 0 = left), its *box fill* (area over bounding-box area:
how much of its box a shape covers), its *orientation* (degrees between the image's
vertical and the mask's principal axis, positive when the top leans to the image's
right) and its *convexity* (area over convex-hull area: 1 for a convex shape). Per
set: the *mean-mask Dice*, how well the set's own average predicts its members (the
mean mask of a seeded half, thresholded at 0.5, scored by Dice on the other half):
high when the structure sits and looks alike in every image, low when position and
shape vary. Chapter 1 calibrates its cohort on these against real lung fields;
chapter 6 measures the gap with :func:`shape_gap`.

Intensity, per image (float [H, W] in [0, 1], white = dense): a histogram of its
values (optionally only where a mask is set, e.g. inside the letterbox) and its
radially averaged power spectrum. Two sets are compared by the Jensen-Shannon
divergence of their mean histograms, the Wasserstein distance of their pooled values
and the mean absolute difference of their log spectra (:func:`intensity_gap`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

STATISTICS = ("area_fraction", "box_aspect", "centroid_y", "centroid_x", "box_fill", "orientation_deg", "convexity")


def _orientation_and_convexity(mask: np.ndarray) -> tuple[float, float]:
    from scipy.spatial import ConvexHull, QhullError

    rc = np.argwhere(mask).astype(np.float64)
    if len(rc) < 3:
        return np.nan, np.nan
    d = rc - rc.mean(0)
    cov = d.T @ d / len(rc)
    vals, vecs = np.linalg.eigh(cov)
    dr, dc = vecs[:, -1]  # principal axis (row, column)
    if dr > 0:  # point it upwards (towards row 0)
        dr, dc = -dr, -dc
    angle = float(np.degrees(np.arctan2(dc, -dr)))  # 0: vertical, > 0: the top leans right
    corners = (rc[:, None, :] + np.array([[0, 0], [0, 1], [1, 0], [1, 1]], float)[None]).reshape(-1, 2)
    try:
        hull = ConvexHull(corners).volume  # the area of a 2D hull
    except QhullError:  # a one-pixel-wide line
        return angle, 1.0
    return angle, float(len(rc) / hull) if hull > 0 else np.nan


def shape_statistics(masks: np.ndarray) -> pd.DataFrame:
    """One row per mask of bool [N, H, W]: ``area_fraction``, ``box_aspect`` (height / width
    of the bounding box), ``centroid_y`` (mean row / H), ``centroid_x`` (mean column / W),
    ``box_fill`` (pixels over bounding-box pixels), ``orientation_deg`` (principal axis
    against the vertical, degrees in (-90, 90], > 0 when the top leans right) and
    ``convexity`` (pixels over the convex hull of their squares, in (0, 1]); NaN for an
    empty mask."""
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
        centroid_x = (m.sum(1) * c).sum(1) / counts / w
        aspect = height / width
        fill = counts / (height * width)
    shape = np.array([_orientation_and_convexity(k) if ok else (np.nan, np.nan) for k, ok in zip(m, present)],
                     dtype=np.float64).reshape(n, 2)
    out = pd.DataFrame({"area_fraction": area, "box_aspect": aspect, "centroid_y": centroid, "centroid_x": centroid_x,
                        "box_fill": fill, "orientation_deg": shape[:, 0], "convexity": shape[:, 1]})
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


def _bootstrap_distance(a: np.ndarray, b: np.ndarray, distance, n_boot: int, seed: int) -> tuple[float, float, float]:
    """``distance(a, b)`` with a 95% percentile interval, each set resampled on its own."""
    est = float(distance(a, b))
    rng = np.random.default_rng(seed)
    boots = [distance(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))])
             for _ in range(int(n_boot))]
    lo, hi = np.quantile(boots, [0.025, 0.975]) if boots else (np.nan, np.nan)
    return est, float(lo), float(hi)


def shape_gap(a: pd.DataFrame, b: pd.DataFrame, statistics=STATISTICS, n_boot: int = 1000,
              seed: int = 0) -> pd.DataFrame:
    """How far two sets' shape statistics lie apart, one row per statistic.

    a, b: tables of :func:`shape_statistics` (e.g. projected masks, real annotations).
    Columns: the two medians, the Wasserstein-1 distance between the distributions (in
    the statistic's unit) with a 95% bootstrap interval (each set resampled), and that
    distance over the standard deviation of ``b`` (``standardised``: about 0 when the sets
    agree, above 1 when they are further apart than ``b``'s own spread).
    """
    from scipy.stats import wasserstein_distance

    rows = []
    for k, s in enumerate(statistics):
        x, y = a[s].dropna().to_numpy(float), b[s].dropna().to_numpy(float)
        if len(x) == 0 or len(y) == 0:
            rows.append({"statistic": s, "n_a": len(x), "n_b": len(y)})
            continue
        est, lo, hi = _bootstrap_distance(x, y, wasserstein_distance, n_boot, seed + k)
        sd = float(np.std(y))
        rows.append({"statistic": s, "n_a": len(x), "n_b": len(y), "median_a": float(np.median(x)),
                     "median_b": float(np.median(y)), "wasserstein": est, "wasserstein_lo": lo,
                     "wasserstein_hi": hi, "standardised": est / sd if sd > 0 else np.nan})
    return pd.DataFrame(rows).set_index("statistic")


def intensity_histograms(images: np.ndarray, bins: int = 64, masks: np.ndarray | None = None) -> np.ndarray:
    """Normalised histogram of each image's values on ``bins`` equal bins of [0, 1].

    images: float [N, H, W] in [0, 1]; masks: bool [N, H, W], the pixels counted (None:
    all; e.g. the part of a letterboxed image that is not padding). Returns float64
    [N, bins], each row summing to 1 (all zero where no pixel counts).
    """
    x = np.clip(np.asarray(images, dtype=np.float64), 0.0, 1.0)
    keep = np.ones(x.shape, bool) if masks is None else np.asarray(masks, bool)
    k = np.minimum((x * bins).astype(np.int64), bins - 1)
    out = np.zeros((len(x), bins))
    for i in range(len(x)):
        out[i] = np.bincount(k[i][keep[i]], minlength=bins)
    total = out.sum(1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def radial_power_spectrum(images: np.ndarray, n_bins: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum of each image (its mean removed, a Hann window applied).

    images: float [N, H, W]. Returns ``(frequency float64 [n_bins]`` in cycles per pixel,
    bin centres on (0, 0.5]``, log10 power float64 [N, n_bins])``.
    """
    x = np.asarray(images, dtype=np.float64)
    n, h, w = x.shape
    win = np.outer(np.hanning(h), np.hanning(w))
    f = np.fft.fftshift(np.fft.fft2((x - x.mean((1, 2), keepdims=True)) * win), axes=(1, 2))
    power = np.abs(f) ** 2 / (h * w)
    fy = np.fft.fftshift(np.fft.fftfreq(h))[:, None]
    fx = np.fft.fftshift(np.fft.fftfreq(w))[None, :]
    radius = np.sqrt(fy ** 2 + fx ** 2)
    edges = np.linspace(0, 0.5, n_bins + 1)
    which = np.digitize(radius, edges[1:-1])  # 0 .. n_bins - 1
    inside = (radius > 0) & (radius <= 0.5)
    counts = np.bincount(which[inside], minlength=n_bins).astype(float)
    spectra = np.stack([np.bincount(which[inside], weights=p[inside], minlength=n_bins) for p in power])
    mean = spectra / np.maximum(counts, 1)
    return (edges[:-1] + edges[1:]) / 2, np.log10(np.maximum(mean, 1e-20))


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two histograms (normalised here)."""
    p = np.asarray(p, np.float64) / max(float(np.sum(p)), 1e-300)
    q = np.asarray(q, np.float64) / max(float(np.sum(q)), 1e-300)
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def intensity_gap(a: np.ndarray, b: np.ndarray, masks_a: np.ndarray | None = None, masks_b: np.ndarray | None = None,
                  bins: int = 64, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """How far two sets of images lie apart in intensity and texture.

    a, b: float [N, H, W] and [M, H, W] in [0, 1] (the same H, W: e.g. both letterboxed to
    the model's input); masks_*: the pixels that count in the histograms (None: all).
    Rows: ``jensen_shannon`` (of the mean histograms, base 2, 0 = identical, 1 = disjoint),
    ``wasserstein`` (of the values, pooled over images, in display units) and
    ``log_spectrum`` (mean absolute difference of the mean log10 radial power spectra,
    decades); columns ``value``, ``lo``, ``hi`` (95% bootstrap over images, each set
    resampled on its own).
    """
    from scipy.stats import wasserstein_distance

    ha, hb = intensity_histograms(a, bins, masks_a), intensity_histograms(b, bins, masks_b)
    centres = (np.arange(bins) + 0.5) / bins
    _, sa = radial_power_spectrum(a)
    _, sb = radial_power_spectrum(b)
    ia, ib = np.arange(len(a)), np.arange(len(b))
    measures = {
        "jensen_shannon": lambda x, y: jensen_shannon(ha[x].mean(0), hb[y].mean(0)),
        "wasserstein": lambda x, y: wasserstein_distance(centres, centres, ha[x].sum(0) + 1e-12, hb[y].sum(0) + 1e-12),
        "log_spectrum": lambda x, y: float(np.mean(np.abs(sa[x].mean(0) - sb[y].mean(0)))),
    }
    rows = []
    for k, (name, fn) in enumerate(measures.items()):
        est, lo, hi = _bootstrap_distance(ia, ib, fn, n_boot, seed + k)
        rows.append({"measure": name, "value": est, "lo": lo, "hi": hi})
    return pd.DataFrame(rows).set_index("measure")
