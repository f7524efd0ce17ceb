"""Masks of dataset images rendered again from their CTs, at other resolutions.

A projected dataset stores its masks at one size; every row also records its
source CT, deformed copy and pose, so its masks can be rendered again at any
size (:class:`~chexanatomy_lib.ct.synthesis.CaseRenderer`). Chapter 2 scores the
token codec on held-out masks re-rendered at 224, 448 and 896 px this way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

#: Columns of the table :func:`rerender_masks` returns, one row per mask.
MASK_COLUMNS = ("index", "image_id", "view", "structure")


def rerender_masks(dataset, manifest: str | Path, indices: Sequence[int], sizes: Sequence[int],
                   structures: Sequence[str] | None = None, exclude_truncated: bool = True,
                   threads: int | None = 1) -> tuple[dict[int, np.ndarray], pd.DataFrame]:
    """Re-render some dataset images from their CT at each of ``sizes`` and keep the usable masks.

    ``dataset``: a :class:`~chexanatomy_lib.ct.dataset.ProjectedDataset`;
    ``manifest``: the CT manifest it was made from (chapter 1's ``manifest``
    parameter); ``indices``: rows of its index; ``structures``: which masks
    (None: all of the dataset's, in its order); ``threads``: torch threads while
    rendering. A structure of an image is kept when it is present (non-empty and
    not absent) at every size, and untruncated at every size when
    ``exclude_truncated``, so that every size scores the same masks.

    Returns ``({size: bool [M, size, size]}, table)`` with one table row per mask
    (``index, image_id, view, structure``), in the same order for every size.
    Raises ValueError naming the case when a row's CT is not in the manifest.
    """
    from .manifest import load_manifest
    from .synthesis import CaseRenderer

    names = list(dataset.structures) if structures is None else list(structures)
    specs = {str(s.case_id): s for s in load_manifest(manifest)}
    renderers: dict[str, CaseRenderer] = {}  # one per case, made when its first row comes
    out: dict[int, list[np.ndarray]] = {int(z): [] for z in sizes}
    rows = []
    for i in indices:
        row = dataset.index.iloc[int(i)]
        cid = str(row["case_id"])
        if cid not in renderers:
            if cid not in specs:
                raise ValueError(f"image {row['image_id']!r}: case {cid!r} is not in the manifest {manifest} "
                                 f"(cases there: {sorted(specs)})")
            renderers[cid] = CaseRenderer(specs[cid].load(), dataset.meta["render_settings"])
        rendered = {}
        keep = np.ones(len(names), bool)
        for z in out:
            _, m, absent, truncated = renderers[cid].render(row, z, structures=names, threads=threads)
            keep &= m.reshape(len(names), -1).any(1) & ~absent
            if exclude_truncated:
                keep &= ~truncated
            rendered[z] = m
        for z, m in rendered.items():
            out[z].append(m[keep])
        for k in np.flatnonzero(keep):
            rows.append({"index": int(i), "image_id": row["image_id"], "view": row["view"], "structure": names[k]})
    stacked = {z: np.concatenate(ms) if ms else np.zeros((0, z, z), bool) for z, ms in out.items()}
    return stacked, pd.DataFrame(rows, columns=list(MASK_COLUMNS))
