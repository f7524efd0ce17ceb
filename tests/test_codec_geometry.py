"""The one geometry of boxes and masks: NumPy and torch agree, big_vision's binning and
truncation, whole-mask resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from chexanatomy_lib.codec.geometry import (
    box_to_bins, box_to_pixel_box, masks_to_boxes, pixel_boxes, quantise_boxes, resample_masks,
)


def _random_masks(rng, shape):
    m = np.zeros(shape, bool)
    flat = m.reshape(-1, *shape[-2:])
    for k, mk in enumerate(flat):
        if k % 5 == 4:
            continue  # leave some empty
        y, x = rng.integers(0, shape[-2] - 1), rng.integers(0, shape[-1] - 1)
        mk[y:y + rng.integers(1, 12), x:x + rng.integers(1, 12)] = True
    return m


def test_tight_boxes_are_the_same_for_numpy_and_torch_and_nan_when_empty():
    m = _random_masks(np.random.default_rng(0), (3, 4, 30, 40))
    b = masks_to_boxes(m)
    assert b.dtype == np.float64 and b.shape == (3, 4, 4)
    np.testing.assert_array_equal(b, masks_to_boxes(torch.from_numpy(m)).numpy())
    empty = ~m.reshape(3, 4, -1).any(-1)
    assert np.isnan(b[empty]).all() and np.isfinite(b[~empty]).all()
    i, j = np.argwhere(~empty)[0]
    rows, cols = np.flatnonzero(m[i, j].any(1)), np.flatnonzero(m[i, j].any(0))
    np.testing.assert_array_equal(b[i, j], [rows[0] / 30, cols[0] / 40, (rows[-1] + 1) / 30, (cols[-1] + 1) / 40])


def test_location_bins_round_half_to_even_clip_and_refuse_nan():
    np.testing.assert_array_equal(box_to_bins(np.array([0.0, 0.5, 1.0, 2.0])), [0, 512, 1023, 1023])
    # 0.5 / 1023 * 1023 lies half-way between bins 0 and 1: half to even gives 0, 1.5 gives 2
    np.testing.assert_array_equal(box_to_bins(np.array([0.5, 1.5, 2.5, -1]) / 1023), [0, 2, 2, 0])
    with pytest.raises(ValueError, match="non-finite"):
        box_to_bins(np.array([0.1, np.nan, 0.3, 0.4]))
    q = quantise_boxes(np.array([[0.1, 0.2, 0.3, 0.4], [np.nan, 0, 1, 1]]))
    np.testing.assert_array_equal(q[0], box_to_bins(np.array([0.1, 0.2, 0.3, 0.4])) / 1023)
    assert np.isnan(q[1, 0]) and isinstance(quantise_boxes(torch.zeros(1, 4)), torch.Tensor)


def test_pixel_boxes_truncate_in_the_boxes_own_precision():
    rng = np.random.default_rng(1)
    for h in (64, 224, 256, 448):
        k = np.sort(rng.integers(0, h + 1, (500, 4)), axis=1)[:, [0, 1, 2, 3]]
        boxes = (k / h).astype(np.float32)  # float32 boxes, as the codec stores them
        y0, x0, y1, x1, ok = pixel_boxes(boxes, h, h)
        expect = np.array([[int(b[0] * h), int(b[1] * h), int(b[2] * h), int(b[3] * h)] for b in boxes])
        np.testing.assert_array_equal(np.stack([y0, x0, y1, x1], 1), expect)
        np.testing.assert_array_equal(ok, (expect[:, 2] > expect[:, 0]) & (expect[:, 3] > expect[:, 1]))
    assert box_to_pixel_box(np.array([0.1, 0.2, 0.5, 0.77]), 90, 110) == (9, 22, 45, 84)
    _, _, _, _, ok = pixel_boxes(np.array([[np.nan, 0, 1, 1], [0.2, 0.2, 0.2, 0.9]]), 50, 50)
    assert not ok.any()  # a NaN box and a collapsed one are invalid
    with pytest.raises(ValueError):
        box_to_pixel_box(np.array([0.1, 0.2, np.inf, 0.3]), 10, 10)


def test_resampled_masks_follow_their_rule():
    m = _random_masks(np.random.default_rng(2), (2, 3, 64, 64))
    area = resample_masks(m, 32, "area")
    ref = (F.interpolate(torch.from_numpy(m).float(), size=(32, 32), mode="area") >= 0.5).numpy()
    assert isinstance(area, np.ndarray) and area.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(area, ref)
    up = resample_masks(torch.from_numpy(m[0]), 128, "bilinear")
    ref_up = F.interpolate(torch.from_numpy(m[0]).float()[:, None], size=(128, 128), mode="bilinear",
                           antialias=True, align_corners=False)[:, 0] >= 0.5
    assert torch.equal(up, ref_up)
    assert resample_masks(m, 64, "area") is not None and np.array_equal(resample_masks(m, 64, "area"), m)
    with pytest.raises(ValueError, match="method"):
        resample_masks(m, 32, "nearest")
