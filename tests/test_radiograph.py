"""Reading radiographs (PNG, 16-bit PNG, DICOM MONOCHROME1/2) and letterboxing."""

from __future__ import annotations

import numpy as np
import pytest

from chexanatomy_lib.radiograph import RadiographError, letterbox, read_radiograph


def _write_dicom(path, pixels: np.ndarray, photometric: str, center=None, width=None,
                 slope=1.0, intercept=0.0, bits=12):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _ramp(h=16, w=20, top=4095):
    return np.tile(np.linspace(0, top, w).round().astype(np.uint16), (h, 1))


def test_dicom_monochrome1_is_inverted_after_the_window(tmp_path):
    raw = _ramp(w=64)
    # an asymmetric window [500, 1500]: inverting before windowing would differ
    _write_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2", center=1000, width=1000)
    _write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1", center=1000, width=1000)
    m2 = read_radiograph(tmp_path / "m2.dcm")
    m1 = read_radiograph(tmp_path / "m1.dcm")
    assert m2.dtype == np.float32 and m2.shape == raw.shape
    expect = np.clip((raw[0] - 999.5) / 999.0 + 0.5, 0, 1)  # DICOM LINEAR window
    np.testing.assert_allclose(m2[0], expect, atol=1e-6)
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    k = np.abs(raw[0].astype(float) - 1000).argmin()
    assert abs(m1[0, k] - 0.5) < 0.07  # inside the window, not saturated
    assert m1[0, -1] == 0.0  # the bright end of MONOCHROME1 raw values is dark


def test_dicom_without_window_uses_its_range_and_rescale(tmp_path):
    raw = _ramp(top=1000) + 500
    _write_dicom(tmp_path / "a.dcm", raw, "MONOCHROME2", slope=2.0, intercept=-100.0)
    img = read_radiograph(tmp_path / "a.dcm")
    assert img.min() == 0.0 and img.max() == 1.0
    np.testing.assert_allclose(img[0], (raw[0] - 500) / 1000.0, atol=1e-6)


def test_16bit_png_keeps_its_depth(tmp_path):
    from PIL import Image

    raw = _ramp(top=4095)  # 12-bit data in a 16-bit PNG
    raw[0, 1] = 1  # one grey level apart from its neighbour at 0
    Image.fromarray(raw).save(tmp_path / "x.png")
    img = read_radiograph(tmp_path / "x.png")
    assert img.max() == 1.0  # 12-bit range detected, not divided by 65535
    assert img[0, 1] == pytest.approx(1 / 4095)  # not collapsed to 8 bits
    full = np.tile(np.array([0, 65535], np.uint16), (4, 4))
    Image.fromarray(full).save(tmp_path / "y.png")
    assert read_radiograph(tmp_path / "y.png").max() == 1.0


def test_8bit_and_rgb(tmp_path):
    from PIL import Image

    g = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    Image.fromarray(g).save(tmp_path / "g.jpg", quality=100)
    Image.fromarray(np.repeat(g[..., None], 3, -1)).save(tmp_path / "c.png")
    np.testing.assert_allclose(read_radiograph(tmp_path / "c.png"), g / 255.0, atol=1e-6)
    assert np.abs(read_radiograph(tmp_path / "g.jpg") - g / 255.0).max() < 0.03


def test_bad_files_name_the_file(tmp_path):
    with pytest.raises(RadiographError, match="missing.png: file not found"):
        read_radiograph(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(RadiographError, match="junk.png: not a readable"):
        read_radiograph(tmp_path / "junk.png")
    (tmp_path / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x01\x02")
    with pytest.raises(RadiographError, match="bad.dcm"):
        read_radiograph(tmp_path / "bad.dcm")


@pytest.mark.parametrize("shape", [(300, 200), (150, 400)])
def test_letterbox_round_trip_maps_a_mask_back(shape):
    h, w = shape
    mask = np.zeros(shape, bool)
    mask[h // 5:h // 2, w // 3:w - w // 6] = True
    square, lb = letterbox(mask.astype(np.float32), 128)
    assert square.shape == (128, 128)
    back = lb.mask_to_original(square > 0.5)
    assert back.shape == shape
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.95
    # boxes map back too
    ys, xs = np.nonzero(square > 0.5)
    box = np.array([ys.min(), xs.min(), ys.max() + 1, xs.max() + 1]) / 128
    ob = lb.box_to_original(box)
    expect = np.array([h // 5 / h, (w // 3) / w, (h // 2) / h, (w - w // 6) / w])
    np.testing.assert_allclose(ob, expect, atol=2.5 * max(h, w) / 128 / min(h, w))
