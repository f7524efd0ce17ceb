"""Acquisition shifts rendered from the CT: the same patient, filmed differently.

Each axis changes one thing about how a dataset row was acquired (the patient's
pose, the distances, the collimator, the dose) and renders the row again from its
CT (:class:`~chexanatomy_lib.ct.synthesis.CaseRenderer`), so the image *and* its
reference masks follow the change exactly: a structure moved partly out of the
field is cut in both. Magnitudes are added to (or multiply) the row's own values,
so magnitude "none" renders the stored image and masks unchanged.

=================  ========  ===================================================  ==================
axis               unit      what changes                                         default magnitudes
=================  ========  ===================================================  ==================
``oblique``        degrees   rotation about the body's long axis (``rz``), as     0, 15, 30, 45
                             in an oblique view
``lordotic``       degrees   forward/backward tilt about the left-right axis      0, 7, 14, 20
                             (``rx``); positive leans the patient back, the
                             front of the chest up, as in a lordotic view
``in_plane``       degrees   rotation about the beam (PA ``ry``, lateral          0, 10, 20, 30
                             ``-rx``), counter-clockwise as displayed, the sense
                             of :class:`~chexanatomy_lib.augment.AffineParams`
``magnification``  factor    geometric magnification ``SID / SOD`` times this:    1, 1.1, 1.2, 1.3
                             the patient moved towards the source, SID fixed
``off_centre_si``  mm        patient moved towards the head (``tz``): the         0, 25, 50, 75
                             apices leave the top of the field
``off_centre_lr``  mm        patient moved towards their right (``tx``)           0, 25, 50, 75
``collimation``    fraction  of the field's side closed by the collimator, half   0, 0.15, 0.3, 0.45
                             at each edge (the closed part is white, unseen)
``dose``           factor    photons per pixel divided by this: more quantum      1, 4, 16, 64
                             noise (:class:`~chexanatomy_lib.ct.detector.DetectorModel`)
=================  ========  ===================================================  ==================

The same in-plane changes done on the image, a cheaper comparator, and the
appearance changes that need no CT are in :mod:`chexanatomy_lib.evaluation.perturbations`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from .synthesis import CaseRenderer, RenderSettings


def _pose_offset(column: str, sign: float = 1.0):
    def apply(row: dict, settings: RenderSettings, m: float) -> tuple[dict, RenderSettings]:
        return {**row, column: float(row[column]) + sign * m}, settings
    return apply


def _in_plane(row: dict, settings: RenderSettings, m: float) -> tuple[dict, RenderSettings]:
    # a rotation by +m about the beam: +y (ry) in PA, -x (so -rx) in the left lateral view
    column, sign = {"pa": ("ry", 1.0), "lateral": ("rx", -1.0)}[str(row["view"])]
    return _pose_offset(column, sign)(row, settings, m)


def _magnification(row: dict, settings: RenderSettings, m: float) -> tuple[dict, RenderSettings]:
    if not m > 0:
        raise ValueError(f"magnification factor must be > 0, got {m}")
    sod = float(row["sod"]) / m
    if not 0 < sod < settings.sid_mm:
        raise ValueError(f"magnification x{m} puts the source {sod:.0f} mm from the isocentre, "
                         f"outside (0, SID={settings.sid_mm:.0f} mm)")
    return {**row, "sod": sod}, settings


def _collimation(row: dict, settings: RenderSettings, m: float) -> tuple[dict, RenderSettings]:
    return row, replace(settings, collimation=float(m))


def _dose(row: dict, settings: RenderSettings, m: float) -> tuple[dict, RenderSettings]:
    if not m >= 1:
        raise ValueError(f"dose reduction factor must be >= 1, got {m}")
    photons = settings.detector.photons_per_pixel
    if photons is None:
        raise ValueError("the dataset was rendered without quantum noise (photons_per_pixel None): "
                         "its dose cannot be lowered")
    return row, replace(settings, detector=replace(settings.detector, photons_per_pixel=photons / float(m)))


@dataclass(frozen=True)
class ShiftAxis:
    """One axis of shift: its name, unit, default magnitudes and the change it makes.

    ``family`` is ``"geometric"`` (where the anatomy lands on the detector) or
    ``"appearance"`` (how it looks there). ``kind`` says what ``change`` takes: ``"rendered"`` (this module) maps ``(row dict,
    RenderSettings, magnitude)`` to the shifted ``(row, settings)``; ``"image"``
    (:mod:`chexanatomy_lib.evaluation.perturbations`) maps ``(image float32 [H, W], masks
    bool [S, H, W], magnitude, numpy Generator)`` to the shifted ``(image, masks)``.
    """

    name: str
    unit: str
    description: str
    magnitudes: tuple[float, ...]  # default magnitudes, none first, increasingly severe
    change: Callable[..., tuple]
    kind: str = "rendered"
    family: str = "geometric"

    @property
    def none(self) -> float:
        """The magnitude that changes nothing (0, or 1 for factors)."""
        return self.magnitudes[0]

    def is_none(self, magnitude: float) -> bool:
        return float(magnitude) == float(self.none)


#: Every rendered axis by name (table in the module docstring).
RENDERED_SHIFTS: dict[str, ShiftAxis] = {s.name: s for s in (
    ShiftAxis("oblique", "degrees", "rotation about the body's long axis", (0.0, 15.0, 30.0, 45.0),
                  _pose_offset("rz")),
    ShiftAxis("lordotic", "degrees", "tilt about the left-right axis (positive: leaning back)",
                  (0.0, 7.0, 14.0, 20.0), _pose_offset("rx")),
    ShiftAxis("in_plane", "degrees", "rotation about the beam, counter-clockwise as displayed",
                  (0.0, 10.0, 20.0, 30.0), _in_plane),
    ShiftAxis("magnification", "factor", "geometric magnification relative to the row's (SID fixed)",
                  (1.0, 1.1, 1.2, 1.3), _magnification),
    ShiftAxis("off_centre_si", "mm", "patient moved towards the head", (0.0, 25.0, 50.0, 75.0),
                  _pose_offset("tz")),
    ShiftAxis("off_centre_lr", "mm", "patient moved towards their right", (0.0, 25.0, 50.0, 75.0),
                  _pose_offset("tx")),
    ShiftAxis("collimation", "fraction", "fraction of the field's side closed by the collimator",
                  (0.0, 0.15, 0.3, 0.45), _collimation),
    ShiftAxis("dose", "factor", "dose divided by this (more quantum noise)", (1.0, 4.0, 16.0, 64.0), _dose,
              family="appearance"),
)}


def rendered_shift(name: str) -> ShiftAxis:
    """The axis called ``name``; a ValueError lists the axes there are."""
    if name not in RENDERED_SHIFTS:
        raise ValueError(f"unknown rendered shift {name!r}; axes: {', '.join(RENDERED_SHIFTS)}")
    return RENDERED_SHIFTS[name]


class ShiftedRender(NamedTuple):
    """One row rendered under one shift."""

    image: np.ndarray  # float32 [H, W] in [0, 1], white = dense
    masks: np.ndarray  # bool [S, H, W]: what the detector sees of each structure
    absent: np.ndarray  # bool [S]: nothing of the structure in the exposed field
    cut_by_ct: np.ndarray  # bool [S]: the CT volume's edge cuts the structure (its reference is incomplete)


def render_shifted(renderer: CaseRenderer, row: Any, axis: str, magnitude: float, image_size: int,
                   structures: Sequence[str], threads: int | None = 1) -> ShiftedRender:
    """Render dataset ``row`` (of ``renderer``'s case) again under ``magnitude`` of ``axis``.

    A structure that leaves the field (partly or wholly) keeps what is still seen
    of it as its reference mask, so a model is scored on the visible part.
    Raises ValueError for an unknown axis or a magnitude it cannot render.
    """
    shift, row, settings = rendered_shift(axis), dict(row), renderer.settings
    shifted_row, settings = (row, settings) if shift.is_none(magnitude) else shift.change(row, settings, float(magnitude))
    image, masks, absent, _ = renderer.render(shifted_row, image_size, structures=structures, threads=threads,
                                              settings=settings)
    return ShiftedRender(image, masks, absent, renderer.cut_by_ct(shifted_row, structures))
