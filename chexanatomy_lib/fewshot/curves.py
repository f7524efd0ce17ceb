"""k-shot curves and their summaries, with intervals over seeds and images.

Input everywhere: a per-image score table with columns ``task``, ``start``, ``k``,
``seed``, ``image_id`` and the metric (one row per scored image and structure, as
:func:`~chexanatomy_lib.evaluation.evaluate.score_images` gives them, tagged with the
run). A task with several structures is first averaged per image.

Two sources of variation are resampled together: the k-shot draw (``seed``) and the
test image. A resample draws seeds with replacement and, independently, test images
with replacement, and takes the mean over the grid they span
(:func:`~chexanatomy_lib.evaluation.metrics.two_level_bootstrap`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from ..evaluation.metrics import difference_verdict, two_level_bootstrap

KEYS = ("task", "start", "k", "seed")


def _per_image(scores: pd.DataFrame, metric: str) -> pd.DataFrame:
    keys = [c for c in KEYS if c in scores.columns]
    return scores.groupby([*keys, "image_id"], sort=False)[metric].mean().reset_index()


def _matrix(g: pd.DataFrame, metric: str, seeds: Sequence, images: Sequence) -> np.ndarray:
    return g.pivot_table(index="seed", columns="image_id", values=metric, aggfunc="mean").reindex(
        index=list(seeds), columns=list(images)).to_numpy(dtype=np.float64)


def kshot_curves(scores: pd.DataFrame, metric: str = "dice", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (task, start, k): the mean ``metric`` over seeds and test images with its 95%
    two-level bootstrap interval, and how many seeds and images it rests on. Returns a
    DataFrame indexed by (task, start, k) with ``<metric>``, ``<metric>_lo``, ``<metric>_hi``,
    ``seeds``, ``images``."""
    per = _per_image(scores, metric)
    rows = []
    for j, ((task, start, k), g) in enumerate(per.groupby(["task", "start", "k"], sort=True)):
        seeds, images = sorted(g["seed"].unique()), sorted(g["image_id"].unique())
        m, lo, hi, _ = two_level_bootstrap(_matrix(g, metric, seeds, images), n_boot, seed + j)
        rows.append({"task": task, "start": start, "k": int(k), metric: m, f"{metric}_lo": lo, f"{metric}_hi": hi,
                     "seeds": len(seeds), "images": len(images)})
    return pd.DataFrame(rows).set_index(["task", "start", "k"])


def area_under_curve(scores: pd.DataFrame, metric: str = "dice", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per (task, start): the area under the k-shot curve on a log2(k) axis, divided by the
    axis' length (the curve's mean height, in the metric's unit), with a 95% interval in
    which every k is resampled with the same seeds and images. Returns a DataFrame indexed
    by (task, start): ``auc``, ``auc_lo``, ``auc_hi``, ``ks``."""
    per = _per_image(scores, metric)
    rows = []
    for j, ((task, start), g) in enumerate(per.groupby(["task", "start"], sort=True)):
        ks = sorted(int(k) for k in g["k"].unique())
        seeds, images = sorted(g["seed"].unique()), sorted(g["image_id"].unique())
        cube = np.stack([_matrix(g[g["k"] == k], metric, seeds, images) for k in ks])  # [K, S, N]
        x = np.log2(ks)
        rng = np.random.default_rng(seed + j)

        def auc(c):
            y = np.array([np.nanmean(ck) for ck in c])
            return float(np.trapezoid(y, x) / (x[-1] - x[0])) if len(ks) > 1 else float(y[0])

        est = auc(cube)
        boots = [auc(cube[:, rng.integers(0, len(seeds), len(seeds))][:, :, rng.integers(0, len(images), len(images))])
                 for _ in range(int(n_boot))]
        lo, hi = np.nanquantile(boots, [0.025, 0.975])
        rows.append({"task": task, "start": start, "auc": est, "auc_lo": float(lo), "auc_hi": float(hi),
                     "ks": ", ".join(map(str, ks))})
    return pd.DataFrame(rows).set_index(["task", "start"])


def k_to_reach(curves: pd.DataFrame, reference: dict[str, float], metric: str = "dice") -> pd.DataFrame:
    """Per (task, start): the smallest k whose mean ``metric`` reaches ``reference[task]``
    (the fully supervised model's score), and whether its lower bound does too; NaN
    when no k of the curve reaches it."""
    rows = []
    for (task, start), g in curves.reset_index().groupby(["task", "start"], sort=True):
        ref = reference.get(task, np.nan)
        g = g.sort_values("k")
        hit = g[g[metric] >= ref]
        sure = g[g[f"{metric}_lo"] >= ref]
        rows.append({"task": task, "start": start, "reference": ref,
                     "k reaching it": int(hit["k"].iloc[0]) if len(hit) else np.nan,
                     "k whose interval clears it": int(sure["k"].iloc[0]) if len(sure) else np.nan})
    return pd.DataFrame(rows).set_index(["task", "start"])


def start_difference(scores: pd.DataFrame, a: str, b: str, metric: str = "dice", n_boot: int = 1000,
                     seed: int = 0) -> pd.DataFrame:
    """Start ``a`` minus start ``b`` per (task, k), on the same seeds and test images: the
    per-image difference (each image's score averaged over its structures), averaged over
    the seeds both starts ran, with a 95% two-level bootstrap interval and the verdict it
    gives (``"A better"``, ``"A worse"``, ``"not distinguishable"``). Returns a DataFrame
    indexed by (task, k)."""
    per = _per_image(scores, metric)
    rows = []
    for j, ((task, k), g) in enumerate(per.groupby(["task", "k"], sort=True)):
        ga, gb = g[g["start"] == a], g[g["start"] == b]
        seeds = sorted(set(ga["seed"]) & set(gb["seed"]))
        images = sorted(set(ga["image_id"]) & set(gb["image_id"]))
        diff = _matrix(ga, metric, seeds, images) - _matrix(gb, metric, seeds, images)
        m, lo, hi, _ = two_level_bootstrap(diff, n_boot, seed + j)
        verdict = difference_verdict(lo, hi)
        rows.append({"task": task, "k": int(k), "a": float(np.nanmean(_matrix(ga, metric, seeds, images))),
                     "b": float(np.nanmean(_matrix(gb, metric, seeds, images))), "difference": m,
                     "difference_lo": lo, "difference_hi": hi, "verdict": verdict, "seeds": len(seeds),
                     "images": len(images)})
    return pd.DataFrame(rows).set_index(["task", "k"])
