"""Radiographic view geometry: where the X-ray source and each detector pixel are.

Both renderers, our :mod:`~chexanatomy_lib.ct.projector` and DiffDRR (the
reference), trace the rays this module defines, so their images are comparable
pixel for pixel.

Frames (all lengths in mm):

* **Patient frame**: RAS+ axes of the CT (``+x`` towards the patient's right,
  ``+y`` anterior, ``+z`` superior), origin at the *isocentre*, by default the
  centre of the CT volume.
* **Room frame**: where source and detector stand. A patient point ``p`` is
  placed at ``R @ p + t`` (:class:`PatientPose`), so the nominal pose (no
  rotation, no translation) puts the patient upright in the standard position.

Views (radiological display convention, head up):

* ``"pa"`` posteroanterior: the source is behind the patient, the beam runs
  posterior -> anterior (``+y``), the chest is against the detector; the image
  is shown as if facing the patient, so the patient's **right is on the image's
  left** (image columns run towards the patient's left, ``-x``).
* ``"lateral"`` left lateral: the source is on the patient's right, the beam
  runs right -> left (``-x``), the patient's left side is against the detector;
  the image is shown as seen from the patient's left, so **anterior is on the
  image's left** (columns run towards posterior, ``-y``).

Image rows run from head to feet (``-z``) in both views. Pixel ``(r, c)`` of an
``H x W`` image is the detector element whose centre lies at
``((c + 0.5) - W/2) * spacing`` along the column direction and
``((r + 0.5) - H/2) * spacing`` along the row direction from the detector centre,
which is the foot of the perpendicular from the source (principal point centred).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

#: beam direction, image-column direction, image-row direction (patient frame) per view
VIEW_AXES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "pa": ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "lateral": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),
}
#: The views a projected dataset may hold.
VIEWS = tuple(VIEW_AXES)


@dataclass(frozen=True)
class Detector:
    """A flat-panel detector and its distance from the source.

    Pixel spacing is given at the detector plane; the size of a pixel at the
    isocentre is ``pixel_spacing * sod / sid`` (magnification ``sid / sod``).
    """

    height: int  # image rows (pixels)
    width: int  # image columns (pixels)
    pixel_spacing: float  # detector pixel pitch (mm), square pixels
    sid: float = 1800.0  # source-to-image (detector) distance (mm)

    def __post_init__(self) -> None:
        if int(self.height) < 1 or int(self.width) < 1:
            raise ValueError(f"detector size must be positive, got {self.height}x{self.width}")
        if not self.pixel_spacing > 0:
            raise ValueError(f"pixel_spacing must be > 0 mm, got {self.pixel_spacing}")
        if not self.sid > 0:
            raise ValueError(f"sid must be > 0 mm, got {self.sid}")

    @classmethod
    def square(cls, image_size: int, field_mm: float, sid: float = 1800.0) -> "Detector":
        """``image_size`` x ``image_size`` pixels covering ``field_mm`` at the detector."""
        return cls(int(image_size), int(image_size), float(field_mm) / int(image_size), float(sid))

    def resized(self, image_size: int) -> "Detector":
        """The same detector field sampled with ``image_size`` pixels per side."""
        field = self.pixel_spacing * max(self.height, self.width)
        return Detector.square(image_size, field, self.sid)


@dataclass(frozen=True)
class PatientPose:
    """Rigid placement of the patient in the room and the source distance.

    Rotations are about the patient-frame axes through the isocentre, applied
    in the order x (tilt, head towards/away from the detector), y (roll of the
    shoulders, i.e. in-plane rotation in PA), z (rotation about the body's long
    axis); angles in degrees, right-handed. Translations are in the room frame.
    """

    tx: float = 0.0  # shift towards the patient's right (mm)
    ty: float = 0.0  # shift anterior (mm)
    tz: float = 0.0  # shift superior (mm)
    rx: float = 0.0  # rotation about the left-right axis (degrees)
    ry: float = 0.0  # rotation about the antero-posterior axis (degrees)
    rz: float = 0.0  # rotation about the cranio-caudal axis (degrees)
    sod: float = 1650.0  # source-to-object (isocentre) distance (mm)

    def rotation(self) -> np.ndarray:
        """``float64 [3, 3]`` rotation ``R = Rz @ Ry @ Rx`` (patient -> room)."""
        ax, ay, az = np.deg2rad([self.rx, self.ry, self.rz])
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def view_axes(view: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors ``(beam, column, row)`` of ``view`` in the room frame, ``float64 [3]`` each."""
    if view not in VIEW_AXES:
        raise ValueError(f"unknown view {view!r}; expected one of {', '.join(VIEWS)}")
    return tuple(np.asarray(a, dtype=np.float64) for a in VIEW_AXES[view])  # type: ignore[return-value]


def magnification(detector: Detector, pose: PatientPose) -> float:
    """Geometric magnification at the isocentre, ``sid / sod``."""
    return detector.sid / pose.sod


def _grid(view: str, detector: Detector, pose: PatientPose) -> tuple[np.ndarray, ...]:
    """Room-frame ``(source, corner, d_row, d_col)``, ``float64 [3]`` each: pixel ``(r, c)``'s
    centre is ``corner + (r + 0.5) * d_row + (c + 0.5) * d_col``."""
    if not 0 < pose.sod < detector.sid:
        raise ValueError(f"sod must lie between 0 and sid={detector.sid} mm, got {pose.sod}")
    beam, col, row = view_axes(view)
    source = -pose.sod * beam
    centre = source + detector.sid * beam
    d_row, d_col = detector.pixel_spacing * row, detector.pixel_spacing * col
    corner = centre - detector.height / 2 * d_row - detector.width / 2 * d_col
    return source, corner, d_row, d_col


def patient_ray_grid(view: str, detector: Detector, pose: PatientPose,
                     isocentre: np.ndarray | tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """The rays of :func:`patient_rays` as four vectors, so that a batch of images can be
    expanded into rays where they are traced (on a GPU, say).

    Returns ``(source, corner, d_row, d_col)``, ``float64 [3]`` each, in the CT's
    world frame (mm): pixel ``(r, c)``'s centre is ``corner + (r + 0.5) * d_row +
    (c + 0.5) * d_col``.
    """
    source, corner, d_row, d_col = _grid(view, detector, pose)
    rot = pose.rotation()
    t = np.array([pose.tx, pose.ty, pose.tz], dtype=np.float64)
    iso = np.asarray(isocentre, dtype=np.float64).reshape(3)
    # row vectors: (q - t) @ R == R.T @ (q - t); directions rotate without the shift
    return (source - t) @ rot + iso, (corner - t) @ rot + iso, d_row @ rot, d_col @ rot


def patient_rays(view: str, detector: Detector, pose: PatientPose,
                 isocentre: np.ndarray | tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Source and pixel centres in the CT's world frame (mm).

    ``isocentre`` is the world point (``[3]``, mm, the CT's own frame) that
    sits at the room's origin in the nominal pose. The rays are the room rays
    carried back into the patient: ``p = R.T @ (q - t) + isocentre``.
    Returns ``source`` ``float64 [3]`` and ``pixels`` ``float64 [H*W, 3]``.
    """
    source, corner, d_row, d_col = patient_ray_grid(view, detector, pose, isocentre)
    r = np.arange(detector.height) + 0.5
    c = np.arange(detector.width) + 0.5
    pixels = corner[None, None, :] + r[:, None, None] * d_row + c[None, :, None] * d_col
    return source, pixels.reshape(-1, 3)


def project_points(points: np.ndarray, view: str, detector: Detector, pose: PatientPose,
                   isocentre: np.ndarray | tuple[float, float, float]) -> np.ndarray:
    """Pixel coordinates ``float64 [N, 2]`` (row, col; continuous, pixel centres at ``i + 0.5``)
    where world points ``[N, 3]`` (mm) land on the detector. Used to place landmarks and
    to check the renderers against plain geometry."""
    beam, col, row = view_axes(view)
    rot = pose.rotation()
    t = np.array([pose.tx, pose.ty, pose.tz], dtype=np.float64)
    q = (np.asarray(points, dtype=np.float64) - np.asarray(isocentre, dtype=np.float64)) @ rot.T + t
    source = -pose.sod * beam
    d = q - source
    depth = d @ beam
    scale = detector.sid / depth
    u = (d @ col) * scale / detector.pixel_spacing + detector.width / 2
    v = (d @ row) * scale / detector.pixel_spacing + detector.height / 2
    return np.stack([v, u], axis=-1)
