"""Shifts made on the image itself: in-plane geometry and appearance.

Each axis is a :class:`~chexanatomy_lib.ct.shift.ShiftAxis` of kind ``"image"``:
it changes a radiograph (``float32 [H, W]`` in [0, 1], white = dense) and, for
the geometric ones, its reference masks (``bool [S, H, W]``) the same way. They
need no CT, so they apply to any image, real films included; the in-plane
geometric ones are the cheap 2D comparators of the rendered axes of
:mod:`chexanatomy_lib.ct.shift` (a 2D rotation cannot show what an oblique or
lordotic patient looks like, and a 2D zoom ignores that magnification enlarges the
front and back of the chest differently).

================  ========  =====================================================  ====================
axis              unit      what changes                                           default magnitudes
================  ========  =====================================================  ====================
``rotation_2d``   degrees   image and masks rotated counter-clockwise about the    0, 10, 20, 30
                            centre (black corners)
``zoom_2d``       factor    image and masks enlarged about the centre              1, 1.1, 1.2, 1.3
``shift_2d``      fraction  image and masks moved up by this fraction of the        0, 0.05, 0.1, 0.15
                            height (as ``off_centre_si`` moves the anatomy)
``blur``          pixels    Gaussian blur, standard deviation at the image's size  0, 1, 2, 4
``contrast``      fraction  of the contrast about the image's mean removed         0, 0.25, 0.5, 0.75
``gamma``         exponent  display values raised to this power (< 1 washes the   1, 0.7, 0.5, 0.35
                            lungs out towards the soft tissue)
``scatter``       fraction  scatter haze: this fraction of the image replaced by   0, 0.2, 0.4, 0.6
                            its blur at 1/8 of the side, a low-frequency veil
                            that flattens local contrast (approximated in display
                            values, not photon counts)
``invert``        on/off    polarity inverted (white = air), as some archives      0, 1
                            store films (``MONOCHROME1`` read as ``MONOCHROME2``)
``markers``       count     burned-in white side markers and labels, placed at     0, 1, 2, 4
                            seeded random positions, over anatomy or not
================  ========  =====================================================  ====================

The dose (quantum noise) is a detector change and is rendered from the CT
(:mod:`chexanatomy_lib.ct.shift`, axis ``dose``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..augment import AffineParams, apply_affine
from ..ct.shift import ShiftAxis


def _affine(make):
    def change(image, masks, m, rng):
        return apply_affine(image, masks, make(m))
    return change


def _appearance(fn):
    def change(image, masks, m, rng):
        return np.clip(fn(np.asarray(image, dtype=np.float32), m, rng), 0.0, 1.0).astype(np.float32), masks
    return change


def _blur(image, m, rng):
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(image, float(m), mode="nearest")


def _contrast(image, m, rng):
    if not 0 <= m <= 1:
        raise ValueError(f"contrast reduction must lie in [0, 1], got {m}")
    mean = float(image.mean())
    return mean + (1.0 - m) * (image - mean)


def _gamma(image, m, rng):
    if not m > 0:
        raise ValueError(f"gamma must be > 0, got {m}")
    return image ** float(m)


def _scatter(image, m, rng):
    from scipy.ndimage import gaussian_filter

    if not 0 <= m <= 1:
        raise ValueError(f"scatter fraction must lie in [0, 1], got {m}")
    return (1.0 - m) * image + m * gaussian_filter(image, max(image.shape) / 8.0, mode="nearest")


def _invert(image, m, rng):
    if m not in (0, 1):
        raise ValueError(f"invert takes 0 (off) or 1 (on), got {m}")
    return 1.0 - image if m else image


_MARKER_TEXT = ("L", "R", "AP", "PORT", "ERECT")


def _markers(image, m, rng):
    """``int(m)`` white plates, each 1/8 of the side high, with a black label, at random places."""
    from PIL import Image, ImageDraw

    if m < 0 or m != int(m):
        raise ValueError(f"markers takes a whole number of markers, got {m}")
    out = image.copy()
    h, w = image.shape
    size = max(6, h // 8)
    for k in range(int(m)):
        text = _MARKER_TEXT[int(rng.integers(len(_MARKER_TEXT)))]
        plate = Image.new("L", (12 * len(text) + 4, 14), 255)
        ImageDraw.Draw(plate).text((2, 1), text, fill=0)
        pw = max(size, int(round(size * plate.width / plate.height)))
        pw = min(pw, w)
        plate = np.asarray(plate.resize((pw, size), Image.Resampling.NEAREST), dtype=np.float32) / 255.0
        r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - pw + 1))
        out[r:r + size, c:c + pw] = plate
    return out


#: Every image-space axis by name (table in the module docstring).
IMAGE_SHIFTS: dict[str, ShiftAxis] = {s.name: s for s in (
    ShiftAxis("rotation_2d", "degrees", "image rotated counter-clockwise", (0.0, 10.0, 20.0, 30.0),
              _affine(lambda m: AffineParams(rotation_deg=m)), "image"),
    ShiftAxis("zoom_2d", "factor", "image enlarged about its centre", (1.0, 1.1, 1.2, 1.3),
              _affine(lambda m: AffineParams(scale=m)), "image"),
    ShiftAxis("shift_2d", "fraction", "image moved up by this fraction of its height", (0.0, 0.05, 0.1, 0.15),
              _affine(lambda m: AffineParams(shift=(-m, 0.0))), "image"),
    ShiftAxis("blur", "pixels", "Gaussian blur (standard deviation)", (0.0, 1.0, 2.0, 4.0), _appearance(_blur),
              "image", "appearance"),
    ShiftAxis("contrast", "fraction", "contrast removed", (0.0, 0.25, 0.5, 0.75), _appearance(_contrast), "image",
              "appearance"),
    ShiftAxis("gamma", "exponent", "display values raised to this power", (1.0, 0.7, 0.5, 0.35),
              _appearance(_gamma), "image", "appearance"),
    ShiftAxis("scatter", "fraction", "scatter haze (low-frequency veil)", (0.0, 0.2, 0.4, 0.6),
              _appearance(_scatter), "image", "appearance"),
    ShiftAxis("invert", "on/off", "polarity inverted", (0.0, 1.0), _appearance(_invert), "image",
              "appearance"),
    ShiftAxis("markers", "count", "burned-in side markers and labels", (0.0, 1.0, 2.0, 4.0),
              _appearance(_markers), "image", "appearance"),
)}


def image_shift(name: str) -> ShiftAxis:
    """The image-space axis called ``name``; a ValueError lists the axes there are."""
    if name not in IMAGE_SHIFTS:
        raise ValueError(f"unknown image shift {name!r}; axes: {', '.join(IMAGE_SHIFTS)}")
    return IMAGE_SHIFTS[name]


def perturb(images: np.ndarray, masks: np.ndarray, axis: str, magnitude: float,
            seeds: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``magnitude`` of image-space ``axis`` to every image and its masks.

    images: float [N, H, W] in [0, 1]; masks: bool [N, S, H, W]; seeds: one per image for
    the axes that draw (``markers``; None: image ``k`` uses seed ``k``). Returns
    ``(float32 [N, H, W] in [0, 1], bool [N, S, H, W])``; the inputs are not changed.
    """
    shift = image_shift(axis)
    images = np.asarray(images, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    if images.ndim != 3 or masks.ndim != 4 or masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[1:]:
        raise ValueError(f"need images [N, H, W] and masks [N, S, H, W]; got {images.shape} and {masks.shape}")
    if shift.is_none(magnitude):
        return images.copy(), masks.copy()
    seeds = list(range(len(images))) if seeds is None else list(seeds)
    out = [shift.change(im, mk, float(magnitude), np.random.default_rng(int(sd)))
           for im, mk, sd in zip(images, masks, seeds)]
    return (np.stack([o[0] for o in out]).astype(np.float32, copy=False),
            np.stack([o[1] for o in out]).astype(bool, copy=False))
