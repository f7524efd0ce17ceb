"""Public real chest radiograph sets, read from their own on-disk formats into the
registry's structure names and the project's conventions.

A set is described by a small YAML manifest (``data_manifests/real_*.yaml``, format in
``data_manifests/README.md``) naming a reader and the folder the user downloaded the set
to; :func:`read_real_set` turns it into a :class:`RealSet`. The on-disk formats are those
of ``shared/design/REAL_CXR_FORMATS.md``.

Readers (``reader:`` in a manifest; ``STRUCTURES_OF`` lists what each annotates):

- ``jsrt``          JSRT ``All247images/*.IMG`` (raw 2048 x 2048 big-endian 12-bit, inverted:
                    ``4095 - raw``) with the SCR masks ``scratch/fold{1,2}/masks/<organ>/<stem>.gif``
                    (1024 x 1024, same field of view); lungs, heart, clavicles; 0.175 mm.
- ``montgomery``    ``CXR_png/*.png`` with ``ManualMask/{leftMask,rightMask}/`` (same names);
                    each image's two masks are assigned to a side by their centroid column; 0.0875 mm.
- ``shenzhen``      ``CXR_png/*.png`` with ``mask/<stem>_mask.png`` (both lungs in one mask, split by
                    connected component and side); images without a mask are left out.
- ``chexmask``      one CheXmask CSV (``.csv`` or ``.csv.gz``): run-length masks of both lungs and the
                    heart, rows filtered by ``Dice RCA (Mean)``; masks only, unless ``images_dir`` is set.
- ``vindr_ribcxr``  VinDr-RibCXR ``Vindr_RibCXR_{split}_mask.json`` (ribs R1-R10, L1-L10 as polygons,
                    filled) with the PNGs under ``data/{split}/img/``.
- ``folder``        any ``images/`` folder (PNG, JPEG, TIFF, DICOM) with ``masks/<registry name>/<stem>.png``.

Conventions of every reader:

- images: float32 in [0, 1], white = dense (``radiograph.read_radiograph``; JSRT inverted here);
- a mask pixel is foreground when its value is > 0 (8- or 16-bit, grey, palette or colour);
- lung fields as real radiographs annotate them; the patient's LEFT structure (``*_left``) lies
  on the IMAGE'S RIGHT;
- every image and its masks are letterboxed to ``size`` (``radiograph.letterbox``: aspect kept,
  centred padding); masks are resampled onto the same inner box by the area rule, a pixel set
  where at least half of its footprint is (``radiograph.Letterbox.mask_to_square``);
- a set is never read half: every file is listed and checked before any pixel is read, and any
  bad file raises :class:`RealSetError` naming it, so nothing is returned.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..ct.errors import ManifestError, UnknownStructureError
from ..ct.manifest import resolve_path
from ..ct.registry import load_registry
from ..radiograph import Letterbox, RadiographError, letterbox, letterbox_geometry, read_radiograph

__all__ = ["RealSetError", "STRUCTURES_OF", "MANIFEST_KEYS", "READER_OPTIONS", "RealSet", "read_real_set",
           "load_real_manifest", "rle_decode", "rle_encode"]

LUNGS = ("lung_field_left", "lung_field_right")
RIBS = tuple(f"rib_{side}_{k}" for side in ("left", "right") for k in range(1, 11))

#: reader name -> the registry structures it can annotate, in channel order
#: (``folder``: any structure of the registry, in registry order).
STRUCTURES_OF: dict[str, tuple[str, ...]] = {
    "jsrt": LUNGS + ("heart", "clavicula_left", "clavicula_right"),
    "montgomery": LUNGS,
    "shenzhen": LUNGS,
    "chexmask": LUNGS + ("heart",),
    "vindr_ribcxr": RIBS,
    "folder": tuple(load_registry().names),
}

#: keys a manifest may hold; the first three are required
MANIFEST_KEYS = ("name", "reader", "root", "description", "licence", "origin", "notes", "options", "limit")

#: reader name -> its options and their defaults (paths are relative to the manifest's root)
READER_OPTIONS: dict[str, dict[str, Any]] = {
    "jsrt": {"images_dir": "All247images", "masks_dir": "scratch"},
    "montgomery": {"images_dir": "CXR_png", "masks_dir": "ManualMask"},
    "shenzhen": {"images_dir": "CXR_png", "masks_dir": "mask"},
    "chexmask": {"csv": None, "images_dir": None, "min_dice": 0.7},
    "vindr_ribcxr": {"splits": ["train", "val"], "json_dir": None},
    "folder": {"images_dir": "images", "masks_dir": "masks", "pixel_spacing_mm": None},
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".dcm", ".dicom")


class RealSetError(ValueError):
    """A real set cannot be read; the message names the file (or manifest) and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class RealSet:
    """A real set on a square grid, in the registry's names.

    image_ids: str [N], sorted; structures: str [S] registry names (channel order);
    images: float32 [N, size, size] in [0, 1], white = dense, letterboxed (None for a CheXmask set
    without images); masks: bool [N, S, size, size], letterboxed like the images; annotated:
    bool [N, S], whether structure s is annotated for image n (False: its mask is all False and
    means "unknown", not "absent"); letterboxes: [N] `radiograph.Letterbox` mapping the square back
    to the original pixels; original_shapes: [N] (H, W) before letterboxing; pixel_spacing_mm: [N]
    at the original resolution, None where unknown; notes: what the reader decided; source: the
    manifest's name, reader, root, licence, origin, description, notes and path.
    """

    name: str
    reader: str
    image_ids: list[str]
    structures: list[str]
    images: np.ndarray | None
    masks: np.ndarray
    annotated: np.ndarray
    letterboxes: list[Letterbox]
    original_shapes: list[tuple[int, int]]
    pixel_spacing_mm: list[float | None]
    notes: list[str]
    source: dict

    def __len__(self) -> int:
        return len(self.image_ids)


# --- CheXmask run-length encoding --------------------------------------------------

def rle_decode(rle: str, height: int, width: int) -> np.ndarray:
    """CheXmask RLE text -> bool [height, width].

    The text is space-separated ``start length`` pairs; starts are 1-based indices into the
    row-major (C-order) flattening. Empty text (or None / NaN) is an empty mask. Raises
    ValueError for an odd count, a non-integer, a start below 1, a negative length, or a
    run that ends past the mask.
    """
    n = int(height) * int(width)
    if rle is None or (isinstance(rle, float) and math.isnan(rle)) or not str(rle).strip():
        return np.zeros((height, width), bool)
    try:
        values = np.array(str(rle).split(), dtype=np.int64)
    except ValueError:
        raise ValueError("RLE holds a value that is not an integer") from None
    if values.size % 2:
        raise ValueError(f"RLE has {values.size} numbers, expected start/length pairs")
    starts, lengths = values[0::2] - 1, values[1::2]
    if (starts < 0).any() or (lengths < 0).any():
        raise ValueError("RLE has a start below 1 or a negative length")
    ends = starts + lengths
    if ends.max() > n:
        k = int(np.argmax(ends > n))
        raise ValueError(f"RLE run '{starts[k] + 1} {lengths[k]}' ends at pixel {ends[k]}, past the end of the "
                         f"{height} x {width} mask ({n} pixels)")
    edges = np.zeros(n + 1, np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    return (np.cumsum(edges[:-1]) > 0).reshape(height, width)


def rle_encode(mask: np.ndarray) -> str:
    """bool [H, W] (any value > 0 is foreground) -> CheXmask RLE text (see :func:`rle_decode`)."""
    flat = (np.asarray(mask) > 0).ravel(order="C").astype(np.int8)
    change = np.diff(np.concatenate([[0], flat, [0]]))
    starts, ends = np.nonzero(change == 1)[0], np.nonzero(change == -1)[0]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts, ends))


# --- small shared helpers ----------------------------------------------------------

def _read_mask(path: Path) -> np.ndarray:
    """A mask image (PNG, GIF, ...: grey, 16-bit, palette or colour) -> bool [H, W], value > 0 inside."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA"):
                im = im.convert("RGB")
            arr = np.asarray(im)
    except FileNotFoundError:
        raise RealSetError(path, "mask file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise RealSetError(path, f"not a readable mask image ({err})") from None
    if arr.ndim == 3:  # colour: any colour channel > 0 (alpha ignored)
        arr = arr[..., :3].max(axis=-1) if arr.shape[-1] >= 3 else arr[..., 0]
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise RealSetError(path, f"mask has an unsupported layout {arr.shape}")
    return arr > 0


def _read_image(path: Path) -> np.ndarray:
    """`read_radiograph`, its errors as `RealSetError`: float32 [H, W] in [0, 1], white = dense."""
    try:
        return read_radiograph(path)
    except RadiographError as err:
        raise RealSetError(path, err.problem) from None


def _check_same_shape(mask_path: Path, mask: np.ndarray, image_shape: tuple[int, int]) -> None:
    if mask.shape != tuple(image_shape):
        raise RealSetError(mask_path, f"mask is {mask.shape[0]} x {mask.shape[1]} pixels but its image is "
                                      f"{image_shape[0]} x {image_shape[1]}")


def _folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise RealSetError(path, f"not a folder; expected {what}")
    return path


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Visible files of ``folder`` whose suffix (any case) is one of ``suffixes``, sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes)


def _by_stem(files: list[Path]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in files:
        if p.stem in out:
            raise RealSetError(p, f"two files share the stem {p.stem!r} ({out[p.stem].name} and {p.name})")
        out[p.stem] = p
    return out


def _centroid_col(mask: np.ndarray) -> float | None:
    cols = np.nonzero(mask.any(axis=0))[0]
    if cols.size == 0:
        return None
    return float((mask.sum(axis=0) * np.arange(mask.shape[1])).sum() / mask.sum())


def _sides(named_left: np.ndarray, named_right: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool | None]:
    """Two lung masks a source calls left and right -> (patient's left, patient's right, agreed).

    The mask whose centroid lies further to the image's right is the patient's left lung.
    ``agreed``: whether that matches the source's names (None when a mask is empty: names kept).
    """
    a, b = _centroid_col(named_left), _centroid_col(named_right)
    if a is None or b is None or a == b:
        return named_left, named_right, None
    return (named_left, named_right, True) if a > b else (named_right, named_left, False)


def _side_note(label: str, agreed: list[bool | None], ids: list[str]) -> str:
    """One note saying how often the source's 'left' lung lay on the image's right."""
    n_true = sum(a is True for a in agreed)
    n_false = [i for a, i in zip(agreed, ids) if a is False]
    n_none = [i for a, i in zip(agreed, ids) if a is None]
    decided = n_true + len(n_false)
    note = f"{label} lies on the image's right in {n_true} of {decided} images: read as the patient's left lung"
    if n_false:
        note += (f"; in {len(n_false)} ({', '.join(n_false[:5])}{', ...' if len(n_false) > 5 else ''}) it lies "
                 f"on the image's left: there the two masks were swapped (the one on the image's right is the "
                 f"patient's left lung)")
    if n_none:
        note += f"; {len(n_none)} with an empty lung mask kept the source's names"
    return note


# --- readers: list_items() checks every file without reading pixels; read() reads one item ---

@dataclass
class _Item:
    """One image of a set as listed: where its image and masks are (no pixels)."""

    image_id: str
    image: Path | None  # None: masks only (CheXmask without images)
    masks: dict[str, Any]  # structure -> source (a path, RLE text, polygon); missing: not annotated
    shape: tuple[int, int] | None = None  # (H, W) where the listing knows it
    info: dict = field(default_factory=dict)


class _Reader:
    """Base of the per-format readers."""

    name = ""
    spacing_mm: float | None = None

    def __init__(self, manifest: Path, root: Path, options: dict):
        self.manifest, self.root, self.options = manifest, root, options
        self.notes: list[str] = []

    def path(self, key: str) -> Path:
        """An option holding a path, resolved against the root (``$VARS``, ``pkg:``, absolute allowed)."""
        try:
            return resolve_path(str(self.options[key]), self.manifest, self.root)
        except ManifestError as err:
            raise RealSetError(self.manifest, f"options.{key}: {err}") from None

    def structures(self, items: list[_Item]) -> list[str]:
        return list(STRUCTURES_OF[self.name])

    def list_items(self) -> list[_Item]:
        raise NotImplementedError

    def read(self, item: _Item) -> tuple[np.ndarray | None, tuple[int, int], dict[str, np.ndarray]]:
        """-> (image float32 [H, W] or None, (H, W), {structure: bool [h, w] covering the image})."""
        raise NotImplementedError

    def spacing(self, item: _Item) -> float | None:
        return self.spacing_mm

    def finish(self, items: list[_Item]) -> None:
        """Add the notes that need every image read."""


JSRT_SIDE = 2048
JSRT_BYTES = JSRT_SIDE * JSRT_SIDE * 2
#: registry name -> SCR mask folder
SCR_FOLDERS = {"lung_field_left": "left lung", "lung_field_right": "right lung", "heart": "heart",
               "clavicula_left": "left clavicle", "clavicula_right": "right clavicle"}


class _JSRT(_Reader):
    """JSRT raw images with the SCR masks (``left lung`` is the patient's left)."""

    name = "jsrt"
    spacing_mm = 0.175

    def _mask_files(self, masks_dir: Path, folder: str) -> dict[str, Path]:
        dirs = sorted(masks_dir.glob(f"fold*/masks/{folder}")) + [masks_dir / "masks" / folder, masks_dir / folder]
        found: dict[str, Path] = {}
        for d in (d for d in dirs if d.is_dir()):
            for p in _files(d, (".gif", ".png")):
                if p.stem in found:
                    raise RealSetError(p, f"a second {folder!r} mask for {p.stem} (the first: {found[p.stem]})")
                found[p.stem] = p
        return found

    def list_items(self) -> list[_Item]:
        images = _folder(self.path("images_dir"), "JSRT's All247images/ with the .IMG files")
        masks_dir = _folder(self.path("masks_dir"), "SCR's scratch/ with fold1/masks/ and fold2/masks/")
        files = _files(images, (".img",))
        if not files:
            raise RealSetError(images, "holds no .IMG file")
        for p in files:
            n = p.stat().st_size
            if n != JSRT_BYTES:
                raise RealSetError(p, f"{n:,} bytes, expected {JSRT_BYTES:,} (2048 x 2048 big-endian 16-bit, "
                                      f"no header): truncated or not a JSRT image")
        masks = {s: self._mask_files(masks_dir, folder) for s, folder in SCR_FOLDERS.items()}
        stems = {p.stem for p in files}
        for s, folder in SCR_FOLDERS.items():
            for p in files:
                if p.stem not in masks[s]:
                    fold = (f"fold{2 - int(p.stem[-3:]) % 2}" if p.stem[-3:].isdigit() else "fold?")
                    raise RealSetError(masks_dir / fold / "masks" / folder / f"{p.stem}.gif",
                                       f"missing: the SCR {folder!r} mask of {p.name}")
        orphans = sorted(set().union(*masks.values()) - stems)
        if orphans:
            self.notes.append(f"JSRT: {len(orphans)} SCR masks without an image were ignored "
                              f"({', '.join(orphans[:5])})")
        self.notes.append("JSRT: raw 12-bit values inverted (4095 - raw) so that dense is white; SCR masks "
                          "(1024 x 1024, 0.35 mm) resampled onto the 2048 x 2048 image's letterbox; "
                          "'left lung' / 'left clavicle' read as the patient's left")
        return [_Item(p.stem, p, {s: masks[s][p.stem] for s in SCR_FOLDERS}) for p in files]

    def read(self, item):
        raw = np.fromfile(item.image, dtype=">u2")
        if raw.size * 2 != JSRT_BYTES:
            raise RealSetError(item.image, f"{raw.size * 2:,} bytes, expected {JSRT_BYTES:,}")
        image = (4095 - np.clip(raw.reshape(JSRT_SIDE, JSRT_SIDE), 0, 4095)).astype(np.float32) / 4095.0
        masks = {}
        for s, path in item.masks.items():
            m = _read_mask(path)
            if m.shape not in ((1024, 1024), (JSRT_SIDE, JSRT_SIDE)):
                raise RealSetError(path, f"mask is {m.shape[0]} x {m.shape[1]} pixels, expected 1024 x 1024 (SCR) "
                                         f"or 2048 x 2048 like its image")
            masks[s] = m
        return image, (JSRT_SIDE, JSRT_SIDE), masks


class _Montgomery(_Reader):
    """Montgomery County PNGs with ``leftMask`` / ``rightMask``, sides checked per image."""

    name = "montgomery"
    spacing_mm = 0.0875

    def __init__(self, *args):
        super().__init__(*args)
        self.agreed: list[bool | None] = []

    def list_items(self) -> list[_Item]:
        images = _folder(self.path("images_dir"), "Montgomery's CXR_png/ with the PNG radiographs")
        masks_dir = _folder(self.path("masks_dir"), "Montgomery's ManualMask/ with leftMask/ and rightMask/")
        sides = {"leftMask": _folder(masks_dir / "leftMask", "the leftMask/ PNGs"),
                 "rightMask": _folder(masks_dir / "rightMask", "the rightMask/ PNGs")}
        files = _files(images, (".png",))
        if not files:
            raise RealSetError(images, "holds no .png file")
        items = []
        for p in files:
            masks = {}
            for side, d in sides.items():
                if not (d / p.name).is_file():
                    raise RealSetError(d / p.name, f"missing: the {side} of {p.name}")
                masks[side] = d / p.name
            items.append(_Item(p.stem, p, masks))
        return items

    def read(self, item):
        image = _read_image(item.image)
        named = {}
        for side, path in item.masks.items():
            named[side] = _read_mask(path)
            _check_same_shape(path, named[side], image.shape)
        left, right, agreed = _sides(named["leftMask"], named["rightMask"])
        self.agreed.append(agreed)
        return image, image.shape, {"lung_field_left": left, "lung_field_right": right}

    def finish(self, items):
        self.notes.append(_side_note("Montgomery: leftMask", self.agreed, [i.image_id for i in items]))


def _split_lungs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Both lungs in one bool [H, W] -> (image-left part, image-right part, split at the midline).

    Connected components go to the side of the image's vertical midline their centroid lies on;
    when they all lie on one side (the lungs touch), the mask is split at the midline column of its
    bounding box instead.
    """
    from scipy import ndimage

    labels, k = ndimage.label(mask)
    if k == 0:
        return mask.copy(), mask.copy(), False
    cols = np.array([c for _, c in ndimage.center_of_mass(mask, labels, range(1, k + 1))])
    on_left = np.concatenate([[False], cols < (mask.shape[1] - 1) / 2])  # label 0 is background
    left = on_left[labels]
    if left.any() and (mask & ~left).any():
        return left, mask & ~left, False
    used = np.nonzero(mask.any(axis=0))[0]
    split = (int(used[0]) + int(used[-1]) + 1) // 2
    left = mask.copy()
    left[:, split:] = False
    return left, mask & ~left, True


class _Shenzhen(_Reader):
    """Shenzhen PNGs with the separately released ``<stem>_mask.png`` (both lungs in one mask)."""

    name = "shenzhen"

    def __init__(self, *args):
        super().__init__(*args)
        self.midline_splits: list[str] = []

    def list_items(self) -> list[_Item]:
        images = _folder(self.path("images_dir"), "Shenzhen's CXR_png/ with the PNG radiographs")
        masks_dir = _folder(self.path("masks_dir"), "the Shenzhen lung-mask release's mask/ folder")
        files = _files(images, (".png",))
        if not files:
            raise RealSetError(images, "holds no .png file")
        masks = {p.stem.removesuffix("_mask"): p for p in _files(masks_dir, (".png",))}
        kept = [p for p in files if p.stem in masks]
        if not kept:
            raise RealSetError(masks_dir, f"holds no <stem>_mask.png for any of the {len(files)} images in {images}")
        skipped = [p.stem for p in files if p.stem not in masks]
        if skipped:
            self.notes.append(f"Shenzhen: {len(skipped)} of {len(files)} images have no lung mask and were left out "
                              f"({', '.join(skipped[:5])}{', ...' if len(skipped) > 5 else ''})")
        orphans = sorted(set(masks) - {p.stem for p in files})
        if orphans:
            self.notes.append(f"Shenzhen: {len(orphans)} masks without an image were ignored "
                              f"({', '.join(orphans[:5])})")
        return [_Item(p.stem, p, {"lungs": masks[p.stem]}) for p in kept]

    def read(self, item):
        image = _read_image(item.image)
        path = item.masks["lungs"]
        mask = _read_mask(path)
        _check_same_shape(path, mask, image.shape)
        image_left, image_right, split = _split_lungs(mask)
        if split:
            self.midline_splits.append(item.image_id)
        return image, image.shape, {"lung_field_right": image_left, "lung_field_left": image_right}

    def finish(self, items):
        note = ("Shenzhen: each mask split into connected components, each assigned by its centroid's side of the "
                "image's midline (the image's left = the patient's right lung)")
        if self.midline_splits:
            ids = self.midline_splits
            note += (f"; in {len(ids)} of {len(items)} the lungs touch and the mask was split at the midline column of "
                     f"its bounding box ({', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''})")
        self.notes.append(note)


CHEXMASK_IDS = ("image_id", "dicom_id", "Path", "Image Index", "ImageID")
CHEXMASK_MASKS = {"Left Lung": "lung_field_left", "Right Lung": "lung_field_right", "Heart": "heart"}
CHEXMASK_DICE = "Dice RCA (Mean)"


class _CheXmask(_Reader):
    """One CheXmask CSV: RLE masks of the lungs and heart, optionally with the original images."""

    name = "chexmask"

    def __init__(self, *args):
        super().__init__(*args)
        self.agreed: list[bool | None] = []
        self.swapped: list[str] = []

    def _table(self, csv: Path):
        import pandas as pd

        wanted = set(CHEXMASK_IDS) | set(CHEXMASK_MASKS) | {CHEXMASK_DICE, "Height", "Width"}
        try:
            table = pd.read_csv(csv, usecols=lambda c: c in wanted, dtype={c: str for c in CHEXMASK_IDS})
        except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
            raise RealSetError(csv, f"not a readable CheXmask CSV ({err})") from None
        ids = [c for c in CHEXMASK_IDS if c in table.columns]
        if not ids:
            raise RealSetError(csv, f"has no image id column (one of {', '.join(CHEXMASK_IDS)})")
        needed = [c for c in (*CHEXMASK_MASKS, "Height", "Width") if c not in table.columns]
        if self.options["min_dice"] is not None and CHEXMASK_DICE not in table.columns:
            needed.append(CHEXMASK_DICE)
        if needed:
            raise RealSetError(csv, f"lacks the column(s) {', '.join(repr(c) for c in needed)}")
        return table, ids[0]

    def _filter(self, csv: Path, table):
        min_dice = self.options["min_dice"]
        if min_dice is None:
            self.notes.append(f"CheXmask: no quality filter; all {len(table)} rows kept")
            return table
        keep = table[CHEXMASK_DICE].astype(float) >= float(min_dice)
        self.notes.append(f"CheXmask: kept {int(keep.sum())} of {len(table)} rows with {CHEXMASK_DICE} >= {min_dice} "
                          f"(dropped {int((~keep).sum())})")
        if not keep.any():
            raise RealSetError(csv, f"no row has {CHEXMASK_DICE} >= {min_dice}")
        return table[keep]

    def _image_path(self, images: Path, image_id: str) -> Path:
        direct = images / image_id
        if direct.is_file():
            return direct
        for suffix in (".png", ".jpg", ".jpeg", ".dcm", ".dicom"):
            if (images / f"{image_id}{suffix}").is_file():
                return images / f"{image_id}{suffix}"
        raise RealSetError(direct, f"missing: the image of CheXmask row {image_id!r}")

    def list_items(self) -> list[_Item]:
        if self.options["csv"] is None:
            raise RealSetError(self.manifest, "the chexmask reader needs options.csv "
                                              "(the CheXmask CSV, relative to root)")
        csv = self.path("csv")
        if not csv.is_file():
            raise RealSetError(csv, "CheXmask CSV not found")
        table, id_col = self._table(csv)
        table = self._filter(csv, table)
        duplicated = table[id_col][table[id_col].duplicated()]
        if len(duplicated):
            raise RealSetError(csv, f"image id {duplicated.iloc[0]!r} appears in more than one row")
        images = None
        if self.options["images_dir"]:
            images = _folder(self.path("images_dir"), "the images of the CheXmask CSV")
        empty = 0
        items = []
        for row in table.to_dict("records"):
            items.append(self._item(csv, images, row, id_col))
            empty += len(CHEXMASK_MASKS) - len(items[-1].masks)
        if empty:
            self.notes.append(f"CheXmask: {empty} empty mask cells read as not annotated")
        return items

    def _item(self, csv: Path, images: Path | None, row: dict, id_col: str) -> _Item:
        image_id = str(row[id_col])
        try:
            h, w = int(row["Height"]), int(row["Width"])
        except (TypeError, ValueError):
            h = w = 0
        if h < 1 or w < 1:
            raise RealSetError(csv, f"row {image_id!r}: Height {row['Height']!r} / Width {row['Width']!r} "
                                    f"are not positive integers")
        masks = {s: row[col] for col, s in CHEXMASK_MASKS.items()
                 if isinstance(row[col], str) and row[col].strip()}
        image = self._image_path(images, image_id) if images is not None else None
        return _Item(image_id, image, masks, (h, w), {"csv": csv})

    def read(self, item):
        h, w = item.shape
        image = None
        if item.image is not None:
            image = _read_image(item.image)
            if image.shape == (w, h) and h != w:
                self.swapped.append(item.image_id)
                h, w = w, h
            elif image.shape != (h, w):
                raise RealSetError(item.image, f"image is {image.shape[0]} x {image.shape[1]} pixels but its CheXmask "
                                               f"row in {item.info['csv'].name} says Height {h}, Width {w} (nor "
                                               f"swapped); use the OriginalResolution CSV with the original images")
        masks = {}
        for s, rle in item.masks.items():
            column = next(c for c, t in CHEXMASK_MASKS.items() if t == s)
            try:
                masks[s] = rle_decode(rle, h, w)
            except ValueError as err:
                raise RealSetError(item.info["csv"], f"row {item.image_id!r}, column {column!r}: {err}") from None
        if LUNGS[0] in masks and LUNGS[1] in masks:
            masks[LUNGS[0]], masks[LUNGS[1]], agreed = _sides(masks[LUNGS[0]], masks[LUNGS[1]])
            self.agreed.append(agreed)
        return image, (h, w), masks

    def finish(self, items):
        ids = [i.image_id for i in items if LUNGS[0] in i.masks and LUNGS[1] in i.masks]
        self.notes.append(_side_note("CheXmask: 'Left Lung'", self.agreed, ids))
        if self.swapped:
            self.notes.append(f"CheXmask: {len(self.swapped)} rows had Height and Width swapped against their image "
                              f"and were read at the image's shape ({', '.join(self.swapped[:5])})")
        if items and items[0].image is None:
            self.notes.append("CheXmask: no images_dir: masks only, at each row's Height x Width")


RIB_KEYS = {f"{side}{k}": f"rib_{'right' if side == 'R' else 'left'}_{k}" for side in "RL" for k in range(1, 11)}


class _VinDrRibCXR(_Reader):
    """VinDr-RibCXR polygons of 20 ribs (``R`` = the patient's right), filled on the image grid."""

    name = "vindr_ribcxr"

    def _json(self, split: str) -> Path:
        name = f"Vindr_RibCXR_{split}_mask.json"
        if self.options["json_dir"]:
            candidates = [self.path("json_dir") / name]
        else:
            candidates = [self.root / name, self.root / "data" / name, self.root / "data" / split / name]
        for c in candidates:
            if c.is_file():
                return c
        raise RealSetError(candidates[0], f"missing: the {split} annotations (also looked in "
                                          f"{', '.join(str(c.parent) for c in candidates[1:]) or 'nowhere else'})")

    def _image(self, json_path: Path, split: str, text: str) -> Path:
        rel = Path(str(text))
        candidates = [self.root / rel, json_path.parent / rel, self.root / "data" / split / "img" / rel,
                      self.root / "data" / split / "img" / rel.name]
        for c in candidates:
            if c.is_file():
                return c
        raise RealSetError(json_path, f"image {text!r} not found (looked for {candidates[0]} and under "
                                      f"{self.root / 'data' / split / 'img'})")

    @staticmethod
    def _polygon(json_path: Path, key: str, rib: str, value) -> list[tuple[float, float]] | None:
        if value is None or (isinstance(value, str) and value.strip() == "None"):
            return None
        try:
            points = [(float(p["x"]), float(p["y"])) for p in value]
        except (TypeError, KeyError, ValueError):
            raise RealSetError(json_path, f"row {key}, {rib}: expected a list of {{'x': .., 'y': ..}} points or "
                                          f"'None', got {str(value)[:60]!r}") from None
        if len(points) < 3 or not all(math.isfinite(v) for p in points for v in p):
            raise RealSetError(json_path, f"row {key}, {rib}: a polygon needs at least 3 finite points")
        return points

    def _split_items(self, split: str) -> list[_Item]:
        path = self._json(split)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise RealSetError(path, f"not readable JSON ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("img"), dict):
            raise RealSetError(path, "expected column-oriented JSON with an 'img' column")
        missing = [k for k in RIB_KEYS if not isinstance(data.get(k), dict)]
        if missing:
            raise RealSetError(path, f"lacks the rib column(s) {', '.join(missing)}")
        items = []
        for key, text in data["img"].items():
            image = self._image(path, split, text)
            masks = {}
            for rib, name in RIB_KEYS.items():
                if key not in data[rib]:
                    raise RealSetError(path, f"row {key} ({text}) has no {rib} entry")
                polygon = self._polygon(path, key, rib, data[rib][key])
                if polygon is not None:
                    masks[name] = polygon
            items.append(_Item(image.stem, image, masks, info={"json": path, "row": key}))
        return items

    def list_items(self) -> list[_Item]:
        splits = self.options["splits"]
        if isinstance(splits, str) or not splits:
            raise RealSetError(self.manifest, f"options.splits must be a list of split names, got {splits!r}")
        items = [item for split in splits for item in self._split_items(str(split))]
        missing = sum(len(RIB_KEYS) - len(i.masks) for i in items)
        self.notes.append(f"VinDr-RibCXR: R1-R10 read as the patient's right ribs (rib_right_k), L1-L10 as the left; "
                          f"{missing} ribs marked 'None' are not annotated")
        return items

    def read(self, item):
        from PIL import Image, ImageDraw

        image = _read_image(item.image)
        h, w = image.shape
        masks = {}
        for name, points in item.masks.items():
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            if min(xs) < -0.05 * w or max(xs) > 1.05 * w or min(ys) < -0.05 * h or max(ys) > 1.05 * h:
                raise RealSetError(item.info["json"], f"row {item.info['row']}, {name}: the polygon reaches outside "
                                                      f"the {h} x {w} image {item.image.name} (was it resized?)")
            canvas = Image.new("L", (w, h), 0)
            ImageDraw.Draw(canvas).polygon(points, fill=1, outline=1)
            masks[name] = np.asarray(canvas) > 0
        return image, (h, w), masks


class _Folder(_Reader):
    """Any folder of images with ``masks/<registry name>/<image stem>.png``."""

    name = "folder"

    def list_items(self) -> list[_Item]:
        images_dir = _folder(self.path("images_dir"), "a folder of radiographs (PNG, JPEG, TIFF, DICOM)")
        masks_dir = _folder(self.path("masks_dir"), "one subfolder of masks per registry structure")
        images = _by_stem([p for p in sorted(images_dir.iterdir())
                           if p.is_file() and not p.name.startswith(".")
                           and (p.suffix.lower() in IMAGE_SUFFIXES or p.suffix == "")])
        if not images:
            raise RealSetError(images_dir, "holds no image file")
        registry = load_registry()
        folders = sorted(d for d in masks_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
        for d in folders:
            try:
                registry.get(d.name)
            except UnknownStructureError as err:
                raise RealSetError(d, f"mask folder of an unknown structure: {err}") from None
        if not folders:
            raise RealSetError(masks_dir, "holds no mask folder (masks/<registry name>/<image stem>.png)")
        self.present = [s for s in registry.names if s in {d.name for d in folders}]
        masks = {d.name: _by_stem(_files(d, IMAGE_SUFFIXES)) for d in folders}
        orphans = sorted(f"{s}/{stem}" for s, found in masks.items() for stem in found if stem not in images)
        if orphans:
            self.notes.append(f"folder: {len(orphans)} masks without an image were ignored ({', '.join(orphans[:5])})")
        missing = sum(stem not in masks[s] for s in masks for stem in images)
        self.notes.append(f"folder: {len(images)} images, {len(masks)} structures; {missing} image-structure "
                          f"pairs without a mask file are not annotated")
        return [_Item(stem, p, {s: masks[s][stem] for s in masks if stem in masks[s]}) for stem, p in images.items()]

    def structures(self, items):
        return list(self.present)

    def read(self, item):
        image = _read_image(item.image)
        masks = {}
        for s, path in item.masks.items():
            masks[s] = _read_mask(path)
            _check_same_shape(path, masks[s], image.shape)
        return image, image.shape, masks

    def spacing(self, item):
        if self.options["pixel_spacing_mm"] is not None:
            return float(self.options["pixel_spacing_mm"])
        return _dicom_spacing(item.image)


def _dicom_spacing(path: Path) -> float | None:
    """A DICOM file's square (Imager) Pixel Spacing in mm; None for other files or unequal spacings."""
    if path.suffix.lower() not in (".dcm", ".dicom", ""):
        return None
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception:  # noqa: BLE001  NOTE: not DICOM: no spacing; the image read reports real problems
        return None
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and len(value) == 2 and float(value[0]) == float(value[1]) > 0:
            return float(value[0])
    return None


READERS: dict[str, type[_Reader]] = {r.name: r for r in (_JSRT, _Montgomery, _Shenzhen, _CheXmask, _VinDrRibCXR,
                                                           _Folder)}


# --- manifest and set loader -------------------------------------------------------

def load_real_manifest(manifest: str | Path) -> dict:
    """Read and check a real-set manifest (no data file is touched except the root folder).

    Returns {"name", "reader", "root" (Path, resolved), "options" (the reader's options, defaults
    filled in), "limit" (int or None), "source" (name, reader, root, licence, origin, description,
    notes, manifest)}. Raises `RealSetError` naming the manifest for an unreadable file, an unknown
    or missing key, an unknown reader or option, or a root that is not a folder.
    """
    import yaml

    path = Path(manifest).resolve()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise RealSetError(path, f"cannot read the manifest ({err})") from None
    if not isinstance(data, dict):
        raise RealSetError(path, "expected a mapping with name, reader and root")
    for key in data:
        if key not in MANIFEST_KEYS:
            raise RealSetError(path, f"unknown key {key!r}; allowed: {', '.join(MANIFEST_KEYS)}")
    for key in ("name", "reader", "root"):
        if not data.get(key):
            raise RealSetError(path, f"missing the required key {key!r}")
    reader = str(data["reader"])
    if reader not in READERS:
        raise RealSetError(path, f"unknown reader {reader!r}; one of {', '.join(READERS)}")
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise RealSetError(path, f"options must be a mapping, got {options!r}")
    for key in options:
        if key not in READER_OPTIONS[reader]:
            raise RealSetError(path, f"unknown option {key!r} of the {reader} reader; allowed: "
                                     f"{', '.join(READER_OPTIONS[reader])}")
    limit = data.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise RealSetError(path, f"limit must be a positive integer, got {limit!r}")
    try:
        root = resolve_path(str(data["root"]), path, path.parent)
    except ManifestError as err:
        raise RealSetError(path, f"root: {err}") from None
    if not root.is_dir():
        raise RealSetError(path, f"root {root} is not a folder (download the set there, or edit root)")
    source = {"name": str(data["name"]), "reader": reader, "root": str(root), "licence": data.get("licence"),
              "origin": data.get("origin"), "description": data.get("description"), "notes": data.get("notes"),
              "manifest": str(path)}
    return {"name": str(data["name"]), "reader": reader, "root": root,
            "options": {**READER_OPTIONS[reader], **options}, "limit": limit, "source": source}


def _list_items(reader: _Reader) -> list[_Item]:
    items = sorted(reader.list_items(), key=lambda i: i.image_id)
    for a, b in zip(items, items[1:]):
        if a.image_id == b.image_id:
            raise RealSetError(b.image or reader.manifest, f"image id {b.image_id!r} appears twice "
                                                           f"(also {a.image or 'an earlier row'})")
    return items


def read_real_set(manifest: str | Path, size: int = 256, limit: int | None = None,
                  progress: bool = True) -> RealSet:
    """Read a real set described by a manifest, letterboxed to ``size`` pixels.

    Every file of the set is listed and checked (presence, JSRT byte sizes, CSV and JSON
    contents) before any pixel is read; then each image and its masks are read, letterboxed and
    dropped, so no full-resolution array is kept. ``limit`` (default: the manifest's ``limit``)
    keeps the first ``limit`` images in sorted id order; the whole set is still checked. Any bad
    file raises `RealSetError` naming it, and nothing is returned. Arrays: see :class:`RealSet`.
    """
    from tqdm.auto import tqdm

    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    spec = load_real_manifest(manifest)
    reader = READERS[spec["reader"]](Path(spec["source"]["manifest"]), spec["root"], spec["options"])
    items = _list_items(reader)
    limit = limit if limit is not None else spec["limit"]
    if limit is not None and limit < len(items):
        reader.notes.append(f"limit: the first {limit} of {len(items)} images (sorted ids) were read")
        items = items[:limit]
    structures = reader.structures(items)
    channel = {s: k for k, s in enumerate(structures)}
    n = len(items)
    with_images = items[0].image is not None
    images = np.zeros((n, size, size), np.float32) if with_images else None
    masks = np.zeros((n, len(structures), size, size), bool)
    annotated = np.zeros((n, len(structures)), bool)
    boxes, shapes, spacings = [], [], []
    for k, item in enumerate(tqdm(items, desc=f"reading {spec['name']}", unit="image", disable=not progress)):
        image, shape, item_masks = reader.read(item)
        if image is not None:
            images[k], lb = letterbox(image, size)
        else:
            lb = letterbox_geometry(*shape, size)
        for s, m in item_masks.items():
            masks[k, channel[s]] = lb.mask_to_square(m)
            annotated[k, channel[s]] = True
        boxes.append(lb)
        shapes.append((int(shape[0]), int(shape[1])))
        spacings.append(reader.spacing(item))
    reader.finish(items)
    return RealSet(spec["name"], spec["reader"], [i.image_id for i in items], structures, images, masks,
                   annotated, boxes, shapes, spacings, reader.notes, spec["source"])
