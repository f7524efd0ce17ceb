"""Synthetic lesions written into a chest CT before projection, and datasets of them.

"Detect the nodule" and "segment the effusion" need images with exact ground truth.
Here the lesion is put into the CT (a deformed working copy, see
:mod:`~chexanatomy_lib.ct.cohort`) before the radiograph is rendered, in its
attenuation *and* its labels, so the radiograph shows it and its projected mask
is made by the same rule as every anatomical mask (the pixels whose ray runs more
than ``mask_threshold_mm`` through it, :mod:`~chexanatomy_lib.ct.synthesis`).

The lesion model (what :func:`insert_lesions` draws, within :class:`LesionRanges`):

* **Pulmonary nodule** (registry ``lung_nodule``): a ball of uniform density (HU
  drawn in ``nodule_hu``, solid nodules by default) and diameter drawn in
  ``nodule_diameter_mm``, its centre uniform over the places in either lung
  (``nodule_sides``) where the whole ball lies at least ``nodule_margin_mm``
  inside the lung, clear of the fluid and of the other nodules. The lung voxels
  it covers are relabelled ``lung_nodule``; the attenuation of the voxels on its
  surface is blended by the share of the voxel inside the ball (a linear
  partial-volume ramp one voxel wide).
* **Pleural effusion** (registry ``pleural_effusion``), drawn with probability
  ``effusion_probability`` in one lung (``effusion_sides``): every voxel of that
  lung below a horizontal level (world ``z``, superior = ``+z``) becomes fluid of
  ``effusion_hu`` labelled ``pleural_effusion``; the level lies
  ``effusion_height_fraction`` of the lung's cranio-caudal extent above the lung's
  lowest point, so the fluid fills the dependent base as on an upright film. The
  lung's label shrinks accordingly (its projected mask and lung field lose the
  fluid's pixels); the voxels the level cuts are blended like a nodule's surface.

Lesions get label values ``LESION_LABEL_BASE + id`` (``registry.LESION_LABEL_BASE``,
ids of the registry's ``lesion`` task) appended to the volume's ``label_ids``, so
:func:`~chexanatomy_lib.ct.synthesis.label_groups` finds them like any structure.
A volume without lesions is rendered exactly as before (same image, same masks).

Honest limits: a nodule is a ball of uniform density on the working grid
(2 mm voxels by default), with no spiculation, lobulation, calcification, cavity,
ground glass, vessels or pleural tags; it may lie behind the heart or below the
diaphragm's dome in projection, as real nodules can, but never touches the pleura
(juxtapleural nodules are not drawn). The fluid has a flat top with no meniscus,
no layering along the posterior costophrenic recess, no loculation, no
subpulmonic collection, no mediastinal shift or lung compression beyond the fluid
replacing the lung below its level; its level is horizontal in the CT's frame,
not in the room's (a rolled or tilted pose tilts it with the patient, as in a
supine CT, which an upright patient's fluid would not do). Lesions are drawn
independently of the anatomy's pathology (the CT is a normal chest), with uniform
distributions, not the distributions of a clinical population.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .cohort import PoseRanges, WorkingVolume
from .detector import MU_WATER_PER_MM, hu_to_mu
from .errors import CTInputError
from .synthesis import POSE_COLUMNS, RenderSettings, geometry_meta, label_groups

#: the lesions this module writes into a CT (registry names, channel order of a lesion dataset)
LESIONS = ("lung_nodule", "pleural_effusion")
#: the patient's sides, as in the registry's ``lung_left`` / ``lung_right``
SIDES = ("left", "right")
#: the lung structures lesions go into, per side
LUNGS = {"left": "lung_left", "right": "lung_right"}
#: default structures of a lesion dataset besides :data:`LESIONS`: lung fields, lungs, heart
DEFAULT_STRUCTURES = ("lung_field_left", "lung_field_right", "lung_left", "lung_right", "heart")
#: chapter 1's pose ranges (``notebooks/01_ct_projection.py`` defaults): framed like real films
CHAPTER1_POSES = PoseRanges(translation_mm=(5.0, 10.0, 8.0), rotation_deg=(3.0, 3.0, 3.0), sod_mm=(1650.0, 1750.0))


@dataclass(frozen=True)
class LesionRanges:
    """What is drawn per image (uniform within each range; ranges are inclusive)."""

    nodules: tuple[int, int] = (1, 2)  # nodules per image, (min, max)
    nodule_diameter_mm: tuple[float, float] = (10.0, 25.0)  # ball diameter (mm)
    nodule_hu: tuple[float, float] = (-100.0, 60.0)  # nodule density (HU); solid nodules
    effusion_probability: float = 0.5  # chance an image has an effusion, in [0, 1]
    effusion_height_fraction: tuple[float, float] = (0.15, 0.4)  # fluid height / that lung's cranio-caudal extent, from its lowest point
    effusion_hu: float = 10.0  # fluid density (HU)
    nodule_margin_mm: float = 2.0  # least gap (mm) between a nodule's surface and the lung's surface, the fluid's level and other nodules
    nodule_sides: tuple[str, ...] = SIDES  # lungs a nodule may lie in ("left", "right"); position uniform over their allowed volume
    effusion_sides: tuple[str, ...] = SIDES  # lungs an effusion may fill, one drawn with equal chance

    def __post_init__(self) -> None:
        def pair(name: str, low: float | None = None, high: float | None = None, strict: bool = False) -> None:
            v = getattr(self, name)
            if len(v) != 2 or not all(np.isfinite(float(x)) for x in v):
                raise ValueError(f"{name} must be a (low, high) pair of finite numbers, got {v!r}")
            if not float(v[0]) <= float(v[1]):
                raise ValueError(f"{name} is inverted: low {v[0]} > high {v[1]}")
            if low is not None and (float(v[0]) <= low if strict else float(v[0]) < low):
                raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {v!r}")
            if high is not None and float(v[1]) > high:
                raise ValueError(f"{name} must be <= {high}, got {v!r}")

        pair("nodules", low=0)
        if any(int(n) != n for n in self.nodules):
            raise ValueError(f"nodules must be whole numbers, got {self.nodules!r}")
        pair("nodule_diameter_mm", low=0, strict=True)
        pair("nodule_hu", low=-1000)
        pair("effusion_height_fraction", low=0, high=1, strict=True)
        if not 0 <= self.effusion_probability <= 1:
            raise ValueError(f"effusion_probability must lie in [0, 1], got {self.effusion_probability}")
        if not np.isfinite(self.effusion_hu) or self.effusion_hu < -1000:
            raise ValueError(f"effusion_hu must be a finite HU >= -1000, got {self.effusion_hu}")
        if not self.nodule_margin_mm >= 0:
            raise ValueError(f"nodule_margin_mm must be >= 0, got {self.nodule_margin_mm}")
        for name in ("nodule_sides", "effusion_sides"):
            sides = tuple(getattr(self, name))
            if not sides or any(s not in SIDES for s in sides) or len(set(sides)) != len(sides):
                raise ValueError(f"{name} must be distinct values among {SIDES}, got {sides!r}")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LesionRanges":
        """From :meth:`as_dict` (or a dataset's ``meta["lesions"]["ranges"]``, lists for tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# --- where lesions may go -------------------------------------------------------

@dataclass(frozen=True)
class SideSites:
    """The voxels of one lung of a working volume (all arrays ``[n]``, one entry per voxel)."""

    side: str  # "left" or "right" (the patient's)
    label_indices: tuple[int, ...]  # compact label indices of this lung's lobes
    flat: np.ndarray  # int64 [n] flat (C-order) voxel indices
    z_mm: np.ndarray  # float64 [n] world z of the voxel centres (mm, superior +)
    depth_mm: np.ndarray  # float32 [n] distance (mm) from the voxel centre to the nearest voxel centre outside this lung
    z_range_mm: tuple[float, float]  # (lowest, highest) world z of the lung, voxel edges included (mm)
    faces: np.ndarray  # bool [6] the source CT's faces this lung touches (order of cohort.FACES)


@dataclass(frozen=True)
class LungSites:
    """Where lesions may go in one working volume: its lungs' voxels, their depths below
    the lung surface and heights (:func:`lung_sites`). Computed once per deformed copy
    (a distance transform of each lung, about a second for the bundled CT) and reused
    for every image drawn from it."""

    shape: tuple[int, int, int]  # the volume's grid
    voxel_mm: np.ndarray  # float64 [3] voxel size along each axis (mm)
    sides: dict[str, SideSites] = field(default_factory=dict)  # the lungs present, by side

    def present(self, sides: Sequence[str]) -> list[str]:
        """The sides among ``sides`` whose lung is in the volume."""
        return [s for s in sides if s in self.sides]


def _to_world(ijk: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """World points ``float64 [..., 3]`` (mm) of voxel coordinates ``[..., 3]``.

    NOTE: written as three broadcast products, not ``ijk @ affine[:3, :3].T``: for
    ``[n, 3] @ [3, 3]`` NumPy's matmul took about 50 ms per 100k points in our runs, this about 10 ms."""
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk[..., 0:1] * affine[:3, 0] + ijk[..., 1:2] * affine[:3, 1] + ijk[..., 2:3] * affine[:3, 2] + affine[:3, 3]


def _numpy(a) -> np.ndarray:
    """A NumPy array of a NumPy array or a torch tensor (moved to the CPU)."""
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def lung_sites(volume: WorkingVolume) -> LungSites:
    """The lungs of a working volume (axis-aligned, as :func:`~chexanatomy_lib.ct.cohort.make_working_volume`
    makes them), per side: voxel indices, heights and depths below the lung surface
    (Euclidean distance transform of the lung's mask in mm). A lung absent from the
    volume is left out; raises :class:`~chexanatomy_lib.ct.errors.CTInputError` when
    neither lung is there."""
    from scipy import ndimage

    labels = _numpy(volume.labels)
    affine = np.asarray(volume.affine, dtype=np.float64)
    voxel = np.linalg.norm(affine[:3, :3], axis=0)
    n_labels = len(volume.label_ids)
    out = LungSites(shape=tuple(int(s) for s in labels.shape), voxel_mm=voxel)
    face_labels = np.asarray(volume.face_labels, dtype=bool)
    for side, group in zip(SIDES, label_groups([LUNGS[s] for s in SIDES], volume.label_ids)):
        if not group.include:
            continue
        lut = np.zeros(n_labels, dtype=bool)
        lut[group.include] = True
        mask = lut[labels]
        ijk = np.nonzero(mask)
        if not len(ijk[0]):
            continue
        lo = np.array([int(a.min()) for a in ijk])
        hi = np.array([int(a.max()) + 1 for a in ijk])
        # one voxel of non-lung around the box: the volume's edge bounds the lung too
        sub = np.pad(mask[tuple(slice(a, b) for a, b in zip(lo, hi))], 1)
        depth = ndimage.distance_transform_edt(sub, sampling=voxel)
        depth = depth[tuple(a - o + 1 for a, o in zip(ijk, lo))].astype(np.float32)
        z = affine[2, 0] * ijk[0] + affine[2, 1] * ijk[1] + affine[2, 2] * ijk[2] + affine[2, 3]
        half_z = 0.5 * float(np.abs(affine[2, :3]).sum())
        out.sides[side] = SideSites(
            side=side, label_indices=tuple(int(i) for i in group.include),
            flat=np.ravel_multi_index(ijk, labels.shape).astype(np.int64), z_mm=z, depth_mm=depth,
            z_range_mm=(float(z.min()) - half_z, float(z.max()) + half_z),
            faces=face_labels[:, group.include].any(axis=1))
    if not out.sides:
        raise CTInputError(None, "the volume has no lungs (no lung_left or lung_right lobe labels); "
                                 "lesions go into a lung")
    return out


# --- writing lesions into a volume ----------------------------------------------

def lesion_label_values() -> dict[str, int]:
    """``{lesion: label value}`` of :data:`LESIONS` (``LESION_LABEL_BASE + id``)."""
    from .registry import load_registry

    reg = load_registry()
    return {name: int(reg.get(name).label_value) for name in LESIONS}


def with_lesion_labels(volume: WorkingVolume) -> WorkingVolume:
    """A copy of ``volume`` whose ``label_ids`` also hold every lesion's label value (no
    lesion voxel yet): ``mu`` and ``labels`` copied as C-ordered NumPy arrays (labels
    widened to ``int32`` past 256 labels), ``face_labels`` extended with False columns.
    Rendered, it gives the same image and anatomical masks as ``volume``; the lesion
    masks are empty."""
    ids = np.asarray(volume.label_ids, dtype=np.int64)
    missing = [v for v in lesion_label_values().values() if v not in set(ids.tolist())]
    label_ids = np.concatenate([ids, np.asarray(missing, dtype=np.int64)])
    labels = np.array(_numpy(volume.labels), order="C", copy=True)
    if len(label_ids) > 256 and labels.dtype == np.uint8:
        labels = labels.astype(np.int32)
    mu = np.array(_numpy(volume.mu), dtype=np.float32, order="C", copy=True)
    faces = np.concatenate([np.asarray(volume.face_labels, dtype=bool),
                            np.zeros((volume.face_labels.shape[0], len(missing)), dtype=bool)], axis=1)
    return replace(volume, mu=mu, labels=labels, label_ids=label_ids, face_labels=faces)


def _index_of(volume: WorkingVolume, name: str) -> int:
    return int(np.flatnonzero(np.asarray(volume.label_ids) == lesion_label_values()[name])[0])


def _lung_lut(volume: WorkingVolume, sites: LungSites, sides: Sequence[str]) -> np.ndarray:
    lut = np.zeros(len(volume.label_ids), dtype=bool)
    for s in sides:
        if s in sites.sides:
            lut[list(sites.sides[s].label_indices)] = True
    return lut


def _write_ball(volume: WorkingVolume, sites: LungSites, centre: np.ndarray, radius: float, mu_value: float) -> int:
    """Write a nodule into ``volume`` (in place; arrays from :func:`with_lesion_labels`): lung voxels
    whose centres lie within ``radius`` get the nodule's label, and the attenuation of lung voxels
    within half a voxel of the surface is blended. Returns the number of voxels labelled."""
    mu, labels, affine = volume.mu, volume.labels, np.asarray(volume.affine, dtype=np.float64)
    half = 0.5 * float(sites.voxel_mm.mean())
    reach = radius + half
    corners = centre + reach * np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)])
    inv = np.linalg.inv(affine)
    ijk = corners @ inv[:3, :3].T + inv[:3, 3]
    shape = np.asarray(labels.shape)
    lo = np.clip(np.floor(ijk.min(axis=0)).astype(int), 0, shape)
    hi = np.clip(np.ceil(ijk.max(axis=0)).astype(int) + 1, 0, shape)
    if (hi <= lo).any():
        return 0
    grid = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), axis=-1)
    d = np.linalg.norm(_to_world(grid, affine) - centre, axis=-1)
    cover = np.clip((reach - d) / (2 * half), 0.0, 1.0)  # share of the voxel inside the ball (linear ramp)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub_labels, sub_mu = labels[box], mu[box]  # views
    lung = _lung_lut(volume, sites, SIDES)[sub_labels] & (cover > 0)
    sub_mu[lung] = sub_mu[lung] * (1 - cover[lung]) + mu_value * cover[lung]
    inside = lung & (d <= radius)
    sub_labels[inside] = _index_of(volume, "lung_nodule")
    return int(inside.sum())


def _write_fluid(volume: WorkingVolume, sites: LungSites, side: str, top_z: float, mu_value: float) -> int:
    """Fill the lung of ``side`` below world height ``top_z`` with fluid (in place): lung voxels whose
    centres lie at or below it are relabelled, those the level cuts blended. Returns the voxel count."""
    s = sites.sides[side]
    half_z = 0.5 * float(np.abs(np.asarray(volume.affine)[2, :3]).sum())
    near = s.z_mm < top_z + half_z
    flat, z = s.flat[near], s.z_mm[near]
    labels, mu = volume.labels.reshape(-1), volume.mu.reshape(-1)  # views (C-ordered copies)
    lut = np.zeros(len(volume.label_ids), dtype=bool)
    lut[list(s.label_indices)] = True
    keep = lut[labels[flat]]  # still this lung (not a nodule written earlier)
    flat, z = flat[keep], z[keep]
    cover = np.clip((top_z - z) / (2 * half_z) + 0.5, 0.0, 1.0)  # share of the voxel below the level
    mu[flat] = mu[flat] * (1 - cover) + mu_value * cover
    fluid = z <= top_z
    index = _index_of(volume, "pleural_effusion")
    labels[flat[fluid]] = index
    if fluid.any():  # cut by the CT where the lung is, except at the top (fluid never reaches the apex)
        faces = s.faces.copy()
        faces[int(np.argmax(np.asarray(volume.face_normals)[:, 2]))] = False
        volume.face_labels[:, index] |= faces
    return int(fluid.sum())


def _voxel_ml(sites: LungSites) -> float:
    return float(np.prod(sites.voxel_mm)) / 1000.0


def _side_of(sites: LungSites, centre: np.ndarray, affine: np.ndarray) -> str:
    inv = np.linalg.inv(affine)
    ijk = np.clip(np.round(inv[:3, :3] @ centre + inv[:3, 3]).astype(int), 0, np.asarray(sites.shape) - 1)
    flat = int(np.ravel_multi_index(tuple(ijk), sites.shape))
    for side, s in sites.sides.items():
        if np.isin(flat, s.flat):
            return side
    raise ValueError(f"nodule centre {np.round(centre, 1).tolist()} mm lies in neither lung")


def add_nodule(volume: WorkingVolume, centre_mm: Sequence[float], diameter_mm: float, hu: float = 30.0,
               mu_water: float = MU_WATER_PER_MM, sites: LungSites | None = None) -> tuple[WorkingVolume, dict]:
    """A copy of ``volume`` with one nodule placed by hand: a ball of ``diameter_mm`` (mm) and
    density ``hu`` (HU) centred at ``centre_mm`` (world, RAS+, mm; must lie in a lung voxel).
    Only lung voxels change (a ball reaching past the lung is cut by the pleura). ``sites``:
    :func:`lung_sites` of ``volume`` when already computed. Returns the volume and the
    nodule's dict (as :func:`insert_lesions`; ``volume_ml`` the labelled volume)."""
    if not diameter_mm > 0:
        raise ValueError(f"diameter_mm must be > 0, got {diameter_mm}")
    sites = sites or lung_sites(volume)
    centre = np.asarray(centre_mm, dtype=np.float64).reshape(3)
    side = _side_of(sites, centre, np.asarray(volume.affine, dtype=np.float64))
    out = with_lesion_labels(volume)
    n = _write_ball(out, sites, centre, diameter_mm / 2, float(hu_to_mu(hu, mu_water)))
    return out, {"kind": "lung_nodule", "side": side, "centre_mm": tuple(float(v) for v in centre),
                 "diameter_mm": float(diameter_mm), "hu": float(hu), "volume_ml": n * _voxel_ml(sites)}


def _effusion_level(sites: LungSites, side: str, height_fraction: float) -> tuple[float, float]:
    lo, hi = sites.sides[side].z_range_mm
    height = float(height_fraction) * (hi - lo)
    return height, lo + height


def add_effusion(volume: WorkingVolume, side: str, height_fraction: float, hu: float = 10.0,
                 mu_water: float = MU_WATER_PER_MM, sites: LungSites | None = None) -> tuple[WorkingVolume, dict]:
    """A copy of ``volume`` with a pleural effusion in the lung of ``side`` (``"left"``/``"right"``,
    the patient's): fluid of ``hu`` (HU) up to ``height_fraction`` (in (0, 1]) of that lung's
    cranio-caudal extent above its lowest point. Returns the volume and the effusion's dict
    (as :func:`insert_lesions`)."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, got {side!r}")
    if not 0 < height_fraction <= 1:
        raise ValueError(f"height_fraction must lie in (0, 1], got {height_fraction}")
    sites = sites or lung_sites(volume)
    if side not in sites.sides:
        raise CTInputError(None, f"the volume has no {side} lung to hold an effusion")
    out = with_lesion_labels(volume)
    height, top = _effusion_level(sites, side, height_fraction)
    n = _write_fluid(out, sites, side, top, float(hu_to_mu(hu, mu_water)))
    return out, _effusion_dict(side, height_fraction, height, top, hu, n * _voxel_ml(sites))


def _effusion_dict(side: str, fraction: float, height: float, top: float, hu: float, ml: float) -> dict:
    return {"kind": "pleural_effusion", "side": side, "height_fraction": float(fraction), "height_mm": float(height),
            "top_z_mm": float(top), "hu": float(hu), "volume_ml": float(ml)}


def insert_lesions(volume: WorkingVolume, rng: np.random.Generator, ranges: LesionRanges = LesionRanges(),
                   mu_water: float = MU_WATER_PER_MM,
                   sites: LungSites | None = None) -> tuple[WorkingVolume, list[dict]]:
    """A copy of the working volume with lesions drawn from ``ranges`` written into its attenuation
    and labels, and one dict per lesion (the effusion first, when drawn, then the nodules).

    ``volume``: a working volume (NumPy arrays, or tensors, which are copied to the CPU);
    ``rng``: every draw comes from it, in a fixed order (effusion: presence, side, height;
    then the number of nodules; then per nodule diameter, HU, position), so one seed gives
    the same lesions, and the effusion's draws do not depend on its probability;
    ``mu_water``: attenuation of water (1/mm), as the volume was made with;
    ``sites``: :func:`lung_sites` of ``volume`` (computed when None; pass it to draw many
    images from one volume).

    The copy's ``label_ids`` hold both lesions' label values even when a lesion is not drawn
    (its mask then renders empty, ``absent``). Dicts: nodule ``{kind: "lung_nodule", side,
    centre_mm: (x, y, z) world RAS+ mm, diameter_mm, hu, volume_ml}``; effusion ``{kind:
    "pleural_effusion", side, height_fraction, height_mm, top_z_mm (world z of the level),
    hu, volume_ml}``. Raises ValueError when no place in the allowed lungs fits a drawn
    nodule (too large for the lungs, or crowded out by the fluid and other nodules).
    """
    sites = sites or lung_sites(volume)
    if tuple(sites.shape) != tuple(np.shape(volume.labels)):
        raise ValueError(f"sites were computed for a {sites.shape} grid, the volume is "
                         f"{tuple(np.shape(volume.labels))}")
    nodule_sides = sites.present(ranges.nodule_sides)
    effusion_sides = sites.present(ranges.effusion_sides)
    if ranges.nodules[1] > 0 and not nodule_sides:
        raise CTInputError(None, f"no lung on the sides {ranges.nodule_sides} for nodules")
    if ranges.effusion_probability > 0 and not effusion_sides:
        raise CTInputError(None, f"no lung on the sides {ranges.effusion_sides} for an effusion")
    out = with_lesion_labels(volume)
    affine = np.asarray(out.affine, dtype=np.float64)
    lesions: list[dict] = []

    # effusion: always three draws
    u, k, fraction = rng.random(), rng.integers(2), rng.uniform(*ranges.effusion_height_fraction)
    fluid = None
    if u < ranges.effusion_probability:
        side = effusion_sides[int(k) % len(effusion_sides)]
        height, top = _effusion_level(sites, side, fraction)
        n = _write_fluid(out, sites, side, top, float(hu_to_mu(ranges.effusion_hu, mu_water)))
        lesions.append(_effusion_dict(side, fraction, height, top, ranges.effusion_hu, n * _voxel_ml(sites)))
        fluid = (side, top)

    # nodules, one after the other, each clear of the fluid and of the earlier ones
    count = int(rng.integers(int(ranges.nodules[0]), int(ranges.nodules[1]) + 1))
    jitter_bound = 0.5 * float(np.linalg.norm(sites.voxel_mm))  # the centre moves within its voxel
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(count):
        diameter = float(rng.uniform(*ranges.nodule_diameter_mm))
        hu = float(rng.uniform(*ranges.nodule_hu))
        radius = diameter / 2
        need = radius + ranges.nodule_margin_mm + jitter_bound
        pool_flat, pool_side = [], []
        for i, side in enumerate(nodule_sides):
            s = sites.sides[side]
            ok = s.depth_mm >= need
            if fluid is not None and fluid[0] == side:
                ok &= s.z_mm - need >= fluid[1]
            pool_flat.append(s.flat[ok])
            pool_side.append(np.full(int(ok.sum()), i))
        flat, pool_side = np.concatenate(pool_flat), np.concatenate(pool_side)
        clear = np.ones(len(flat), dtype=bool)
        if placed:
            world = _to_world(np.stack(np.unravel_index(flat, sites.shape), axis=-1), affine)
            for c, r in placed:
                clear &= ((world - c) ** 2).sum(axis=1) >= (need + r) ** 2
        if not clear.any():
            deepest = max(float(sites.sides[s].depth_mm.max()) for s in nodule_sides)
            raise ValueError(f"no place in the {'/'.join(nodule_sides)} lung(s) fits a nodule of {diameter:.1f} mm "
                             f"(needs {need:.1f} mm of lung around its centre; the deepest lung voxel is "
                             f"{deepest:.1f} mm deep{', and fluid and earlier nodules take room' if lesions else ''}); "
                             "lower nodule_diameter_mm, nodule_margin_mm or nodules")
        candidates = np.flatnonzero(clear)
        pick = int(candidates[int(rng.integers(len(candidates)))])
        centre = _to_world(np.array(np.unravel_index(flat[pick], sites.shape)) + rng.uniform(-0.5, 0.5, size=3), affine)
        n = _write_ball(out, sites, centre, radius, float(hu_to_mu(hu, mu_water)))
        placed.append((centre, radius))
        lesions.append({"kind": "lung_nodule", "side": nodule_sides[int(pool_side[pick])],
                        "centre_mm": tuple(float(v) for v in centre), "diameter_mm": diameter, "hu": hu,
                        "volume_ml": n * _voxel_ml(sites)})
    return out, lesions


def lesion_columns(lesions: Sequence[dict]) -> dict[str, Any]:
    """The ``index.csv`` columns of one image's lesions (one scalar each): ``n_nodules``;
    ``nodule_diameters_mm``, ``nodule_hu``, ``nodule_sides`` and ``nodule_centres_mm`` as
    text, one entry per nodule separated by ``;`` (a centre as ``x y z``, world RAS+ mm of
    the deformed copy; empty when none); ``has_effusion``; ``effusion_side`` (empty when
    none), ``effusion_height_mm``, ``effusion_top_z_mm``, ``effusion_volume_ml`` (NaN when none)."""
    nodules = [d for d in lesions if d["kind"] == "lung_nodule"]
    effusion = next((d for d in lesions if d["kind"] == "pleural_effusion"), None)
    return {
        "n_nodules": len(nodules),
        "nodule_diameters_mm": ";".join(f"{d['diameter_mm']:.2f}" for d in nodules),
        "nodule_hu": ";".join(f"{d['hu']:.1f}" for d in nodules),
        "nodule_sides": ";".join(d["side"] for d in nodules),
        "nodule_centres_mm": ";".join(" ".join(f"{v:.2f}" for v in d["centre_mm"]) for d in nodules),
        "has_effusion": effusion is not None,
        "effusion_side": effusion["side"] if effusion else "",
        "effusion_height_mm": effusion["height_mm"] if effusion else float("nan"),
        "effusion_top_z_mm": effusion["top_z_mm"] if effusion else float("nan"),
        "effusion_volume_ml": effusion["volume_ml"] if effusion else float("nan"),
    }


# --- a dataset of lesion images -------------------------------------------------

def synthesize_lesion_dataset(
    case: Any,  # one CT: a CTCase or a manifest CaseSpec (loaded here)
    out_path: str | Path,  # dataset folder to write (must not exist unless overwrite)
    n_images: int,  # lesion draws, each rendered once per view
    settings: RenderSettings | None = None,  # geometry, detector, masks (None: defaults); a dataset's: from_dict(meta["render_settings"])
    ranges: LesionRanges = LesionRanges(),  # what is drawn per image
    structures: Sequence[str] | None = None,  # channels besides LESIONS (None: DEFAULT_STRUCTURES)
    views: Sequence[str] = ("pa",),  # "pa" and/or "lateral"
    n_copies: int = 4,  # deformed copies of the CT (at most n_images are made); image k uses copy k % n_copies
    seed: int = 0,  # seeds copies, poses, noise, lesions and the split
    amplitude_mm: float = 8.0,  # deformation control-point displacement s.d. (mm)
    scale_range: float = 0.08,  # anisotropic scale factors in [1 - r, 1 + r]
    control_points: int = 5,  # deformation control points per axis
    pose_ranges: PoseRanges = CHAPTER1_POSES,  # patient pose ranges (default: chapter 1's)
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),  # train, val, test fractions of the copies
    overwrite: bool = False,  # replace an existing dataset
    progress: bool = True,  # tqdm progress bar
    threads: int | None = 1,  # CPU threads: images rendered this many at a time, one torch thread each (None: as torch is set)
) -> Path:
    """Render ``n_images`` radiographs of one CT with lesions into a projected dataset; returns ``out_path``.

    Each image has its own lesion draw (:func:`insert_lesions` with ``ranges``), its own
    pose (``pose_ranges``; one pose for all ``views`` of an image, so ``n_images x
    len(views)`` rows) and a deformed copy among ``n_copies`` (image ``k`` uses copy ``k %
    n_copies``). The CT is prepared once, each copy built once (with its :func:`lung_sites`),
    and each image's lesions written into a copy of that copy's arrays before it is rendered
    (:func:`~chexanatomy_lib.ct.synthesis.render_views`), with ``settings`` as chapter 1
    renders (framing ``centre_on``, field, detector, mask threshold and smoothing).

    The dataset (:class:`~chexanatomy_lib.ct.dataset.ProjectedDataset`) has the channels
    ``structures`` then :data:`LESIONS`; a lesion not drawn in an image has an empty mask
    and ``absent`` True. ``index.csv`` rows hold ``image_id`` (``<copy_id>_<view>_l<k>``),
    ``case_id``, ``copy_id``, ``view``, ``split``, the pose, copy and ``noise_seed`` columns
    of chapter 1, ``lesion_seed`` (``insert_lesions(copy, np.random.default_rng(lesion_seed),
    ranges)`` draws the image's lesions again) and :func:`lesion_columns`. Splits are by
    deformed copy (one CT); ``meta["lesions"]`` records the ranges, the seed and the model.
    Everything is drawn from ``seed``: the same arguments give the same dataset, whatever
    ``threads``. Every argument is checked before anything is rendered.

    NOTE: ``threads`` renders that many images at once, each with one torch thread, rather than
    giving one image several intra-op threads, which the ray marcher's small chunks gain little
    from (:func:`~chexanatomy_lib.ct.projector.torch_threads`); deformed copies are resampled
    with ``threads`` torch threads. Cost on the bundled CT at 256 px, PA: 30 s of CPU for 40
    images of 4 copies, loading the CT included (about 8 s to load and prepare the CT, 2 s per
    copy with its lung sites, 0.4 s per image).
    """
    from tqdm.auto import tqdm

    from .cohort import SourceCT, _stable_hash, make_working_volume, sample_copies, sample_poses
    from .dataset import DatasetWriter, make_splits, pack_masks
    from .geometry import VIEWS
    from .projector import RayMarcher, torch_threads
    from .registry import LESION_LABEL_BASE, load_registry
    from .synthesis import _case_of, _check_case, centre_labels, render_views

    settings = settings or RenderSettings()
    if isinstance(settings, dict):
        settings = RenderSettings.from_dict(settings)
    if not isinstance(ranges, LesionRanges):
        raise TypeError(f"ranges must be a LesionRanges, got {type(ranges).__name__}")
    if isinstance(n_images, bool) or not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise ValueError(f"n_images must be an integer >= 1, got {n_images!r}")
    if isinstance(n_copies, bool) or not isinstance(n_copies, (int, np.integer)) or n_copies < 1:
        raise ValueError(f"n_copies must be an integer >= 1, got {n_copies!r}")
    views = list(views)
    if not views or any(v not in VIEWS for v in views) or len(set(views)) != len(views):
        raise ValueError(f"views must be distinct values among {VIEWS}, got {views}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    reg = load_registry()
    names = [str(s) for s in (DEFAULT_STRUCTURES if structures is None else structures)]
    for name in names:
        reg.get(name)  # UnknownStructureError names the closest
    names = [n for n in names if n not in LESIONS] + list(LESIONS)
    case = _case_of(case)
    _check_case(case)
    n_threads = int(threads) if threads is not None else None
    with torch_threads(n_threads):
        source = SourceCT.from_case(case, settings.mu_water)  # the CT prepared once
    lungs = {reg.get(m).ids["total"] for side in SIDES for m in reg.expand(LUNGS[side])}
    if not lungs & {int(i) for i in source.label_ids}:
        where = case.source.get("ct") if isinstance(getattr(case, "source", None), dict) else None
        raise CTInputError(where, f"case {case.case_id!r} has no lung labels (lobes of lung_left or lung_right); "
                                  "lesions go into a lung")
    case_id = str(case.case_id)
    centre = centre_labels(settings, source.label_ids)

    # what every image is: copy, pose, noise and lesion seeds (drawn per image index)
    copies = sample_copies(case_id, min(int(n_copies), int(n_images)), seed, amplitude_mm, scale_range,
                           control_points)
    jobs: list[tuple[Any, list[dict]]] = [(c, []) for c in copies]
    for k in range(int(n_images)):
        copy = copies[k % len(copies)]
        rng = np.random.default_rng([int(seed), _stable_hash(case_id), 7, k])
        pose = sample_poses(1, rng, pose_ranges)[0]
        noise = [int(rng.integers(2**31)) for _ in views]
        lesion_seed = int(rng.integers(2**31))
        jobs[k % len(copies)][1].append({"k": k, "pose": pose, "noise": noise, "lesion_seed": lesion_seed})
    splits = make_splits([c.copy_id for c in copies], unit="copy", fractions=split_fractions, seed=seed)
    split_of = {str(i): s for s, ids in splits["assignment"].items() for i in ids}

    meta = {
        **geometry_meta(settings, views),
        "cohort": {"case_id": case_id, "n_images": int(n_images), "n_copies": len(copies), "seed": int(seed),
                   "amplitude_mm": amplitude_mm, "scale_range": scale_range, "control_points": control_points,
                   "pose_ranges": pose_ranges.as_dict(), "rule": "image k: copy k % n_copies, its own pose for "
                   "all views"},
        "lesions": {"structures": list(LESIONS), "ranges": ranges.as_dict(), "seed": int(seed),
                    "label_base": LESION_LABEL_BASE, "model": "chexanatomy_lib.ct.lesions: nodules are balls of "
                    "uniform density inside a lung; an effusion is fluid filling one lung below a horizontal level"},
        "split_unit": "copy",
        "shard": None,
    }
    def render_one(volume: WorkingVolume, sites: LungSites, groups: list, job: dict) -> tuple:
        lesioned, lesions = insert_lesions(volume, np.random.default_rng(job["lesion_seed"]), ranges,
                                           settings.mu_water, sites)
        marcher = RayMarcher(lesioned.mu, lesioned.labels, lesioned.affine, len(lesioned.label_ids),
                             settings.step_mm)
        images, masks, absent, truncated = render_views(lesioned, views, [job["pose"]] * len(views), settings,
                                                        groups, job["noise"], marcher, to_numpy=False)
        return images.numpy(), pack_masks(masks).numpy(), absent, truncated, lesions

    with DatasetWriter(out_path, names, settings.image_size, meta, splits=splits, overwrite=overwrite) as writer:
        bar = tqdm(total=int(n_images) * len(views), desc="lesion DRRs", disable=not progress, mininterval=10.0)
        pool = ThreadPoolExecutor(n_threads) if n_threads and n_threads > 1 else None
        try:
            for copy, images in jobs:
                with torch_threads(n_threads):
                    volume = with_lesion_labels(make_working_volume(source, settings.working_spacing_mm, copy,
                                                                    centre_on=centre))
                sites = lung_sites(volume)
                groups = label_groups(names, volume.label_ids)
                with torch_threads(1 if pool is not None else n_threads):
                    run = functools.partial(render_one, volume, sites, groups)
                    results = pool.map(run, images) if pool is not None else map(run, images)
                    for job, (imgs, packed, absent, truncated, lesions) in zip(images, results):
                        columns = lesion_columns(lesions)
                        for v, view in enumerate(views):
                            row = {"image_id": f"{copy.copy_id}_{view}_l{job['k']:03d}", "case_id": case_id,
                                   "copy_id": copy.copy_id, "view": view, "split": split_of[copy.copy_id],
                                   **{c: job["pose"].as_dict()[c] for c in POSE_COLUMNS}, **copy.as_row(),
                                   "noise_seed": job["noise"][v], "lesion_seed": job["lesion_seed"], **columns}
                            writer.add_packed(imgs[v], packed[v], absent[v], truncated[v], row)
                        bar.update(len(views))
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
    return Path(out_path)


def render_lesion_row(renderer: Any, row: Any, ranges: LesionRanges, image_size: int | None = None,
                      structures: Sequence[str] | None = None, threads: int | None = 1) -> tuple:
    """Render one row of a lesion dataset again from its CT: ``(image, masks, absent, truncated,
    lesions)`` as :func:`~chexanatomy_lib.ct.synthesis.render_view`, plus the lesion dicts.

    ``renderer``: a :class:`~chexanatomy_lib.ct.synthesis.CaseRenderer` of the row's case with
    the dataset's render settings; ``ranges``: the dataset's (``LesionRanges.from_dict(
    meta["lesions"]["ranges"])``); ``image_size``: pixels per side (None: the settings');
    ``structures``: channel order (None: :data:`DEFAULT_STRUCTURES` + :data:`LESIONS`);
    ``threads``: torch threads while rendering (None: leave as is). At the dataset's own
    settings the outputs equal the stored ones.
    """
    from .cohort import CopySpec
    from .geometry import PatientPose
    from .projector import torch_threads
    from .synthesis import render_view

    row = dict(row)
    if renderer.case_id != str(row["case_id"]):
        raise ValueError(f"row belongs to case {row['case_id']!r}, the renderer to {renderer.case_id!r}")
    settings = renderer.settings if image_size is None else replace(renderer.settings, image_size=int(image_size))
    names = list(structures) if structures is not None else [*DEFAULT_STRUCTURES, *LESIONS]
    pose = PatientPose(**{k: float(row[k]) for k in POSE_COLUMNS})
    with torch_threads(threads):
        volume = renderer._volume_of(CopySpec.from_row(row))
        lesioned, lesions = insert_lesions(volume, np.random.default_rng(int(row["lesion_seed"])), ranges,
                                           settings.mu_water)
        out = render_view(lesioned, str(row["view"]), pose, settings, label_groups(names, lesioned.label_ids),
                          int(row["noise_seed"]))
    return (*out, lesions)
