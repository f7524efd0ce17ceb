"""``chexanatomy segment IMAGE_OR_FOLDER --checkpoint DIR --structures "left lung;heart" --out DIR``.

Reads any chest radiograph (PNG, JPEG, DICOM), loads the checkpoint named by
``DIR/model_card.json`` (``"kind": "vlm"`` or ``"unet"``), segments the requested
structures and writes, into the output folder:

- ``<structure>.png``: one binary mask per structure (0/255, the image's size),
- ``overlay.png``: the radiograph with every mask outlined in colour,
- ``segmentation.json``: per structure its registry name, box
  (normalised ``ymin, xmin, ymax, xmax``), pixel box, area, and the generated
  tokens (VLM only),
- ``segmentation.dcm`` for a DICOM radiograph: a DICOM Segmentation object
  (:mod:`chexanatomy_lib.dicom_seg`) referencing the source image, one segment per
  structure with its SNOMED CT code where the registry has one.

Given a folder, every radiograph in it is segmented into ``<out>/<image stem>/`` with
a progress bar, and ``<out>/segmentation.csv`` gets one row per file: per structure
its area and pixel box, the cardiothoracic ratio where the heart and both lungs (or
lung fields) were asked for, and, for a file that could not be read or segmented,
the reason (the run goes on).
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
    from .radiograph import is_dicom

    if is_dicom(Path(image_path)):
        from .dicom_seg import write_dicom_seg

        codes = []
        for entry in record["structures"]:
            codes.append(reg.get(entry["structure"]).snomed if entry["structure"] else None)
        write_dicom_seg(image_path, np.stack(masks), [e["requested"] for e in record["structures"]], codes,
                        out / "segmentation.dcm",
                        algorithm=f"CheXanatomy {type(segmenter).__name__.replace('Segmenter', '')}")
        record["dicom_seg"] = "segmentation.dcm"
    (out / "segmentation.json").write_text(json.dumps(record, indent=2))
    return record


#: Files a folder run reads: by suffix, and DICOM files without one.
RADIOGRAPH_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")


def folder_images(folder: str | Path) -> list[Path]:
    """The radiographs of ``folder`` (not recursive), sorted by name: files with a suffix
    of :data:`RADIOGRAPH_SUFFIXES`, and files without a suffix that start like DICOM."""
    from .radiograph import is_dicom

    d = Path(folder)
    return sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith(".")
                  and (f.suffix.lower() in RADIOGRAPH_SUFFIXES or (not f.suffix and is_dicom(f))))


def _ctr(record: dict, masks: dict[str, np.ndarray]) -> float | None:
    """The cardiothoracic ratio when the heart and both lungs (or lung fields) were asked for."""
    from .evaluation.clinical import cardiothoracic_ratio

    by_name = {e["structure"]: masks[e["requested"]] for e in record["structures"] if e["structure"]}
    for pair in (("lung_field_left", "lung_field_right"), ("lung_left", "lung_right")):
        if "heart" in by_name and all(p in by_name for p in pair):
            table = cardiothoracic_ratio(by_name["heart"][None], np.stack([by_name[p] for p in pair])[None])
            value = float(table["ctr"].iloc[0])
            return value if np.isfinite(value) else None
    return None


def segment_folder(folder: str | Path, segmenter, structures: Sequence[str], out_dir: str | Path,
                   progress: bool = True):
    """Segment every radiograph of ``folder`` into ``out_dir/<stem>/`` and write
    ``out_dir/segmentation.csv`` (one row per file; see the module docstring). A file
    that cannot be read or segmented is reported in its row (``status`` "failed",
    ``error``) and the run goes on. Returns the table (pandas DataFrame)."""
    import pandas as pd
    from PIL import Image
    from tqdm.auto import tqdm

    from .radiograph import RadiographError

    files = folder_images(folder)
    if not files:
        raise SegmentError(f"{folder}: no radiographs (PNG, JPEG or DICOM) in this folder")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for f in tqdm(files, desc="segmenting", unit="image", disable=not progress):
        row: dict[str, Any] = {"image": f.name, "status": "ok", "error": ""}
        target = out / _safe_name(f.stem if f.suffix else f.name)
        try:
            record = segment_image(f, segmenter, structures, target)
        except (RadiographError, SegmentError, OSError, ValueError) as err:
            rows.append({**row, "status": "failed", "error": str(err)})
            continue
        masks = {e["requested"]: np.asarray(Image.open(target / e["mask"])) > 0 for e in record["structures"]}
        row.update({"output": target.name, "height": record["height"], "width": record["width"]})
        for e in record["structures"]:
            key = _safe_name(e["requested"])
            row[f"{key}_area_px"] = e["area_px"]
            row[f"{key}_box_px"] = " ".join(map(str, e["box_px"])) if e["box_px"] is not None else ""
        row["ctr"] = _ctr(record, masks)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out / "segmentation.csv", index=False)
    return table


def main_segment(image_path: str | Path, checkpoint_dir: str | Path, structures: str, out_dir: str | Path,
                 **opts: Any) -> dict | Any:
    """Library side of ``chexanatomy segment``: load, segment, write. Returns the JSON record
    of one image, or the folder's table (see :func:`segment_folder`).

    opts: ``device`` ("auto", "cpu", "cuda"), ``constrained`` (VLM grammar, default True).
    """
    names = parse_structures(structures)
    path = Path(image_path)
    if not path.exists():
        raise SegmentError(f"{image_path}: image file or folder not found")
    segmenter = load_segmenter(checkpoint_dir, device=opts.get("device", "auto"),
                               constrained=opts.get("constrained", True))
    if path.is_dir():
        table = segment_folder(path, segmenter, names, out_dir)
        failed = table[table["status"] != "ok"]
        print(f"segmented {len(table) - len(failed)} of {len(table)} radiographs; wrote "
              f"{Path(out_dir) / 'segmentation.csv'}" + (f" ({len(failed)} failed: see its error column)"
                                                        if len(failed) else ""))
        return table
    record = segment_image(path, segmenter, names, out_dir)
    found = ", ".join(f"{s['requested']} ({s['area_px']} px)" for s in record["structures"])
    extra = " and segmentation.dcm" if record.get("dicom_seg") else ""
    print(f"segmented {found}; wrote {Path(out_dir) / 'overlay.png'}, segmentation.json{extra}")
    return record
