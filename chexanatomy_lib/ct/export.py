"""Exports of a projected dataset for other tools: PNG files and COCO JSON.

- `export_png`: ``images/<image_id>.png`` (grayscale, white = dense) and
  ``masks/<image_id>/<structure>.png`` (0 / 255), one per structure.
- `export_coco_rle`: one COCO-style JSON with ``images``, ``categories`` (the
  dataset's structures, named and grouped by the registry) and
  ``annotations`` whose ``segmentation`` is an *uncompressed* RLE as COCO
  defines it: ``{"size": [H, W], "counts": [...]}``, run lengths over the mask
  in column-major (Fortran) order, starting with a run of zeros.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DatasetError


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a mask ``bool [H, W]``.

    ``counts`` alternate zeros and ones along the column-major flattening, the
    first count being the number of leading zeros (0 if the first pixel is set).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2D [H, W], got shape {mask.shape}")
    flat = mask.flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode a COCO uncompressed RLE to ``bool [H, W]``."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()}, expected {h * w} pixels")
    values = np.arange(counts.size) % 2 == 1  # runs alternate 0, 1, 0, ...
    return np.repeat(values, counts).reshape((h, w), order="F")


def mask_bbox_xywh(mask: np.ndarray) -> list[float]:
    """COCO box ``[x, y, width, height]`` in pixels of a non-empty mask ``bool [H, W]``
    (pixel edges: a single pixel at (row 3, col 5) gives ``[5, 3, 1, 1]``)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask has no bounding box")
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]


def _indices(ds: Any, indices: Sequence[int] | None) -> np.ndarray:
    return np.arange(len(ds)) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)


def _safe_name(text: str, what: str, ds: Any) -> str:
    if not text or "/" in text or "\\" in text or text in (".", ".."):
        raise DatasetError(getattr(ds, "path", None), f"{what} {text!r} cannot be used as a file name")
    return text


def export_png(ds: Any, out_dir: str | Path, indices: Sequence[int] | None = None, bit_depth: int = 8) -> Path:
    """Write images and per-structure masks of ``ds`` (a `ProjectedDataset`) as PNG.

    ``images/<image_id>.png``: grayscale, ``round(image * (2**bit_depth - 1))``
    (8 or 16 bit); ``masks/<image_id>/<structure>.png``: 8-bit, 255 inside.
    ``indices``: rows to export (default all). Returns ``out_dir``.
    """
    from PIL import Image

    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, not {bit_depth}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scale = 2 ** bit_depth - 1
    dtype = np.uint8 if bit_depth == 8 else np.uint16
    for i in _indices(ds, indices):
        image_id = _safe_name(str(ds.index["image_id"].iloc[i]), "image_id", ds)
        pixels = np.round(np.clip(np.asarray(ds.images[i], dtype=np.float64), 0, 1) * scale).astype(dtype)
        Image.fromarray(pixels).save(out / "images" / f"{image_id}.png")
        mask_dir = out / "masks" / image_id
        mask_dir.mkdir(parents=True, exist_ok=True)
        for name, m in zip(ds.structures, ds.masks(i)):
            Image.fromarray(m.astype(np.uint8) * 255).save(mask_dir / f"{name}.png")
    return out


def export_coco_rle(ds: Any, out_json: str | Path, indices: Sequence[int] | None = None) -> Path:
    """Write ``ds`` as COCO-style JSON with uncompressed RLE masks.

    ``images``: ``id`` (row + 1), ``file_name`` (as written by `export_png`),
    ``height``, ``width``, ``image_id`` (the dataset's), ``case_id``,
    ``view``, ``split``, ``absent_category_ids``, ``truncated_category_ids``.
    ``categories``: ``id`` (channel + 1), ``name`` (registry name),
    ``display``, ``supercategory`` (registry category). ``annotations``: one
    per non-empty mask, with ``segmentation`` (RLE), ``area`` (pixels),
    ``bbox`` ``[x, y, w, h]``, ``iscrowd`` 0 and ``attributes``
    ``{"absent": false, "truncated": bool}``. Returns ``out_json``.
    """
    from .registry import load_registry

    reg = load_registry()
    categories = []
    for k, name in enumerate(ds.structures):
        s = reg.get(name)
        categories.append({"id": k + 1, "name": name, "display": s.display, "supercategory": s.category})
    images, annotations = [], []
    size = int(ds.image_size)
    for i in _indices(ds, indices):
        row = ds.index.iloc[i]
        absent = np.asarray(ds.absent[i])
        truncated = np.asarray(ds.truncated[i])
        image_id = str(row["image_id"])
        images.append({
            "id": int(i) + 1, "file_name": f"images/{image_id}.png", "height": size, "width": size,
            "image_id": image_id, "case_id": str(row["case_id"]), "view": str(row["view"]),
            "split": str(row["split"]),
            "absent_category_ids": [int(k) + 1 for k in np.flatnonzero(absent)],
            "truncated_category_ids": [int(k) + 1 for k in np.flatnonzero(truncated)],
        })
        for k, m in enumerate(ds.masks(i)):
            area = int(m.sum())
            if area == 0:
                continue
            annotations.append({
                "id": len(annotations) + 1, "image_id": int(i) + 1, "category_id": k + 1,
                "segmentation": mask_to_rle(m), "area": area, "bbox": mask_bbox_xywh(m), "iscrowd": 0,
                "attributes": {"absent": bool(absent[k]), "truncated": bool(truncated[k])},
            })
    doc = {
        "info": {"description": f"projected dataset {getattr(ds, 'path', '')}", "format": "COCO, uncompressed RLE"},
        "images": images, "categories": categories, "annotations": annotations,
    }
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc))
    return out
