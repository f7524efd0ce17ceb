"""``chexanatomy segment IMAGE --checkpoint DIR --structures "left lung;heart" --out DIR``.

Reads any chest radiograph (PNG, JPEG, DICOM), loads the checkpoint named by
``DIR/model_card.json`` (``"kind": "vlm"`` or ``"unet"``), segments the requested
structures and writes, into the output folder:

- ``<structure>.png``: one binary mask per structure (0/255, the image's size),
- ``overlay.png``: the radiograph with every mask outlined in colour,
- ``segmentation.json``: per structure its registry name, box
  (normalised ``ymin, xmin, ymax, xmax``), pixel box, area, and the generated
  tokens (VLM only).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np


class SegmentError(ValueError):
    """A `segment` request cannot be carried out; the message says why and what to do."""


def parse_structures(text: str | Sequence[str]) -> list[str]:
    """``"left lung; heart"`` -> ``["left lung", "heart"]`` (empty items dropped)."""
    items = text.split(";") if isinstance(text, str) else list(text)
    out = [" ".join(str(t).split()) for t in items]
    out = [t for t in out if t]
    if not out:
        raise SegmentError("no structures given; pass e.g. --structures \"left lung;heart\"")
    return out


def load_segmenter(checkpoint_dir: str | Path, device: str = "auto", **opts: Any):
    """The segmenter of a checkpoint folder, chosen by its ``model_card.json`` ``kind``."""
    from .checkpoints import read_card

    card = read_card(checkpoint_dir)
    kind = card.get("kind")
    if kind == "vlm":
        from .vlm.predict import VLMSegmenter

        return VLMSegmenter.load(checkpoint_dir, device=device, constrained=opts.get("constrained", True))
    if kind == "unet":
        from .unet.inference import load_segmenter as load_unet

        return load_unet(checkpoint_dir, device=device)
    raise SegmentError(f"{Path(checkpoint_dir) / 'model_card.json'}: unknown kind {kind!r} (expected 'vlm' or 'unet')")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "structure"


def overlay_image(image: np.ndarray, masks: Sequence[np.ndarray]) -> np.ndarray:
    """float [H, W] in [0, 1] + bool [H, W] masks -> uint8 [H, W, 3] with tinted, outlined masks."""
    from scipy.ndimage import binary_erosion

    from .evaluation.figures import rgb as palette_rgb

    rgb = np.repeat((np.clip(image, 0, 1) * 255)[..., None], 3, -1).astype(np.float32)
    width = max(1, min(image.shape) // 256)
    for k, m in enumerate(masks):
        if not m.any():
            continue
        c = np.array(palette_rgb(k), np.float32)
        rgb[m] = 0.75 * rgb[m] + 0.25 * c
        edge = m & ~binary_erosion(m, iterations=width)
        rgb[edge] = c
    return rgb.round().astype(np.uint8)


def segment_image(image_path: str | Path, segmenter, structures: Sequence[str], out_dir: str | Path) -> dict:
    """Run `segmenter` on one radiograph and write masks, overlay and JSON to `out_dir`; returns the JSON dict."""
    from PIL import Image

    from .codec.geometry import box_to_pixel_box
    from .ct.registry import load_registry
    from .radiograph import read_radiograph

    image = read_radiograph(image_path)
    try:
        results = segmenter.segment(image, list(structures))
    except (LookupError, ValueError) as err:  # unknown or untrained structure name (with suggestions)
        raise SegmentError(f"{image_path}: {err}") from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reg = load_registry()
    h, w = image.shape
    record: dict[str, Any] = {"image": str(image_path), "height": h, "width": w, "structures": []}
    masks = []
    for text in structures:
        mask, box, tokens = results[text]
        mask = np.asarray(mask, bool)
        masks.append(mask)
        fname = _safe_name(text) + ".png"
        Image.fromarray((mask * 255).astype(np.uint8)).save(out / fname)
        try:
            name = reg.resolve(text).name
        except LookupError:
            name = None
        entry = {"requested": text, "structure": name, "mask": fname, "area_px": int(mask.sum()),
                 "box": None if box is None else [float(v) for v in box],
                 "box_px": None if box is None else list(box_to_pixel_box(np.asarray(box), h, w)),
                 "tokens": tokens, "found": bool(mask.any())}
        record["structures"].append(entry)
    Image.fromarray(overlay_image(image, masks)).save(out / "overlay.png")
    (out / "segmentation.json").write_text(json.dumps(record, indent=2))
    return record


def main_segment(image_path: str | Path, checkpoint_dir: str | Path, structures: str, out_dir: str | Path,
                 **opts: Any) -> dict:
    """Library side of ``chexanatomy segment``: load, segment, write; returns the JSON record.

    opts: ``device`` ("auto", "cpu", "cuda"), ``constrained`` (VLM grammar, default True).
    """
    names = parse_structures(structures)
    if not Path(image_path).exists():
        raise SegmentError(f"{image_path}: image file not found")
    segmenter = load_segmenter(checkpoint_dir, device=opts.get("device", "auto"),
                               constrained=opts.get("constrained", True))
    record = segment_image(image_path, segmenter, names, out_dir)
    found = ", ".join(f"{s['requested']} ({s['area_px']} px)" for s in record["structures"])
    print(f"segmented {found}; wrote {Path(out_dir) / 'overlay.png'} and segmentation.json")
    return record
