"""Clinical measures read from masks, as radiologists take them on a PA film.

The *cardiothoracic ratio* (CTR) is the widest horizontal diameter of the heart over
the widest internal diameter of the thorax. From masks: the heart's diameter is the
horizontal extent of the heart mask (its leftmost to its rightmost column, the sum of
the widest reaches right and left of the midline), and the thorax's is the widest row
of the two lung fields together, from the outer edge of one to the outer edge of the
other (the lung fields reach the inner margins of the ribs). A CTR above 0.5 on a PA
film is the usual threshold for cardiomegaly. Widths are in pixels of the masks'
grid; the ratio needs no pixel size. It is meaningful on PA (and AP) views only.

A model's mask may hold stray islands far from the organ, which would stretch a
horizontal extent; by default only the largest connected piece of the heart and of
each lung field is measured, as a reader measures the outline, not the specks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: The usual cardiomegaly threshold of the cardiothoracic ratio on a PA film.
CARDIOMEGALY_CTR = 0.5


def _row_extent(mask: np.ndarray) -> np.ndarray:
    """Per row of bool [N, H, W]: rightmost minus leftmost set column + 1 (0 for an empty row); int64 [N, H]."""
    w = mask.shape[-1]
    cols = np.arange(w)
    has = mask.any(-1)
    right = np.where(mask, cols, -1).max(-1)
    left = np.where(mask, cols, w).min(-1)
    return np.where(has, right - left + 1, 0)


def _largest_pieces(mask: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest 8-connected pieces of bool [H, W]."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= k:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.argsort(sizes)[::-1][:k] + 1
    return np.isin(labels, keep)


def cardiothoracic_ratio(heart: np.ndarray, lung_fields: np.ndarray, largest_piece: bool = True) -> pd.DataFrame:
    """CTR of each image from its heart mask and its lung fields.

    heart: bool [N, H, W]; lung_fields: bool [N, 2, H, W] (left and right) or [N, H, W]
    (both together); largest_piece: measure only the largest connected piece of the heart
    and of each field (of the two largest pieces when the fields come together). Returns
    one row per image: ``heart_width`` and ``thorax_width`` (pixels), ``thorax_row`` (the
    row of the widest thorax) and ``ctr`` (NaN where either mask is empty).
    """
    heart = np.asarray(heart, dtype=bool)
    fields = np.asarray(lung_fields, dtype=bool)
    if heart.ndim != 3 or fields.shape[-2:] != heart.shape[-2:] or fields.ndim not in (3, 4) \
            or len(fields) != len(heart) or (fields.ndim == 4 and fields.shape[1] != 2):
        raise ValueError(f"need heart [N, H, W] and lung fields [N, 2, H, W] or [N, H, W]; got {heart.shape} and "
                         f"{fields.shape}")
    if largest_piece:
        heart = np.stack([_largest_pieces(h, 1) for h in heart]) if len(heart) else heart
        if fields.ndim == 4:
            fields = np.stack([[_largest_pieces(f, 1) for f in pair] for pair in fields]) if len(fields) else fields
        else:
            fields = np.stack([_largest_pieces(f, 2) for f in fields]) if len(fields) else fields
    if fields.ndim == 4:
        fields = fields.any(1)
    cols = heart.any(1)  # [N, W]: columns the heart reaches
    w = heart.shape[-1]
    idx = np.arange(w)
    heart_width = np.where(cols.any(1), np.where(cols, idx, -1).max(1) - np.where(cols, idx, w).min(1) + 1, 0)
    extent = _row_extent(fields)
    thorax_width = extent.max(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ctr = np.where((heart_width > 0) & (thorax_width > 0), heart_width / np.maximum(thorax_width, 1), np.nan)
    return pd.DataFrame({"heart_width": heart_width.astype(np.int64), "thorax_width": thorax_width.astype(np.int64),
                         "thorax_row": np.where(thorax_width > 0, extent.argmax(1), -1), "ctr": ctr})


def ctr_errors(reference: pd.DataFrame, predicted: pd.DataFrame) -> pd.DataFrame:
    """Per image: the reference and predicted CTR (tables of :func:`cardiothoracic_ratio`,
    same images in the same order), the error (predicted minus reference), its absolute
    value, and whether the two agree on cardiomegaly (CTR > :data:`CARDIOMEGALY_CTR`)."""
    if len(reference) != len(predicted):
        raise ValueError(f"{len(predicted)} predicted CTRs for {len(reference)} reference ones")
    ref = reference["ctr"].to_numpy(dtype=float)
    pred = predicted["ctr"].to_numpy(dtype=float)
    both = ~np.isnan(ref) & ~np.isnan(pred)
    return pd.DataFrame({"ctr_reference": ref, "ctr_predicted": pred, "error": pred - ref,
                         "absolute_error": np.abs(pred - ref),
                         "same_call": np.where(both, (ref > CARDIOMEGALY_CTR) == (pred > CARDIOMEGALY_CTR), np.nan)},
                        index=reference.index)
