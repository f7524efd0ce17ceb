"""Which images a k-shot run learns from.

A *draw* is, for one seed, a random order of the eligible training images; the k-shot
set of that seed is its first k images, so the sets are nested (the 4-shot set holds
the 2-shot set) and every start sees exactly the same images for a given (k, seed).
Draws are saved with the run (:func:`save_draws`) so that a later run, or another
start, reads the very same images back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd


def eligible_rows(dataset, split: str, structures: Sequence[str]) -> np.ndarray:
    """Rows (int64, ascending) of ``split`` in which every structure of ``structures`` is a
    usable target: present and not truncated. ``dataset``: a ``ProjectedDataset``."""
    idx = np.asarray(dataset.split_indices(split), dtype=np.int64)
    ch = [list(dataset.structures).index(s) for s in structures]
    ok = ~np.asarray(dataset.absent)[np.ix_(idx, ch)] & ~np.asarray(dataset.truncated)[np.ix_(idx, ch)]
    return idx[ok.all(1)]


def kshot_draws(rows: Sequence[int], ks: Sequence[int], seeds: Sequence[int]) -> pd.DataFrame:
    """One row per (seed, k): ``seed``, ``k`` and ``rows`` (the k dataset rows, a list).

    Each seed orders ``rows`` at random (``numpy.random.default_rng(seed)``) and every k
    takes the first k of that order. Raises ValueError when a k exceeds the eligible
    images, or for a k below 1, naming both.
    """
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"k must be >= 1, got {ks}")
    if ks[-1] > len(rows):
        raise ValueError(f"k = {ks[-1]} needs {ks[-1]} eligible training images; there are {len(rows)}")
    out = []
    for seed in seeds:
        order = np.random.default_rng(int(seed)).permutation(rows)
        for k in ks:
            out.append({"seed": int(seed), "k": k, "rows": [int(r) for r in order[:k]]})
    return pd.DataFrame(out, columns=["seed", "k", "rows"])


def save_draws(draws: pd.DataFrame, path: str | Path, dataset=None) -> Path:
    """Write ``draws`` as JSON (with the image ids of ``dataset`` beside the rows when given)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = draws.to_dict("records")
    if dataset is not None:
        ids = dataset.index["image_id"].to_numpy().astype(str)
        for r in records:
            r["image_ids"] = [str(ids[i]) for i in r["rows"]]
    path.write_text(json.dumps(records, indent=1))
    return path


def load_draws(path: str | Path) -> pd.DataFrame:
    """Draws written by :func:`save_draws`; a ValueError names the file when it is not one."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
        table = pd.DataFrame(records)
        if not {"seed", "k", "rows"} <= set(table.columns):
            raise KeyError("seed, k, rows")
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: not a k-shot draw file ({type(exc).__name__}: {exc})") from None
    return table
