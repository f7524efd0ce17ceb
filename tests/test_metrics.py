"""The metrics module on hand-computed cases."""

import numpy as np
import pytest
import torch

from chexanatomy_lib.evaluation.metrics import (
    bootstrap_ci, bootstrap_table, box_iou, confusion_counts, dice, hd95, iou,
)


def rect(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def test_counts_dice_iou_by_hand():
    ref = rect(10, 10, 0, 0, 4, 5)  # 20 px
    pred = rect(10, 10, 2, 0, 6, 5)  # 20 px, 10 overlap
    tp, fp, fn = confusion_counts(pred, ref)
    assert (int(tp), int(fp), int(fn)) == (10, 10, 10)
    assert dice(pred, ref) == pytest.approx(20 / 40)
    assert iou(pred, ref) == pytest.approx(10 / 30)
    batch = dice(np.stack([pred, ref]), np.stack([ref, ref]))
    np.testing.assert_allclose(batch, [0.5, 1.0])


def test_empty_policies():
    empty = np.zeros((8, 8), bool)
    some = rect(8, 8, 1, 1, 3, 3)
    assert np.isnan(dice(empty, empty)) and np.isnan(iou(empty, empty))  # undefined by default
    assert dice(empty, empty, empty_value=1.0) == 1.0
    assert dice(some, empty) == 0.0 and dice(empty, some) == 0.0
    assert iou(empty, some) == 0.0
    assert np.isnan(hd95(empty, empty))
    assert hd95(some, empty) == pytest.approx(np.hypot(8, 8))
    assert hd95(empty, some, spacing=(0.5, 2.0)) == pytest.approx(np.hypot(4, 16))


def test_hd95_by_hand_and_against_monai():
    a = rect(64, 64, 10, 10, 30, 30)
    b = rect(64, 64, 10, 13, 30, 33)  # shifted 3 px right
    assert hd95(a, b) == pytest.approx(3.0)
    assert hd95(a, a) == 0.0
    assert hd95(a, b, spacing=2.0) == pytest.approx(6.0)
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(0)
    p = rng.random((6, 48, 48)) < 0.1
    r = np.zeros_like(p)
    r[:, 5:30, 8:40] = True
    p[:, 0, 0] = True  # touches the border
    ref = compute_hausdorff_distance(torch.from_numpy(p[:, None]), torch.from_numpy(r[:, None]),
                                     include_background=True, percentile=95).numpy().ravel()
    np.testing.assert_allclose(hd95(p, r), ref, rtol=1e-4)


def test_box_iou_by_hand():
    assert box_iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 1.0]) == pytest.approx(0.5)
    assert box_iou([0, 0, 0.2, 0.2], [0.5, 0.5, 1, 1]) == 0.0
    assert box_iou([np.nan] * 4, [0, 0, 1, 1]) == 0.0
    np.testing.assert_allclose(box_iou(np.array([[0, 0, 1, 1], [0, 0, .5, .5]]), [0, 0, 1, 1]), [1.0, 0.25])


def test_bootstrap_interval_contains_the_mean_and_is_seeded():
    rng = np.random.default_rng(3)
    for n in (5, 40, 200):
        v = rng.beta(5, 2, n)
        est, lo, hi = bootstrap_ci(v, n_boot=500, seed=1)
        assert est == pytest.approx(v.mean()) and lo <= est <= hi and lo < hi
        assert bootstrap_ci(v, n_boot=500, seed=1) == (est, lo, hi)
    # the interval narrows with more images
    w_small = np.subtract(*bootstrap_ci(rng.random(10))[2:0:-1])
    w_large = np.subtract(*bootstrap_ci(rng.random(1000))[2:0:-1])
    assert w_large < w_small
    assert bootstrap_ci([np.nan, 0.5, np.nan]) == (0.5, 0.5, 0.5)
    assert all(np.isnan(bootstrap_ci([np.nan])))


def test_bootstrap_table_agrees_with_columnwise_means():
    rng = np.random.default_rng(0)
    v = rng.random((30, 3))
    v[::4, 1] = np.nan
    mean, lo, hi = bootstrap_table(v, n_boot=400, seed=0)
    np.testing.assert_allclose(mean, np.nanmean(v, 0))
    assert np.all(lo <= mean) and np.all(mean <= hi)
