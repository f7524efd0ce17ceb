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
