"""Geometric augmentation moves image and masks together."""

import numpy as np
import pytest

from chexanatomy_lib.augment import AffineParams, apply_affine, random_affine, sample_affine


def _blob(h=64, w=64):
    masks = np.zeros((2, h, w), bool)
    masks[0, 10:30, 12:26] = True
    masks[1, 35:55, 30:50] = True
    return masks


def test_identity_is_exact():
    masks = _blob()
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    img2, m2 = apply_affine(image, masks, AffineParams())
    np.testing.assert_allclose(img2, image, atol=1e-5)
    assert (m2 == masks).all()


def test_shift_moves_mask_by_expected_pixels():
    masks = _blob()
    _, m2 = apply_affine(np.zeros((64, 64)), masks, AffineParams(shift=(0.125, -0.0625)))
    ys, xs = np.nonzero(m2[0])
    assert ys.min() == 18 and xs.min() == 8
    assert m2[0].sum() == masks[0].sum()


def test_rotation_90_maps_top_to_left():
    """A counter-clockwise quarter turn (as displayed) takes the top edge to the left edge."""
    masks = np.zeros((1, 33, 33), bool)
    masks[0, 0:4, 10:23] = True  # band at the top, centred horizontally
    _, m2 = apply_affine(np.zeros((33, 33)), masks, AffineParams(rotation_deg=90))
    ys, xs = np.nonzero(m2[0])
    assert xs.max() <= 4 and 9 <= ys.mean() <= 23


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_image_and_masks_share_the_transform(seed):
    """An image that *is* the mask stays equal to the transformed mask."""
    masks = _blob()
    image = masks.any(0).astype(np.float32)
    img2, m2 = random_affine(image, masks, np.random.default_rng(seed), 20, 0.2, 0.1)
    agree = ((img2 > 0.5) == m2.any(0)).mean()
    assert agree > 0.995
    assert m2.dtype == bool and m2.shape == masks.shape and img2.dtype == np.float32


def test_seeded_and_bounded():
    a = sample_affine(np.random.default_rng(5), 10, 0.1, 0.05)
    b = sample_affine(np.random.default_rng(5), 10, 0.1, 0.05)
    assert a == b
    assert abs(a.rotation_deg) <= 10 and 0.9 <= a.scale <= 1.1
    with pytest.raises(ValueError):
        sample_affine(np.random.default_rng(0), -1, 0.1, 0.1)
    with pytest.raises(ValueError):
        apply_affine(np.zeros((8, 8)), np.zeros((1, 9, 9), bool), AffineParams())
