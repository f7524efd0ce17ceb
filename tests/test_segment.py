"""`chexanatomy segment`: any radiograph in, masks + overlay + JSON out, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def vlm_checkpoint(tmp_path_factory):
    """A tiny (untrained) VLM checkpoint folder as chapter 3 writes it, with a small codec."""
    import torch

    from chexanatomy_lib.codec import MaskVQVAE, VQVAEConfig
    from chexanatomy_lib.vlm.model import build_tiny
    from chexanatomy_lib.vlm.predict import save_finetuned

    root = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    MaskVQVAE(VQVAEConfig(enc_channels=(8, 8, 16, 16), embedding_dim=16,
                          dec_channels=(16, 16, 8, 8, 8))).save(root / "vqvae")
    return save_finetuned(build_tiny("tiny", seed=0), root / "checkpoint", ["lung_left", "heart"], root / "vqvae")


def _png(path, h=90, w=140):
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8)).save(path)
    return path


def test_vlm_segment_writes_masks_overlay_and_json(vlm_checkpoint, tmp_path):
    from PIL import Image

    from chexanatomy_lib.segment import main_segment

    img = _png(tmp_path / "cxr.png")
    rec = main_segment(img, vlm_checkpoint, "left lung; cardiac silhouette", tmp_path / "out", device="cpu")
    out = tmp_path / "out"
    assert json.loads((out / "segmentation.json").read_text()) == rec
    assert [s["structure"] for s in rec["structures"]] == ["lung_left", "heart"]
    for s in rec["structures"]:
        mask = np.asarray(Image.open(out / s["mask"]))
        assert mask.shape == (90, 140)  # the original image's pixels, not the model's square
        assert set(np.unique(mask)) <= {0, 255}
        assert s["tokens"].count("<loc") == 4 and s["tokens"].count("<seg") == 16  # constrained: valid
        # an untrained model may put a box in the letterbox padding: then there is none
        if s["box"] is not None:
            assert all(0.0 <= v <= 1.0 for v in s["box"])
            assert s["box"][2] > s["box"][0] and s["box"][3] > s["box"][1]
        else:
            assert s["area_px"] == 0
    assert np.asarray(Image.open(out / "overlay.png")).shape == (90, 140, 3)


def test_unknown_structure_and_missing_checkpoint_are_clear_errors(vlm_checkpoint, tmp_path):
    from chexanatomy_lib.segment import SegmentError, main_segment
    from chexanatomy_lib.checkpoints import CheckpointError

    img = _png(tmp_path / "cxr.png")
    with pytest.raises(SegmentError, match="hart"):
        main_segment(img, vlm_checkpoint, "hart", tmp_path / "o1", device="cpu")
    with pytest.raises(SegmentError, match="not among this model's training targets"):
        main_segment(img, vlm_checkpoint, "right lung", tmp_path / "o2", device="cpu")
    with pytest.raises(CheckpointError, match="does not exist"):
        main_segment(img, tmp_path / "nowhere", "heart", tmp_path / "o3")
    with pytest.raises(SegmentError, match="no structures"):
        main_segment(img, vlm_checkpoint, " ; ", tmp_path / "o4")
    with pytest.raises(SegmentError, match="missing.png"):
        main_segment(tmp_path / "missing.png", vlm_checkpoint, "heart", tmp_path / "o5")


def test_unet_cards_are_dispatched_to_the_unet_segmenter(tmp_path, monkeypatch):
    """kind 'unet' goes through unet.inference.load_segmenter with the same interface."""
    import chexanatomy_lib.unet.inference as unet_inference
    from chexanatomy_lib.segment import main_segment

    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model_card.json").write_text(json.dumps({"kind": "unet"}))

    class Square:
        def segment(self, image, structures):
            m = np.zeros(image.shape, bool)
            m[10:20, 30:50] = True
            return {s: (m, np.array([10 / image.shape[0], 30 / image.shape[1], 20 / image.shape[0],
                                     50 / image.shape[1]], np.float32), None) for s in structures}

    seen = {}

    def fake_load(d, device="auto"):
        seen["dir"] = str(d)
        return Square()

    monkeypatch.setattr(unet_inference, "load_segmenter", fake_load)
    rec = main_segment(_png(tmp_path / "x.png"), tmp_path / "ck", "heart", tmp_path / "out")
    assert seen["dir"] == str(tmp_path / "ck")
    assert rec["structures"][0]["area_px"] == 200 and rec["structures"][0]["box_px"] == [10, 30, 20, 50]
    assert rec["structures"][0]["tokens"] is None


def _dicom_radiograph(path, h=96, w=80):
    """A DX radiograph as a modality writes one (patient, study, series, pixel spacing)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "TEST-1", "Test^Film", "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20261129", "120000", "", ""
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "DX", h, w, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.5, 0.5]
    ds.PixelData = (np.random.default_rng(1).random((h, w)) * 4000).astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_dicom_input_also_gets_a_dicom_seg_that_reads_back(vlm_checkpoint, tmp_path):
    import highdicom as hd
    import pydicom
    from PIL import Image

    from chexanatomy_lib.dicom_seg import read_dicom_seg
    from chexanatomy_lib.segment import main_segment

    src = _dicom_radiograph(tmp_path / "cxr.dcm")
    rec = main_segment(src, vlm_checkpoint, "left lung; heart", tmp_path / "out", device="cpu")
    assert rec["dicom_seg"] == "segmentation.dcm"
    labels, masks, uid = read_dicom_seg(tmp_path / "out" / "segmentation.dcm")
    assert labels == ["left lung", "heart"] and masks.shape == (2, 96, 80)
    for k, s in enumerate(rec["structures"]):  # the same masks as the PNGs
        assert (masks[k] == (np.asarray(Image.open(tmp_path / "out" / s["mask"])) > 0)).all()
    source = pydicom.dcmread(src)
    seg = pydicom.dcmread(tmp_path / "out" / "segmentation.dcm")
    assert uid == source.SOPInstanceUID and seg.Modality == "SEG"
    assert seg.StudyInstanceUID == source.StudyInstanceUID  # filed with the radiograph's study
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    heart = hd.seg.segread(tmp_path / "out" / "segmentation.dcm").get_segment_description(2)
    assert heart.segmented_property_type.value == "80891009"  # SNOMED CT: heart
    assert heart.segmented_property_category.value == "123037004"


def test_a_folder_gives_one_row_per_file_and_reports_what_failed(vlm_checkpoint, tmp_path):
    import pandas as pd

    from chexanatomy_lib.segment import main_segment

    films = tmp_path / "films"
    films.mkdir()
    _png(films / "a.png")
    _dicom_radiograph(films / "b.dcm")
    (films / "c.dcm").write_bytes(b"not a radiograph at all")
    (films / "notes.txt").write_text("ignored: not an image")
    table = main_segment(films, vlm_checkpoint, "left lung; heart", tmp_path / "out", device="cpu")
    csv = pd.read_csv(tmp_path / "out" / "segmentation.csv")
    assert list(csv["image"]) == ["a.png", "b.dcm", "c.dcm"] and len(table) == 3
    assert list(csv["status"]) == ["ok", "ok", "failed"]
    assert "c.dcm" in csv.loc[2, "error"] and "DICOM" in csv.loc[2, "error"]
    for stem in ("a", "b"):
        assert (tmp_path / "out" / stem / "overlay.png").is_file()
    assert (tmp_path / "out" / "b" / "segmentation.dcm").is_file()
    assert {"left_lung_area_px", "left_lung_box_px", "heart_area_px", "ctr"} <= set(csv.columns)
    assert csv.loc[0, "left_lung_area_px"] >= 0


def test_cardiothoracic_ratio_is_reported_when_heart_and_both_lungs_are_asked():
    from chexanatomy_lib.segment import _ctr

    heart = np.zeros((50, 60), bool)
    heart[20:40, 25:40] = True  # 15 px wide
    left, right = np.zeros_like(heart), np.zeros_like(heart)
    right[5:45, 5:28] = True
    left[5:45, 32:55] = True  # thorax from column 5 to 54: 50 px
    record = {"structures": [{"requested": "heart", "structure": "heart"},
                             {"requested": "left lung", "structure": "lung_field_left"},
                             {"requested": "right lung", "structure": "lung_field_right"}]}
    masks = {"heart": heart, "left lung": left, "right lung": right}
    assert _ctr(record, masks) == pytest.approx(15 / 50)
    assert _ctr({"structures": record["structures"][:2]}, masks) is None
