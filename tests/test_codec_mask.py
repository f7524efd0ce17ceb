"""The codec's geometry (crop, resize and paste) and MaskCodec, independent of what the VQ-VAE learned."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chexanatomy_lib.codec import CodecError, MaskCodec, MaskVQVAE, VQVAEConfig, mask_to_box
from chexanatomy_lib.codec.geometry import box_to_pixel_box, crop_boxes, crop_masks, resample_weights


def resize_weights(starts, stops, full, out):
    """A span of a length-``full`` axis onto all ``out`` samples (the crop's case)."""
    return resample_weights(starts, stops, full, torch.zeros_like(starts), torch.full_like(starts, out), out)

SMALL = VQVAEConfig(enc_channels=(8, 8, 16, 16), embedding_dim=8, dec_channels=(16, 16, 8, 8, 8))


class ConstantDecoder(MaskVQVAE):
    """Decodes every code to a constant 64x64 map (so pasting can be checked exactly)."""

    def __init__(self, value=1.0):
        super().__init__(SMALL)
        self.value = value

    def decode(self, codes, clip=True):
        return torch.full((len(codes), 64, 64), self.value)


@pytest.mark.parametrize("length,start,stop", [(300, 0, 300), (256, 17, 201), (40, 5, 25), (64, 0, 64)])
def test_resize_weights_equal_antialiased_interpolate(length, start, stop):
    x = torch.rand(length, 3)
    w = resize_weights(torch.tensor([start]), torch.tensor([stop]), length, 64)[0]
    # NOTE: a trailing axis of 2 (not 1): torch's antialiased path mishandles size-1 axes.
    img = x[start:stop].T.contiguous()[None, :, :, None].expand(1, 3, stop - start, 2).contiguous()
    ref = F.interpolate(img, size=(64, 2), mode="bilinear", antialias=True, align_corners=False)[0, :, :, 0].T
    torch.testing.assert_close(w @ x, ref, rtol=1e-5, atol=1e-5)
    assert torch.all(w[:, :start] == 0) and torch.all(w[:, stop:] == 0)


def test_encode_returns_tight_boxes_and_codes_and_rejects_empty():
    rng = np.random.default_rng(0)
    masks = np.zeros((5, 96, 128), bool)
    for m in masks:
        y, x = rng.integers(0, 60, 2)
        m[y:y + rng.integers(1, 30), x:x + rng.integers(1, 60)] = True
    codec = MaskCodec(MaskVQVAE(SMALL), batch_size=2)
    boxes, codes = codec.encode(masks)
    assert boxes.dtype == np.float32 and boxes.shape == (5, 4)
    assert codes.dtype == np.int64 and codes.shape == (5, 16) and codes.max() < 128
    np.testing.assert_allclose(boxes, np.stack([mask_to_box(m) for m in masks]), atol=1e-6)
    # batching does not change the result
    np.testing.assert_array_equal(codes[3], codec.encode(masks[3])[1][0])
    masks[2] = False
    with pytest.raises(CodecError, match=r"empty mask\(s\) at index \[2\]"):
        codec.encode(masks)


def test_crop_of_a_rectangle_is_all_ones_and_padding_grows_the_box():
    m = np.zeros((1, 100, 100), bool)
    m[0, 30:50, 20:90] = True
    t = torch.from_numpy(m)
    torch.testing.assert_close(crop_masks(t, crop_boxes(t)), torch.ones(1, 64, 64))
    padded = crop_boxes(t, "padded", pad_px=10)
    np.testing.assert_allclose(padded[0].numpy(), [0.2, 0.1, 0.6, 1.0], atol=1e-6)
    crop = crop_masks(t, padded, "padded")[0]
    assert 0 < float(crop.mean()) < 1
    assert set(np.unique(crop_masks(t, padded, "padded", "nearest").numpy())) <= {0.0, 1.0}


def test_decode_pastes_into_the_truncated_pixel_box():
    codec = MaskCodec(ConstantDecoder(1.0))
    boxes = np.array([[0.1, 0.2, 0.5, 0.77], [0.0, 0.0, 1.0, 1.0], [0.3, 0.3, 0.3 + 1e-4, 0.6],
                      [np.nan, 0, 1, 1]])
    out = codec.decode(boxes, np.zeros((4, 16), int), 90, 110)
    assert out.dtype == bool and out.shape == (4, 90, 110)
    y0, x0, y1, x1 = box_to_pixel_box(boxes[0], 90, 110)
    expect = np.zeros((90, 110), bool)
    expect[y0:y1, x0:x1] = True
    np.testing.assert_array_equal(out[0], expect)
    assert out[1].all()
    assert not out[2].any()  # collapses after truncation
    assert not out[3].any()  # NaN box
    assert not MaskCodec(ConstantDecoder(-1.0)).decode(boxes[:2], np.zeros((2, 16), int), 90, 110).any()


def test_instance_tokens_layout():
    codec = MaskCodec(MaskVQVAE(SMALL))
    text = codec.instance_tokens(np.array([0.0, 0.5, 1.0, 1.0]), np.arange(16))
    assert text == "<loc0000><loc0512><loc1023><loc1023>" + "".join(f"<seg{i:03d}>" for i in range(16))


def test_windowed_crops_equal_full_image_resampling():
    rng = np.random.default_rng(5)
    masks = np.zeros((6, 80, 120), bool)
    for m in masks:
        y, x = rng.integers(0, 60, 2)
        m[y:y + rng.integers(1, 20), x:x + rng.integers(1, 60)] = True
    t = torch.from_numpy(masks)
    b = crop_boxes(t)
    y0, x0, y1, x1 = (torch.round(b[:, k].double() * s).long() for k, s in zip(range(4), (80, 120, 80, 120)))
    ref = torch.bmm(torch.bmm(resize_weights(y0, y1, 80, 64), t.float()), resize_weights(x0, x1, 120, 64).transpose(1, 2))
    torch.testing.assert_close(crop_masks(t, b), ref.clamp(0, 1), rtol=1e-5, atol=1e-5)


def test_code_search_never_draws_a_crop_worse_than_the_nearest_codes():
    from chexanatomy_lib.codec.geometry import masks_to_crops
    from chexanatomy_lib.codec.vqvae import crop_loss

    torch.manual_seed(1)
    rng = np.random.default_rng(1)
    masks = np.zeros((12, 80, 90), bool)
    yy, xx = np.mgrid[0:80, 0:90]
    for m in masks:
        cy, cx, ry, rx = rng.uniform(20, 60), rng.uniform(20, 70), rng.uniform(3, 25), rng.uniform(3, 25)
        m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = True
    from chexanatomy_lib.codec import VQVAETrainConfig, train_vqvae

    # a briefly trained model: at initialisation every code decodes to nearly the same map
    _, train_crops = masks_to_crops(masks, crop="aligned")
    model, _ = train_vqvae(train_crops, SMALL, VQVAETrainConfig(steps=60, batch_size=12, lr=0.01, dice_weight=1.0,
                                                               restart_every=10), progress=False)
    nearest = MaskCodec(model, crop="aligned")
    searched = MaskCodec(model, crop="aligned", code_search=6, search_passes=2, batch_size=5)
    boxes, c0 = nearest.encode(masks)
    boxes_s, c1 = searched.encode(masks)
    np.testing.assert_array_equal(boxes, boxes_s)  # the search changes codes, never boxes
    _, crops = masks_to_crops(masks, crop="aligned")
    crops = torch.from_numpy(crops)
    loss0 = crop_loss(model.decode(c0), crops)
    loss1 = crop_loss(model.decode(c1), crops)
    assert torch.all(loss1 <= loss0 + 1e-6)
    assert torch.any(loss1 < loss0 - 1e-4)
    changed = (c0 != c1).any(1)
    assert torch.all(loss1[torch.from_numpy(changed)] < loss0[torch.from_numpy(changed)])
    # each chosen code is among the cell's 6 nearest entries
    with torch.no_grad():
        z = model.encode_latent(crops).permute(0, 2, 3, 1).reshape(len(crops), 16, -1)
    dist = torch.cdist(z, model._vq_vae._embedding[None].expand(len(crops), -1, -1))
    rank = (dist < dist.gather(2, torch.from_numpy(c1)[..., None])).sum(-1)
    assert int(rank.max()) < 6
    # no candidates or no passes: the nearest codes
    np.testing.assert_array_equal(MaskCodec(model, crop="aligned", code_search=6, search_passes=0).encode(masks)[1],
                                  c0)
    with pytest.raises(ValueError, match="code_search"):
        MaskCodec(model, code_search=-1)


@pytest.mark.parametrize("src_len,dst_len,dst_start", [(64, 64, 0), (64, 65, 3), (64, 200, 0), (64, 447, 1),
                                                       (10, 31, 5)])
def test_two_tap_weights_equal_the_triangle_filter_when_enlarging(src_len, dst_len, dst_start):
    n, dst_size, src_size = 3, dst_start + dst_len + 4, src_len + 2
    s0, s1 = torch.full((n,), 1), torch.full((n,), 1 + src_len)
    d0, d1 = torch.full((n,), dst_start), torch.full((n,), dst_start + dst_len)
    fast = resample_weights(s0, s1, src_size, d0, d1, dst_size)
    # the general formula, written out
    scale = src_len / dst_len
    d = torch.arange(dst_size, dtype=torch.float32)
    centre = (d - dst_start + 0.5) * scale
    pos = torch.arange(src_size, dtype=torch.float32) + 0.5 - 1
    w = torch.clamp(1.0 - (pos[None] - centre[:, None]).abs(), min=0.0)
    w = w * ((pos >= 0) & (pos < src_len))[None] * ((d >= dst_start) & (d < dst_start + dst_len))[:, None]
    w = w / torch.where(w.sum(-1, keepdim=True) > 0, w.sum(-1, keepdim=True), torch.ones(1))
    torch.testing.assert_close(fast, w.expand(n, -1, -1), rtol=1e-5, atol=1e-6)


def test_resample_weights_of_a_batch_mixing_enlarged_and_shrunk_spans_equal_each_alone():
    starts, stops = torch.tensor([0, 0, 0, 0]), torch.tensor([64, 64, 64, 64])
    d0, d1 = torch.tensor([2, 0, 1, 0]), torch.tensor([30, 200, 100, 64])  # shrink, enlarge, enlarge, same
    batch = resample_weights(starts, stops, 64, d0, d1, 210)
    for k in range(4):
        alone = resample_weights(starts[k:k + 1], stops[k:k + 1], 64, d0[k:k + 1], d1[k:k + 1], 210)
        torch.testing.assert_close(batch[k:k + 1], alone, rtol=1e-6, atol=1e-7)
    assert torch.allclose(batch.sum(-1)[0, 2:30], torch.ones(28))  # each inside row's weights sum to 1
