"""A synthetic cohort from few CTs: deformed copies and patient poses.

One CT yields many distinct radiographs:

* **Deformed copies** (:class:`CopySpec`): an anisotropic scaling about the
  isocentre (a wider, deeper or taller chest) and a smooth random displacement
  field (random vectors on a coarse grid of control points, upsampled
  trilinearly), applied to CT and labels together.
* **Poses** (:class:`PatientPose`, sampled by :func:`sample_poses`): a rigid
  placement of the patient (translations, rotations about all three axes) and
  the source-to-patient distance, which sets the magnification.

A copy is materialised once as a :class:`WorkingVolume` (attenuation and
compact labels on an isotropic working grid, :func:`make_working_volume`) and
then projected in every pose and view.

NOTE: the deformation resamples the volume once per copy rather than moving the
ray sample points: a copy is projected ``poses_per_copy x views`` times, and the
per-sample cost of evaluating the field (another interpolation per sample)
would be paid on every image, while resampling 2 mm voxels costs about one image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .detector import MU_WATER_PER_MM, hu_to_mu
from .geometry import PatientPose, view_axes

#: the six faces of a voxel grid as (axis, side); side 0 = index 0, 1 = last index
FACES = tuple((axis, side) for axis in range(3) for side in (0, 1))


@dataclass(frozen=True)
class CopySpec:
    """One deformed copy of a source CT (all it takes to rebuild it)."""

    case_id: str  # source CT
    copy_id: str  # unique over the dataset: "<case_id>_c<k>"
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # stretch along x (L-R), y (A-P), z (S-I)
    amplitude_mm: float = 0.0  # standard deviation of each control-point displacement (mm)
    control_points: int = 5  # control points per axis of the displacement grid
    seed: int = 0  # seed of the displacement field

    def as_row(self) -> dict:
        """Columns this copy contributes to a dataset's ``index.csv``."""
        return {"scale_x": self.scale[0], "scale_y": self.scale[1], "scale_z": self.scale[2],
                "deform_amplitude_mm": self.amplitude_mm, "deform_control_points": self.control_points,
                "deform_seed": self.seed}

    @classmethod
    def from_row(cls, row: dict) -> "CopySpec":
        return cls(case_id=str(row["case_id"]), copy_id=str(row["copy_id"]),
                   scale=(float(row["scale_x"]), float(row["scale_y"]), float(row["scale_z"])),
                   amplitude_mm=float(row["deform_amplitude_mm"]),
                   control_points=int(row["deform_control_points"]), seed=int(row["deform_seed"]))


@dataclass(frozen=True)
class PoseRanges:
    """Uniform ranges from which patient poses are drawn (symmetric about 0)."""

    translation_mm: tuple[float, float, float] = (30.0, 20.0, 30.0)  # max |shift| along x, y, z (mm)
    rotation_deg: tuple[float, float, float] = (5.0, 8.0, 8.0)  # max |rotation| about x, y, z (degrees)
    sod_mm: tuple[float, float] = (1550.0, 1700.0)  # source-to-isocentre distance range (mm)

    def as_dict(self) -> dict:
        return asdict(self)


def sample_copies(case_id: str, n_copies: int, seed: int, amplitude_mm: float = 8.0,
                  scale_range: float = 0.08, control_points: int = 5) -> list[CopySpec]:
    """``n_copies`` deformed copies of one case, seeded by ``(seed, case_id)``.

    Scale factors are uniform in ``[1 - scale_range, 1 + scale_range]`` per axis.
    """
    if n_copies < 1:
        raise ValueError(f"n_copies must be >= 1, got {n_copies}")
    if amplitude_mm < 0 or not 0 <= scale_range < 1:
        raise ValueError("amplitude_mm must be >= 0 and scale_range in [0, 1)")
    rng = np.random.default_rng([int(seed), _stable_hash(case_id)])
    out = []
    for k in range(n_copies):
        scale = tuple(float(s) for s in rng.uniform(1 - scale_range, 1 + scale_range, size=3))
        out.append(CopySpec(case_id=case_id, copy_id=f"{case_id}_c{k:03d}", scale=scale,  # type: ignore[arg-type]
                            amplitude_mm=float(amplitude_mm), control_points=int(control_points),
                            seed=int(rng.integers(2**31))))
    return out


def sample_poses(n: int, rng: np.random.Generator, ranges: PoseRanges) -> list[PatientPose]:
    """``n`` poses drawn uniformly within ``ranges``."""
    out = []
    for _ in range(n):
        t = rng.uniform(-1, 1, size=3) * np.asarray(ranges.translation_mm, dtype=float)
        r = rng.uniform(-1, 1, size=3) * np.asarray(ranges.rotation_deg, dtype=float)
        sod = rng.uniform(*ranges.sod_mm)
        out.append(PatientPose(*(float(v) for v in t), *(float(v) for v in r), sod=float(sod)))
    return out


@dataclass
class WorkingVolume:
    """A CT (or a deformed copy) ready for projection.

    ``mu``: ``float32 [X, Y, Z]`` linear attenuation (1/mm) on an isotropic grid;
    ``labels``: ``uint8``/``int32 [X, Y, Z]`` compact label indices (NumPy arrays,
    or tensors on a GPU when made there); ``label_ids``:
    ``int64 [L]`` the original id of each compact index (``label_ids[0] == 0``);
    ``affine``: ``float64 [4, 4]`` voxel -> world (mm, the source CT's RAS+
    frame); ``isocentre``: ``float64 [3]`` world point at the room's origin;
    ``face_labels``: ``bool [6, L]`` which labels touch each face of the
    *source* CT volume (order of :data:`FACES`); ``face_normals``: ``float64
    [6, 3]`` outward unit normals of those faces (world).
    """

    mu: "np.ndarray | torch.Tensor"
    labels: "np.ndarray | torch.Tensor"
    label_ids: np.ndarray
    affine: np.ndarray
    isocentre: np.ndarray
    face_labels: np.ndarray
    face_normals: np.ndarray
    copy: CopySpec | None = None  # the deformation it was made with (None: the CT as is)

    def truncating_labels(self, view: str, pose: PatientPose, max_cos: float = np.cos(np.pi / 4)) -> np.ndarray:
        """``bool [L]``: labels cut by a volume face that bounds the projected field.

        A face bounds the projection when the beam runs along it (the angle
        between its normal and the beam, in the patient frame, exceeds 45 deg):
        in PA the top, bottom and side faces, not the front and back ones.
        """
        beam = view_axes(view)[0] @ pose.rotation()  # room beam in the patient frame
        cut = np.zeros(self.face_labels.shape[1], dtype=bool)
        for f in range(6):
            if abs(float(self.face_normals[f] @ beam)) < max_cos:
                cut |= self.face_labels[f]
        cut[0] = False
        return cut


def _stable_hash(text: str) -> int:
    """A seed from a string that is the same in every process (``hash`` is salted)."""
    import zlib

    return zlib.crc32(text.encode("utf-8"))


def compact_lookup(labelmap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(compact uint8/int32 labelmap, ids int64 [L])`` with ``ids[0] == 0``."""
    lab = np.asarray(labelmap)
    if lab.min() < 0:
        raise ValueError("labelmap has negative ids")
    counts = np.bincount(lab.reshape(-1).astype(np.int64))
    ids = np.flatnonzero(counts)
    ids = np.union1d([0], ids).astype(np.int64)
    lut = np.zeros(int(ids.max()) + 1, dtype=np.uint8 if len(ids) <= 256 else np.int32)
    lut[ids] = np.arange(len(ids))
    return lut[lab], ids


def _face_labels(compact: np.ndarray, n_labels: int) -> np.ndarray:
    out = np.zeros((6, n_labels), dtype=bool)
    for f, (axis, side) in enumerate(FACES):
        sl = np.take(compact, 0 if side == 0 else compact.shape[axis] - 1, axis=axis)
        out[f, np.unique(sl)] = True
    return out


def _face_normals(affine: np.ndarray) -> np.ndarray:
    out = np.zeros((6, 3))
    for f, (axis, side) in enumerate(FACES):
        n = affine[:3, axis] / np.linalg.norm(affine[:3, axis])
        out[f] = n if side == 1 else -n
    return out


@dataclass
class SourceCT:
    """A CT case prepared once for resampling into working volumes.

    ``mu``: ``float32 [X, Y, Z]`` attenuation (1/mm) on the CT's own grid;
    ``compact``: compact label indices on that grid; ``label_ids``: ``int64 [L]``;
    ``affine``: ``float64 [4, 4]``; ``centre``: ``float64 [3]`` world centre of the volume;
    ``face_labels``, ``face_normals``: see :class:`WorkingVolume`.
    """

    case_id: str
    mu: np.ndarray
    compact: np.ndarray
    label_ids: np.ndarray
    affine: np.ndarray
    centre: np.ndarray
    face_labels: np.ndarray
    face_normals: np.ndarray

    def arrays_on(self, device) -> tuple:
        """``(mu, compact)`` as tensors on ``device``; a GPU copy is made once and kept, so
        that every deformed copy of this CT is resampled without uploading it again."""
        import torch

        dev = torch.device(device)
        if dev.type == "cpu":
            return torch.from_numpy(self.mu), torch.from_numpy(np.ascontiguousarray(self.compact))
        cache = self.__dict__.setdefault("_on_device", {})
        if str(dev) not in cache:
            cache.clear()
            cache[str(dev)] = (torch.from_numpy(self.mu).to(dev),
                               torch.from_numpy(np.ascontiguousarray(self.compact)).to(dev))
        return cache[str(dev)]

    @classmethod
    def from_case(cls, case, mu_water: float = MU_WATER_PER_MM) -> "SourceCT":
        """From a :class:`~chexanatomy_lib.ct.io.CTCase` (HU, ``total`` labelmap, RAS+ affine)."""
        affine = np.asarray(case.affine, dtype=np.float64)
        compact, ids = compact_lookup(case.labelmap)
        shape = np.asarray(case.volume.shape)
        return cls(case_id=str(case.case_id), mu=hu_to_mu(case.volume, mu_water), compact=compact,
                   label_ids=ids, affine=affine, centre=affine[:3, :3] @ ((shape - 1) / 2.0) + affine[:3, 3],
                   face_labels=_face_labels(compact, len(ids)), face_normals=_face_normals(affine))


def make_working_volume(source: "SourceCT", spacing_mm: float = 2.0, copy: CopySpec | None = None,
                        margin_mm: float = 0.0, device=None, centre_on=None) -> WorkingVolume:
    """Resample a prepared CT (optionally deformed by ``copy``) onto an isotropic grid.

    The output grid is axis-aligned in world, ``spacing_mm`` per voxel, centred
    on the source volume, its voxels covering the source volume's box (outer
    voxel faces) plus ``margin_mm`` on every side. The isocentre is the source volume's
    centre ``c``, or with ``centre_on`` (compact label indices, e.g. the lungs') the centre
    of those labels' bounding box in the resampled (deformed) copy, as a radiographer
    centres the field on the chest of each patient. Attenuation
    is sampled trilinearly, labels by nearest voxel, through the inverse map
    ``p = c + (q - c) / scale + u(q)`` from output point ``q`` to source point
    ``p`` (``u`` the displacement, trilinear between the control points).
    Output voxels that map outside the source volume are air with no label.

    ``device``: where to resample (None: the CPU, in slabs of about a million
    voxels, returning NumPy arrays). On a GPU the whole grid is resampled at
    once and ``mu`` and ``labels`` stay there as tensors, ready for a
    :class:`~chexanatomy_lib.ct.projector.RayMarcher` on that device.
    """
    import torch
    import torch.nn.functional as F

    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be > 0, got {spacing_mm}")
    affine = source.affine
    shape_in = np.asarray(source.mu.shape)
    # the volume's outer faces (voxel centres +- half a voxel), in world mm
    corners = np.array([[i, j, k] for i in (-0.5, shape_in[0] - 0.5) for j in (-0.5, shape_in[1] - 0.5)
                        for k in (-0.5, shape_in[2] - 0.5)], dtype=np.float64)
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    extent = world.max(axis=0) - world.min(axis=0) + 2 * margin_mm
    shape = tuple(int(n) for n in np.ceil(extent / spacing_mm - 1e-6).astype(int))
    centre = source.centre
    origin = centre - (np.asarray(shape) - 1) / 2.0 * spacing_mm  # output grid centred on the CT
    out_affine = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    out_affine[:3, 3] = origin

    # Source voxel coordinates of every output voxel. The map is affine plus a
    # displacement that is trilinear between control points, so evaluating it on
    # the control grid and upsampling trilinearly is exact (and cheap).
    inv = np.linalg.inv(affine)
    scale = np.asarray(copy.scale if copy is not None else (1.0, 1.0, 1.0), dtype=np.float64)
    g = max(2, int(copy.control_points)) if copy is not None else 2
    ctrl = [np.linspace(0, n - 1, g) for n in shape]
    q = origin + spacing_mm * np.stack(np.meshgrid(*ctrl, indexing="ij"), axis=-1)  # [g, g, g, 3] world
    p = centre + (q - centre) / scale
    if copy is not None and copy.amplitude_mm > 0:
        rng = np.random.default_rng(copy.seed)
        p = p + rng.normal(0.0, copy.amplitude_mm, size=(g, g, g, 3))
    v_ctrl = p @ inv[:3, :3].T + inv[:3, 3]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    v_ctrl = torch.from_numpy(v_ctrl.astype(np.float32)).permute(3, 0, 1, 2)[None].to(dev)
    v_all = F.interpolate(v_ctrl, size=shape, mode="trilinear", align_corners=True)[0]  # [3, X, Y, Z]

    mu_in, lab_in = source.arrays_on(dev)
    lab_in = lab_in.reshape(-1)
    mu_out = torch.empty(shape, dtype=torch.float32, device=dev)
    lab_out = torch.empty(shape, dtype=lab_in.dtype, device=dev)
    # bounded memory on the CPU (~1M points per pass); one pass on a GPU
    slab = max(1, 1_000_000 // (shape[0] * shape[1])) if dev.type == "cpu" else shape[2]
    dims_in = torch.tensor(shape_in, dtype=torch.float32, device=dev)
    shape_t = torch.from_numpy(shape_in).to(dev)
    zero = torch.zeros((), dtype=lab_in.dtype, device=dev)
    for z0 in range(0, shape[2], slab):
        z1 = min(shape[2], z0 + slab)
        v = v_all[:, :, :, z0:z1].permute(1, 2, 3, 0)
        grid = (2.0 * v / (dims_in - 1).clamp(min=1) - 1.0).flip(-1)
        idx = torch.round(v).long()
        inside = ((idx >= 0) & (idx < shape_t)).all(dim=-1)  # within the volume's box of voxels
        # NOTE: "border" padding keeps the outermost half voxel at full value (as an
        # exact voxel-crossing renderer sees it); beyond the box it is air.
        mu = F.grid_sample(mu_in[None, None], grid[None], mode="bilinear",
                           padding_mode="border", align_corners=True)[0, 0]
        mu_out[:, :, z0:z1] = torch.where(inside, mu, torch.zeros((), device=dev))
        idx = torch.minimum(idx.clamp(min=0), shape_t - 1)
        flat = (idx[..., 0] * int(shape_in[1]) + idx[..., 1]) * int(shape_in[2]) + idx[..., 2]
        lab_out[:, :, z0:z1] = torch.where(inside, lab_in[flat], zero)

    isocentre = centre.copy()
    if centre_on:
        sel = torch.isin(lab_out, torch.as_tensor(list(centre_on), dtype=lab_out.dtype, device=dev))
        extent = [torch.nonzero(sel.any(dim=tuple(d for d in range(3) if d != a))).flatten() for a in range(3)]
        if all(len(e) for e in extent):  # the labels are in the copy: their box's centre, in world mm
            mid = np.array([(float(e[0]) + float(e[-1])) / 2.0 for e in extent])
            isocentre = out_affine[:3, :3] @ mid + out_affine[:3, 3]
    if dev.type == "cpu":
        mu_out, lab_out = mu_out.numpy(), lab_out.numpy()
    return WorkingVolume(mu=mu_out, labels=lab_out, label_ids=source.label_ids,
                         affine=out_affine, isocentre=isocentre, face_labels=source.face_labels,
                         face_normals=source.face_normals, copy=copy)
