"""Small synthetic chest CTs with TotalSegmentator-style labels, for tests.

The phantom is a body (elliptic cylinder of soft tissue) in air, with two
lungs (ellipsoids made of lobe labels), a heart (sphere left of centre and
anterior) and a spine (cylinder, posterior, split into thoracic vertebrae).
World coordinates are RAS+ in mm with the volume centre at the origin:
+x = patient's right, +y = anterior, +z = superior. Label ids are the
registry's `total` ids, so the patient's left lung (x < 0) holds ids 10/11.

Used by the CT loading tests and by the projection tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# HU of each tissue
HU_AIR, HU_LUNG, HU_SOFT, HU_BONE = -1000.0, -850.0, 40.0, 700.0

LOBES_LEFT = {"lung_upper_lobe_left": 10, "lung_lower_lobe_left": 11}
LOBES_RIGHT = {"lung_upper_lobe_right": 12, "lung_middle_lobe_right": 13, "lung_lower_lobe_right": 14}
HEART = 51
VERTEBRAE = {"vertebrae_T1": 43, "vertebrae_T2": 42, "vertebrae_T3": 41,
             "vertebrae_T4": 40, "vertebrae_T5": 39, "vertebrae_T6": 38}  # top to bottom
ID_TO_NAME = {i: n for n, i in {**LOBES_LEFT, **LOBES_RIGHT, "heart": HEART, **VERTEBRAE}.items()}


@dataclass
class Phantom:
    volume: np.ndarray  # float32 [X, Y, Z] HU, RAS+ voxel axes
    labelmap: np.ndarray  # uint8 [X, Y, Z], registry `total` ids, 0 = background
    affine: np.ndarray  # float64 [4, 4] voxel -> RAS+ mm


def make_phantom(shape: tuple[int, int, int] = (64, 64, 48),
                 spacing: tuple[float, float, float] = (2.0, 2.0, 2.5)) -> Phantom:
    """The phantom as arrays (no files). Extents scale with the field of view."""
    shape = tuple(int(s) for s in shape)
    spacing_arr = np.asarray(spacing, dtype=float)
    affine = np.diag([*spacing_arr, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing_arr  # centre voxel at the origin
    half = np.asarray(shape) * spacing_arr / 2  # half field of view (mm)
    x, y, z = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, spacing_arr)],
                          indexing="ij")
    volume = np.full(shape, HU_AIR, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    body = (x / (0.85 * half[0])) ** 2 + (y / (0.7 * half[1])) ** 2 <= 1
    volume[body] = HU_SOFT
    for side in (-1, 1):  # -1: patient's left (x < 0)
        cx = side * 0.38 * half[0]
        lung = (((x - cx) / (0.28 * half[0])) ** 2 + ((y - 0.05 * half[1]) / (0.45 * half[1])) ** 2
                + (z / (0.75 * half[2])) ** 2) <= 1
        volume[lung] = HU_LUNG
        if side < 0:
            labels[lung & (z >= 0)] = LOBES_LEFT["lung_upper_lobe_left"]
            labels[lung & (z < 0)] = LOBES_LEFT["lung_lower_lobe_left"]
        else:
            labels[lung & (z >= 0.2 * half[2])] = LOBES_RIGHT["lung_upper_lobe_right"]
            labels[lung & (z < 0.2 * half[2]) & (z >= -0.2 * half[2])] = LOBES_RIGHT["lung_middle_lobe_right"]
            labels[lung & (z < -0.2 * half[2])] = LOBES_RIGHT["lung_lower_lobe_right"]
    r = 0.22 * min(half)
    heart = ((x + 0.12 * half[0]) ** 2 + (y - 0.2 * half[1]) ** 2 + (z + 0.2 * half[2]) ** 2) <= r ** 2
    volume[heart] = HU_SOFT
    labels[heart] = HEART
    spine = (x ** 2 + (y + 0.45 * half[1]) ** 2) <= (0.12 * min(half[:2])) ** 2
    volume[spine] = HU_BONE
    band = np.clip(((half[2] - z) / (2 * half[2]) * len(VERTEBRAE)).astype(int), 0, len(VERTEBRAE) - 1)
    for k, vid in enumerate(VERTEBRAE.values()):
        labels[spine & (band == k)] = vid
    return Phantom(volume, labels, affine)


def _save(array: np.ndarray, affine: np.ndarray, path: Path, flip_x: bool) -> Path:
    import nibabel as nib

    if flip_x:  # store as L-A-S like the bundled example; same world geometry
        array = array[::-1]
        affine = affine @ np.array([[-1, 0, 0, array.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def make_phantom_case(tmp_path: Path, shape: tuple[int, int, int] = (64, 64, 48),
                      spacing: tuple[float, float, float] = (2.0, 2.0, 2.5),
                      name: str = "phantom", flip_x: bool = False) -> tuple[Path, Path]:
    """Write ``<name>_ct.nii.gz`` (int16 HU) and ``<name>_labels.nii.gz`` (uint8
    multilabel) into ``tmp_path``; returns ``(ct_path, label_path)``.
    ``flip_x`` stores both in L-A-S voxel order (the bundled CT's)."""
    ph = make_phantom(shape, spacing)
    tmp_path = Path(tmp_path)
    ct = _save(ph.volume.astype(np.int16), ph.affine, tmp_path / f"{name}_ct.nii.gz", flip_x)
    lab = _save(ph.labelmap, ph.affine, tmp_path / f"{name}_labels.nii.gz", flip_x)
    return ct, lab


def make_totalseg_folder(tmp_path: Path, shape: tuple[int, int, int] = (64, 64, 48),
                         spacing: tuple[float, float, float] = (2.0, 2.0, 2.5),
                         name: str = "phantom", extra_empty: tuple[str, ...] = ("liver", "rib_left_1"),
                         ) -> tuple[Path, Path]:
    """Write the CT plus a TotalSegmentator-style folder ``<name>_seg/`` with one
    binary uint8 NIfTI per structure (``heart.nii.gz``, ...; empty files for
    ``extra_empty``, as TotalSegmentator writes every class); returns
    ``(ct_path, folder)``."""
    ph = make_phantom(shape, spacing)
    tmp_path = Path(tmp_path)
    ct = _save(ph.volume.astype(np.int16), ph.affine, tmp_path / f"{name}_ct.nii.gz", False)
    folder = tmp_path / f"{name}_seg"
    folder.mkdir(exist_ok=True)
    for i, structure in ID_TO_NAME.items():
        _save((ph.labelmap == i).astype(np.uint8), ph.affine, folder / f"{structure}.nii.gz", False)
    for structure in extra_empty:
        _save(np.zeros(ph.labelmap.shape, np.uint8), ph.affine, folder / f"{structure}.nii.gz", False)
    return ct, folder


def make_dicom_series(tmp_path: Path, shape: tuple[int, int, int] = (32, 32, 12),
                      spacing: tuple[float, float, float] = (2.0, 2.0, 2.5),
                      name: str = "phantom_dicom", slope: float = 1.0, intercept: float = -1024.0,
                      shuffle: bool = True) -> tuple[Path, Phantom]:
    """Write the phantom as an axial CT DICOM series (one file per slice, stored
    values = (HU - intercept) / slope, written in shuffled order); returns
    ``(folder, phantom)``. Rows run anterior -> posterior, columns right -> left
    (the usual supine axial orientation), so the loader must reorient it."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ph = make_phantom(shape, spacing)
    folder = Path(tmp_path) / name
    folder.mkdir(exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    nx, ny, nz = shape
    # voxel (i, j, k) of the RAS array sits at RAS = affine @ (i, j, k); in LPS
    # that is (-x, -y, z). DICOM column c -> LPS +x (patient left) = RAS i
    # decreasing; row r -> LPS +y (posterior) = RAS j decreasing.
    order = np.random.default_rng(0).permutation(nz) if shuffle else np.arange(nz)
    for k in order:
        ras_first = ph.affine @ np.array([nx - 1, ny - 1, k, 1.0])  # pixel (r=0, c=0)
        lps = [-ras_first[0], -ras_first[1], ras_first[2]]
        hu = ph.volume[::-1, ::-1, k].T  # [rows = y reversed, cols = x reversed]
        stored = np.round((hu - intercept) / slope).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
        ds.PatientID = "PHANTOM"
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in lps]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]  # [row spacing, column spacing]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        pydicom.dcmwrite(folder / f"slice_{int(k):03d}.dcm", ds, enforce_file_format=True)
    return folder, ph
