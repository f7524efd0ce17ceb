"""The aligned crop policy and the windowed paste: geometry only, no trained codebook."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chexanatomy_lib.codec import MaskCodec, MaskVQVAE, VQVAEConfig
from chexanatomy_lib.codec.geometry import (
    box_to_pixel_box, crop_boxes, crop_masks, paste_maps, pixel_boxes, quantise_boxes,
)
from chexanatomy_lib.codec.routes import resize_only_masks
from chexanatomy_lib.codec.tokens import loc_tokens_to_box

SMALL = VQVAEConfig(enc_channels=(8, 8, 16, 16), embedding_dim=8, dec_channels=(16, 16, 8, 8, 8))


def bar(size=448, rows=(37, 40), cols=(10, 100)):
    m = np.zeros((1, size, size), bool)
    m[0, rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


def test_pixel_boxes_match_the_token_decoder():
    rng = np.random.default_rng(0)
    boxes = np.sort(rng.uniform(0, 1, (50, 2, 2)), axis=1).transpose(0, 2, 1).reshape(50, 4)[:, [0, 1, 2, 3]]
    boxes = np.stack([boxes[:, 0], boxes[:, 2], boxes[:, 1], boxes[:, 3]], 1)  # (y0, x0, y1, x1), y0 < y1
    q = quantise_boxes(boxes)
    y0, x0, y1, x1, _ = pixel_boxes(q, 300, 200)
    from chexanatomy_lib.codec.tokens import box_to_loc_tokens

    for k in range(len(boxes)):
        ref = box_to_pixel_box(loc_tokens_to_box(box_to_loc_tokens(boxes[k])), 300, 200)
        assert (int(y0[k]), int(x0[k]), int(y1[k]), int(x1[k])) == ref


def test_aligned_crop_keeps_the_box_and_puts_pixels_back():
    m = bar()
    tight, aligned = MaskCodec(MaskVQVAE(SMALL)), MaskCodec(MaskVQVAE(SMALL), crop="aligned")
    # the location tokens are the same: encode returns the same tight box
    np.testing.assert_array_equal(tight.encode(m)[0], aligned.encode(m)[0])
    # this bar's decoded pixel box is one row up at both edges ([36, 39) instead of [37, 40))
    y0, x0, y1, x1, ok = pixel_boxes(quantise_boxes(crop_boxes(torch.from_numpy(m))), 448, 448)
    assert bool(ok[0]) and (int(y0[0]), int(y1[0])) == (36, 39)
    window = np.zeros_like(m)
    window[0, 36:39, int(x0[0]):int(x1[0])] = True
    # with the aligned crop, the crop alone pasted back is the mask inside the decoded box ...
    np.testing.assert_array_equal(resize_only_masks(m, crop="aligned"), m & window)
    # ... with big_vision's tight crop it is shifted one row up
    shifted = resize_only_masks(m, crop="tight")
    assert shifted[0, 36].any() and (shifted & ~m).any()  # drawn where the mask is not


def test_aligned_crop_falls_back_to_the_tight_box_when_the_decoded_box_collapses():
    m = np.zeros((1, 1000, 1000), bool)
    m[0, 500, 100:300] = True  # one row: its bins may decode to an empty row span
    t = torch.from_numpy(m)
    crops = crop_masks(t, crop_boxes(t), "aligned")
    assert crops.shape == (1, 64, 64) and float(crops.max()) > 0.5


def test_windowed_paste_equals_interpolating_each_box():
    rng = np.random.default_rng(3)
    n, h, w = 12, 150, 170
    y = np.sort(rng.uniform(0, 1, (n, 2)), 1)
    x = np.sort(rng.uniform(0, 1, (n, 2)), 1)
    boxes = np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], 1)
    maps = rng.normal(size=(n, 64, 64)).astype(np.float32)
    out = paste_maps(maps, boxes, h, w, batch_size=5)
    for k in range(n):
        y0, x0, y1, x1 = box_to_pixel_box(boxes[k], h, w)
        expect = np.zeros((h, w), bool)
        if y1 > y0 and x1 > x0:
            r = F.interpolate(torch.from_numpy(maps[k])[None, None], size=(y1 - y0, x1 - x0), mode="bilinear",
                              antialias=True, align_corners=False)[0, 0]
            expect[y0:y1, x0:x1] = (r > 0).numpy()
        mismatch = (out[k] != expect).sum()
        assert mismatch <= 2, (k, mismatch)  # float ties at exactly 0 only


def test_ours_reads_the_crop_policy_of_its_training_record(tmp_path):
    model = MaskVQVAE(SMALL)
    model.save(tmp_path / "aligned", {"crop": "aligned", "resize": "bilinear_aa"})
    model.save(tmp_path / "old", {})
    assert MaskCodec.ours(tmp_path / "aligned").crop == "aligned"
    assert MaskCodec.ours(tmp_path / "old").crop == "tight"  # records without a policy: big_vision's
    assert MaskCodec.ours(tmp_path / "aligned", crop="tight").crop == "tight"
    assert json.loads((tmp_path / "aligned" / "training.json").read_text())["crop"] == "aligned"
    with pytest.raises(ValueError, match="crop must be one of"):
        MaskCodec(model, crop="loose")
