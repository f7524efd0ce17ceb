"""Synthesis of a projected dataset: DRRs and per-structure masks from CT cases.

:func:`synthesize_dataset` turns CT cases into a projected dataset (format:
:mod:`chexanatomy_lib.ct.dataset`): for every case ``n_copies`` deformed
copies, for every copy and view ``poses_per_copy`` poses, each rendered as a
radiograph plus one binary mask per structure. A :class:`CaseRenderer` renders
any row of such a dataset again, at any resolution.

A structure's mask is the set of pixels whose ray runs more than
``mask_threshold_mm`` through it (through the union of its members for a
derived structure such as ``lung_left``), anti-aliased when
``mask_smoothing_mm`` > 0 (:func:`~chexanatomy_lib.ct.projector.smooth_masks`:
the voxel staircase of the labels becomes a smooth outline). Per image and
structure two flags are stored: *absent* (the mask is empty) and *truncated* (the structure is cut by
the CT volume's edge where that edge bounds the projection, or its mask touches
the image border or the collimator's edge), so scores can leave out partial targets.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, NamedTuple, Sequence

import numpy as np

from .cohort import CopySpec, PoseRanges, SourceCT, WorkingVolume, make_working_volume, sample_copies, sample_poses
from .detector import MU_WATER_PER_MM, DetectorModel
from .errors import CTInputError
from .geometry import VIEWS, Detector, PatientPose

POSE_COLUMNS = ("tx", "ty", "tz", "rx", "ry", "rz", "sod")


@dataclass(frozen=True)
class RenderSettings:
    """Everything besides the row (copy, pose, view) that decides an image."""

    image_size: int = 256  # H = W (pixels)
    field_mm: float = 430.0  # detector side length (mm); pixel pitch = field_mm / image_size
    sid_mm: float = 1800.0  # source-to-image distance (mm)
    working_spacing_mm: float = 2.0  # isotropic voxel size the CT is resampled to (mm)
    step_mm: float = 1.0  # ray-marching step (mm)
    mask_threshold_mm: float = 3.0  # a pixel is in a structure when its ray crosses > this (mm)
    mask_smoothing_mm: float = 0.0  # anti-aliasing: Gaussian sigma (mm at the isocentre) of a blur-and-rethreshold of each mask
    centre_on: str | None = None  # structure whose 3D box centre is the isocentre in the nominal pose (None: the CT's centre)
    centre_offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)  # isocentre moved by this (x right, y anterior, z superior; mm)
    collimation: float = 0.0  # fraction of the field's side the collimator closes, half at each edge (0: open)
    mu_water: float = MU_WATER_PER_MM  # attenuation of water (1/mm)
    detector: DetectorModel = field(default_factory=DetectorModel)  # intensity, noise, contrast

    def __post_init__(self) -> None:
        if int(self.image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")
        for name in ("field_mm", "sid_mm", "working_spacing_mm", "step_mm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.mask_threshold_mm >= 0:
            raise ValueError(f"mask_threshold_mm must be >= 0, got {self.mask_threshold_mm}")
        if not self.mask_smoothing_mm >= 0:
            raise ValueError(f"mask_smoothing_mm must be >= 0, got {self.mask_smoothing_mm}")
        if not 0 <= self.collimation < 1:
            raise ValueError(f"collimation must lie in [0, 1), got {self.collimation}")

    @property
    def pixel_spacing_mm(self) -> float:
        return self.field_mm / self.image_size

    def exposed_window(self) -> tuple[int, int]:
        """``(first, end)``: the rows (and columns) ``first:end`` the collimator leaves open."""
        n = int(self.image_size)
        first = min(int(round(n * self.collimation / 2)), (n - 1) // 2)
        return first, n - first

    def detector_geometry(self) -> Detector:
        return Detector.square(self.image_size, self.field_mm, self.sid_mm)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["detector"] = self.detector.as_dict()
        d["centre_offset_mm"] = list(self.centre_offset_mm)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RenderSettings":
        d = dict(d)
        det = dict(d.pop("detector", {}))
        if det.get("window") is not None:
            det["window"] = tuple(det["window"])
        if "centre_offset_mm" in d:
            d["centre_offset_mm"] = tuple(float(v) for v in d["centre_offset_mm"])
        return cls(**d, detector=DetectorModel(**det))


class LabelGroup(NamedTuple):
    """Which labels make a structure's mask: compact label indices (into a volume's
    ``label_ids``) whose summed path length puts a pixel in the mask (``include``), and
    those whose path length takes it out again (``exclude``: the ``minus`` structures of
    a derived 2D structure such as a lung field; empty for every other structure)."""

    include: list[int]
    exclude: list[int] = []


def label_groups(structures: Sequence[str], label_ids: np.ndarray) -> list[LabelGroup]:
    """For each structure name, its :class:`LabelGroup`: the compact label indices (into
    ``label_ids``) of the ``total`` ids of its members (for a synthetic lesion, its label
    value ``LESION_LABEL_BASE + id``, see :mod:`~chexanatomy_lib.ct.lesions`), and of its
    ``minus`` structures, present in the volume (empty when none is present)."""
    from .registry import load_registry

    reg = load_registry()
    index = {int(i): k for k, i in enumerate(np.asarray(label_ids)) if i != 0}

    def present(names: Sequence[str]) -> list[int]:
        out = set()
        for name in names:
            for leaf in reg.expand(name):
                tid = reg.get(leaf).label_value
                if tid is not None and int(tid) in index:
                    out.add(index[int(tid)])
        return sorted(out)

    return [LabelGroup(present([name]), present(reg.get(name).minus)) for name in structures]


def centre_labels(settings: RenderSettings, label_ids: np.ndarray) -> list[int] | None:
    """Compact label indices of the structure the field is centred on (``settings.centre_on``), or None."""
    return label_groups([settings.centre_on], label_ids)[0].include if settings.centre_on else None


def structures_present(label_ids: Sequence[int]) -> list[str]:
    """Registry structures (not ``excluded``) with a ``total`` id in ``label_ids``, plus the
    derived structures with at least one member present, in registry order. Synthetic
    lesions are listed only where their label values (``LESION_LABEL_BASE + id``) are in
    ``label_ids``, never for a CT as it is."""
    from .registry import LESION_LABEL_BASE, load_registry

    reg = load_registry()
    ids = sorted({int(i) for i in label_ids if int(i) != 0})
    lesions = reg.label_table("lesion")
    present = {lesions[i - LESION_LABEL_BASE] for i in ids if i - LESION_LABEL_BASE in lesions}
    present |= {s.name for s in reg.from_label_ids([i for i in ids if i - LESION_LABEL_BASE not in lesions])}
    out = []
    for s in reg:
        if s.excluded:
            continue
        if s.name in present or (s.is_derived and any(m in present for m in reg.expand(s.name))):
            out.append(s.name)
    return out


def cut_by_ct(volume: WorkingVolume, view: str, pose: PatientPose, groups: Sequence[LabelGroup]) -> np.ndarray:
    """``bool [S]``: which structures (``groups``) the CT volume's own edge cuts in this view and
    pose, so that their projected masks are incomplete whatever the detector sees."""
    cut = volume.truncating_labels(view, pose)
    return np.array([bool(cut[g.include].any()) if g.include else False for g in groups], dtype=bool)


def render_view(volume: WorkingVolume, view: str, pose: PatientPose, settings: RenderSettings,
                groups: list[list[int]], noise_seed: int | None = None,
                marcher=None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Render one image of a working volume.

    Returns ``image`` ``float32 [H, W]`` in [0, 1] (white = dense), ``masks``
    ``bool [S, H, W]`` (structure order of ``groups``), ``absent`` and
    ``truncated`` ``bool [S]``. ``noise_seed`` seeds the Poisson noise (None:
    noiseless). ``marcher``: a :class:`~chexanatomy_lib.ct.projector.RayMarcher`
    of ``volume`` to reuse across images. One image of :func:`render_views`.
    """
    images, masks, absent, truncated = render_views(volume, [view], [pose], settings, groups, [noise_seed], marcher)
    return images[0], masks[0], absent[0], truncated[0]


def render_views(volume: WorkingVolume, views: Sequence[str], poses: Sequence[PatientPose],
                 settings: RenderSettings, groups: list[list[int]],
                 noise_seeds: Sequence[int | None] | None = None, marcher=None, device=None,
                 to_numpy: bool = True) -> tuple:
    """Render ``B`` images of one working volume (one view and pose each) in one pass.

    On a GPU the rays of all images are traced together; on the CPU image by
    image. Returns ``images`` ``float32 [B, H, W]`` in [0, 1], ``masks`` ``bool
    [B, S, H, W]``, ``absent`` and ``truncated`` ``bool [B, S]``: NumPy arrays,
    or with ``to_numpy=False`` images and masks as tensors on the marcher's
    device. ``noise_seeds``: one per image (None: noiseless). ``marcher``: a
    :class:`~chexanatomy_lib.ct.projector.RayMarcher` of ``volume`` to reuse;
    else one is made on ``device`` (None: the CPU).
    """
    import torch

    from .geometry import magnification, patient_ray_grid
    from .projector import RayMarcher, masks_from_path_lengths, smooth_masks

    if len(views) != len(poses):
        raise ValueError(f"{len(views)} views for {len(poses)} poses")
    n, b = settings.image_size, len(views)
    noise_seeds = list(noise_seeds) if noise_seeds is not None else [None] * b
    if marcher is None:
        marcher = RayMarcher(volume.mu, volume.labels, volume.affine, len(volume.label_ids), settings.step_mm,
                             device=device)
    det = settings.detector_geometry()
    iso = np.asarray(volume.isocentre, dtype=np.float64) + np.asarray(settings.centre_offset_mm, dtype=np.float64)
    grids = np.array([patient_ray_grid(v, det, p, iso) for v, p in zip(views, poses)])  # [B, 4, 3]
    if marcher.device.type == "cpu":  # image by image: each image's rays stay in cache
        out = [marcher.project_images(*grids[k:k + 1].transpose(1, 0, 2), n, n) for k in range(b)]
        line, path = torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])
    else:
        line, path = marcher.project_images(*grids.transpose(1, 0, 2), n, n)
    lo, hi = settings.exposed_window()
    exposed = None
    if settings.collimation > 0:
        exposed = torch.zeros(n, n, dtype=torch.bool, device=line.device)
        exposed[lo:hi, lo:hi] = True
    images = settings.detector(line.view(b, n, n), noise_seeds, exposed=exposed)

    masks = masks_from_path_lengths(path, groups, settings.mask_threshold_mm).reshape(b, len(groups), n, n)
    if settings.mask_smoothing_mm > 0:
        sigmas = [settings.mask_smoothing_mm * magnification(det, p) / settings.pixel_spacing_mm for p in poses]
        masks = torch.stack([smooth_masks(masks[k], s) for k, s in enumerate(sigmas)])
    if exposed is not None:  # what the beam does not reach is not seen
        masks = masks & exposed
    absent = ~masks.flatten(2).any(dim=2)
    border = (masks[:, :, lo, :].any(2) | masks[:, :, hi - 1, :].any(2) | masks[:, :, :, lo].any(2)
              | masks[:, :, :, hi - 1].any(2))
    absent, border = absent.cpu().numpy(), border.cpu().numpy()
    truncated = np.array([cut_by_ct(volume, v, p, groups) for v, p in zip(views, poses)]).reshape(b, len(groups))
    truncated = (truncated | border) & ~absent
    if to_numpy:
        images, masks = images.cpu().numpy(), masks.cpu().numpy()
    return images, masks, absent, truncated


def _case_of(item: Any):
    """A CTCase from a CTCase or a manifest CaseSpec (loaded)."""
    return item.load() if hasattr(item, "load") and not hasattr(item, "volume") else item


def _check_case(case: Any) -> None:
    where = getattr(case, "source", {}).get("ct") if isinstance(getattr(case, "source", None), dict) else None
    where = where or getattr(case, "case_id", None)
    for attr in ("case_id", "volume", "labelmap", "affine"):
        if not hasattr(case, attr):
            raise CTInputError(where, f"not a CT case: lacks {attr!r} (expected a CTCase or a manifest CaseSpec)")
    vol, lab, aff = np.asarray(case.volume), np.asarray(case.labelmap), np.asarray(case.affine)
    if vol.ndim != 3 or min(vol.shape) < 2:
        raise CTInputError(where, f"case {case.case_id!r}: CT must be a 3D volume, got shape {vol.shape}")
    if lab.shape != vol.shape:
        raise CTInputError(where, f"case {case.case_id!r}: labelmap shape {lab.shape} differs from CT {vol.shape}")
    if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-9:
        raise CTInputError(where, f"case {case.case_id!r}: affine must be a finite invertible 4x4 matrix")
    if not np.isfinite(vol).all():
        raise CTInputError(where, f"case {case.case_id!r}: CT holds NaN or infinite values")
    if not np.issubdtype(lab.dtype, np.integer) or (lab.size and lab.min() < 0):
        raise CTInputError(where, f"case {case.case_id!r}: labelmap must hold non-negative integer ids")
    if getattr(case, "extra_masks", None):
        raise CTInputError(where, f"case {case.case_id!r}: structures given as separate masks "
                                  f"({', '.join(sorted(case.extra_masks))}) are not projected; "
                                  "supply them as ids of a multilabel labelmap")


def image_jobs(case_ids: Sequence[str], n_copies: int, poses_per_copy: int, views: Sequence[str], seed: int,
               amplitude_mm: float, scale_range: float, control_points: int,
               pose_ranges: PoseRanges) -> list[tuple[CopySpec, list[dict]]]:
    """Every image to render, grouped by deformed copy: ``[(copy, [row, ...]), ...]``.

    Rows hold ``image_id, case_id, copy_id, view`` plus pose, copy and noise
    columns (no split yet). Everything is drawn from ``seed`` and the ids, so a
    shard of the list is the same whichever process draws it.
    """
    from .cohort import _stable_hash

    jobs = []
    for case_id in case_ids:
        for copy in sample_copies(case_id, n_copies, seed, amplitude_mm, scale_range, control_points):
            rng = np.random.default_rng([int(seed), _stable_hash(copy.copy_id), 1])
            rows = []
            for view in views:
                for k, pose in enumerate(sample_poses(poses_per_copy, rng, pose_ranges)):
                    noise_seed = int(rng.integers(2**31))
                    rows.append({"image_id": f"{copy.copy_id}_{view}_p{k:02d}", "case_id": case_id,
                                 "copy_id": copy.copy_id, "view": view, **pose.as_dict(),
                                 **copy.as_row(), "noise_seed": noise_seed})
            jobs.append((copy, rows))
    return jobs


#: seconds a waiting thread sleeps between looks at whether the others failed or stopped
_POLL_S = 0.1
#: seconds the main thread waits, after an error or Ctrl-C, for the preparation thread
_JOIN_PREPARATION_S = 0.5


class _Prefetch:
    """``(job, prepare(job))`` for each job, in order, as a context manager's iterator.

    ``ahead`` 0: each job is prepared on the calling thread when it is taken. ``ahead``
    >= 1: a background thread prepares jobs in order, at most ``ahead`` beyond the one
    taken last (which the caller is busy with), inside ``thread_context()``. An exception
    in that thread is raised again, the same object, on the calling thread when its job
    is taken; jobs before it come out first, as without the thread.
    """

    def __init__(self, jobs: Sequence[Any], prepare: Callable[[Any], Any], ahead: int,
                 thread_context: Callable[[], ContextManager] = contextlib.nullcontext):
        self.jobs, self.prepare, self.ahead = list(jobs), prepare, int(ahead)
        self._done: queue.Queue = queue.Queue()  # (job, result, error), in job order
        self._slots = threading.Semaphore(max(self.ahead, 1))  # one per job prepared and not yet taken
        self._stop = threading.Event()
        self._context = thread_context
        self._thread = threading.Thread(target=self._run, name="synthesis-prepare", daemon=True)

    def __enter__(self) -> "_Prefetch":
        if self.ahead:
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread.is_alive():
            # NOTE: after an error or Ctrl-C the preparation thread is not waited for longer
            # than this: it may be in the middle of reading a CT (seconds), it writes nothing,
            # and it ends at its next look at the stop flag, its result discarded. It is a
            # daemon thread, so it never holds the process open.
            self._thread.join(None if exc_type is None else _JOIN_PREPARATION_S)

    def _run(self) -> None:
        try:
            with self._context():
                for job in self.jobs:
                    while not self._slots.acquire(timeout=_POLL_S):
                        if self._stop.is_set():
                            return
                    if self._stop.is_set():
                        return
                    self._done.put((job, self.prepare(job), None))
        except BaseException as err:  # noqa: BLE001 -- handed to the main thread, raised there
            self._done.put((None, None, err))

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if not self.ahead:
            for job in self.jobs:
                yield job, self.prepare(job)
            return
        for _ in self.jobs:
            job, result, err = self._take()
            if err is not None:
                raise err
            self._slots.release()
            yield job, result

    def _take(self) -> tuple:
        while True:  # a timed wait, so that Ctrl-C is seen at once
            try:
                return self._done.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    try:
                        return self._done.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("the synthesis preparation thread ended early") from None


class _BackgroundWriter:
    """Calls ``write(*item)`` for each :meth:`put` item, in order, as a context manager.

    ``depth`` 0: on the calling thread, at once. ``depth`` >= 1: on a background thread
    (inside ``thread_context()``) fed by a queue of at most ``depth`` items; :meth:`put`
    waits while it is full. An exception in that thread is raised again, the same object,
    by the next :meth:`put` or by :meth:`finish`. Leaving the ``with`` block normally
    waits for every item (:meth:`finish`); on an exception it stops the thread after the
    item it is writing, drops the rest and waits for it, so that nothing is written
    after the block.
    """

    _END = object()

    def __init__(self, write: Callable[..., None], depth: int,
                 thread_context: Callable[[], ContextManager] = contextlib.nullcontext):
        self.write, self.depth = write, int(depth)
        self._items: queue.Queue = queue.Queue(maxsize=max(self.depth, 1))
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._finished = False
        self._context = thread_context
        self._thread = threading.Thread(target=self._run, name="synthesis-write", daemon=True)

    def __enter__(self) -> "_BackgroundWriter":
        if self.depth:
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self._stop.set()
            if self._thread.is_alive():
                self._thread.join()

    def _run(self) -> None:
        try:
            with self._context():
                while not self._stop.is_set():
                    try:
                        item = self._items.get(timeout=_POLL_S)
                    except queue.Empty:
                        continue
                    if item is self._END:
                        return
                    self.write(*item)
        except BaseException as err:  # noqa: BLE001 -- handed to the main thread, raised there
            self._error = err

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("the synthesis writer thread ended early")

    def put(self, *item: Any) -> None:
        if not self.depth:
            self.write(*item)
        else:
            self._enqueue(item)

    def _enqueue(self, item: Any) -> None:
        while True:  # a timed wait, so that Ctrl-C and the writer's failure are seen at once
            self._raise_failure()
            try:
                self._items.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                pass

    def finish(self) -> None:
        """Wait until every item is written; raises the writer thread's exception, if any."""
        if not self.depth or self._finished:
            return
        self._enqueue(self._END)
        while self._thread.is_alive():
            self._thread.join(_POLL_S)
        self._finished = True
        if self._error is not None:
            raise self._error


def synthesize_dataset(
    cases: Sequence[Any],  # CTCase objects or manifest CaseSpecs (loaded one at a time)
    out_path: str | Path,  # dataset folder to write (must not exist unless overwrite)
    image_size: int = 256,  # pixels per side
    views: Sequence[str] = VIEWS,  # "pa" and/or "lateral"
    n_copies: int = 4,  # deformed copies per source CT
    poses_per_copy: int = 4,  # poses per copy and view
    seed: int = 0,  # seeds copies, poses, noise and the split
    shard: tuple[int, int] | None = None,  # (i, n): render only copies k with k % n == i
    settings: RenderSettings | None = None,  # geometry, detector, mask threshold (image_size overrides)
    amplitude_mm: float = 8.0,  # deformation control-point displacement s.d. (mm)
    scale_range: float = 0.08,  # anisotropic scale factors in [1 - r, 1 + r]
    control_points: int = 5,  # deformation control points per axis
    pose_ranges: PoseRanges = PoseRanges(),  # patient pose ranges
    split_fractions: Sequence[float] = (0.7, 0.15, 0.15),  # train, val, test
    structures: Sequence[str] | None = None,  # channel order; None: all present, registry order
    overwrite: bool = False,  # replace an existing dataset
    progress: bool = True,  # tqdm progress bar
    threads: int | None = 1,  # torch threads while rendering (None: leave as is); scale out with shards
    device: str = "cpu",  # "cpu", "cuda" or "auto": where copies are resampled and rays traced
    batch_images: int | None = None,  # images traced together (None: 1 on the CPU, 32 on a GPU)
    prefetch: int = 1,  # copies prepared ahead in a background thread while one renders (0: one step after another)
) -> Path:
    """Render a projected dataset from CT cases; returns ``out_path``.

    Splits are by source CT when there are several cases (or as fixed by the
    manifest), by deformed copy when there is one. Every input is checked
    before anything is written. On a GPU each copy's images are traced in
    batches; masks are the same as on the CPU (up to rays whose path length
    lies within rounding of the threshold), the Poisson noise is a different
    draw of the same distribution (see :class:`~chexanatomy_lib.ct.detector.DetectorModel`).

    With ``prefetch`` >= 1 three steps overlap: a preparation thread reads the
    next case's CT when the case changes (:class:`~chexanatomy_lib.ct.cohort.SourceCT`)
    and resamples the working volumes of the next ``prefetch`` copies
    (:func:`~chexanatomy_lib.ct.cohort.make_working_volume`) while the calling
    thread renders the current copy, and a writer thread packs the masks and
    appends each rendered batch to the dataset, in order, from a queue of at most
    two batches. The dataset is the same, byte for byte, as with ``prefetch=0``
    (every step does the same arithmetic; the noise is seeded per image). An
    exception in either thread is raised again on the calling thread, and, as on
    any failure, nothing is left at ``out_path``.

    NOTE: torch's intra-op thread count is not per Python thread (set in one, it
    shows in the others; checked with torch 2.13 and OpenMP), so the background
    threads run with the count the rendering sets (``threads``): with
    ``prefetch`` >= 1 a process keeps up to twice ``threads`` cores busy on the
    CPU (the writer mostly waits on the disk), one core for the preparation
    beside one for the rendering by default. Count that when running shards
    side by side. On a GPU the preparation resamples on a CUDA stream of its
    own, so its kernels can run beside the rendering's.
    """
    from tqdm.auto import tqdm

    from .dataset import SPLITS, DatasetWriter, choose_split_unit, make_splits, pack_masks

    settings = replace(settings or RenderSettings(), image_size=int(image_size))
    views = list(views)
    if not views or any(v not in VIEWS for v in views) or len(set(views)) != len(views):
        raise ValueError(f"views must be distinct values among {VIEWS}, got {views}")
    if n_copies < 1 or poses_per_copy < 1:
        raise ValueError("n_copies and poses_per_copy must be >= 1")
    if isinstance(prefetch, bool) or not isinstance(prefetch, (int, np.integer)) or prefetch < 0:
        raise ValueError(f"prefetch must be an integer >= 0, got {prefetch!r}")
    prefetch = int(prefetch)
    if shard is not None:
        i, n = shard
        if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
            raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard}")
    if not cases:
        raise ValueError("no CT cases given")
    case_ids = [str(getattr(c, "case_id")) for c in cases]
    if len(set(case_ids)) != len(case_ids):
        raise ValueError(f"duplicate case ids: {case_ids}")

    # Pass 1: load and check every case, collect label ids (nothing written yet).
    label_ids: set[int] = set()
    loaded: dict[str, Any] = {}
    for item in cases:
        case = _case_of(item)
        _check_case(case)
        label_ids |= {int(i) for i in np.flatnonzero(np.bincount(np.asarray(case.labelmap).reshape(-1)))}
        if not hasattr(item, "load") or hasattr(item, "volume") or len(cases) <= 4:
            loaded[case.case_id] = case  # in memory already, or few enough to keep
    names = list(structures) if structures is not None else structures_present(sorted(label_ids))
    if not names:
        raise CTInputError(None, "no registry structures found in the labelmaps")

    fixed = {str(getattr(c, "case_id")): getattr(c, "split", None) for c in cases}
    jobs = image_jobs(case_ids, n_copies, poses_per_copy, views, seed, amplitude_mm, scale_range,
                      control_points, pose_ranges)
    if any(v is not None for v in fixed.values()) and not all(v is not None for v in fixed.values()):
        unset = sorted(k for k, v in fixed.items() if v is None)
        raise ValueError(f"the manifest fixes the split of some cases but not of {unset}; fix all or none")
    if all(v is not None for v in fixed.values()):
        unit = "case"
        splits = {"unit": "case", "seed": None, "fractions": None,
                  "rule": "fixed per case by the data manifest",
                  "assignment": {s: sorted(k for k, v in fixed.items() if v == s) for s in SPLITS}}
    else:
        unit = choose_split_unit(case_ids)
        ids = case_ids if unit == "case" else [c.copy_id for c, _ in jobs]
        splits = make_splits(ids, unit=unit, fractions=split_fractions, seed=seed)
    split_of = {str(i): s for s, lst in splits["assignment"].items() for i in lst}
    if shard is not None:
        jobs = [j for k, j in enumerate(jobs) if k % shard[1] == shard[0]]

    meta = {
        **geometry_meta(settings, views),
        "cohort": _cohort_meta(n_copies, poses_per_copy, seed, amplitude_mm, scale_range, control_points,
                               pose_ranges),
        "split_unit": unit,
        "shard": list(shard) if shard is not None else None,
    }
    n_images = sum(len(rows) for _, rows in jobs)
    from ..devices import resolve_device
    from .projector import RayMarcher, torch_threads

    dev = resolve_device(device)
    batch = int(batch_images) if batch_images else (1 if dev == "cpu" else 32)
    if batch < 1:
        raise ValueError(f"batch_images must be >= 1, got {batch_images}")
    streams = _CudaStreams(prefetch > 0) if dev == "cuda" else None
    source: SourceCT | None = None  # the case being prepared (the preparation thread's alone)
    groups: list[LabelGroup] = []

    def prepare(copy: CopySpec) -> tuple[WorkingVolume, list[LabelGroup], Any]:
        """One copy's working volume and its case's label groups, and what the rendering must wait for."""
        nonlocal source, groups
        if source is None or source.case_id != copy.case_id:
            case = loaded.get(copy.case_id) or _case_of(next(c for c in cases if str(c.case_id) == copy.case_id))
            source = SourceCT.from_case(case, settings.mu_water)
            groups = label_groups(names, source.label_ids)
        with streams.preparing() if streams else contextlib.nullcontext():
            volume = make_working_volume(source, settings.working_spacing_mm, copy,
                                         device=None if dev == "cpu" else dev,
                                         centre_on=centre_labels(settings, source.label_ids))
            ready = streams.ready() if streams else None
        return volume, groups, ready

    def write(part: list[dict], images, masks, absent: np.ndarray, truncated: np.ndarray) -> None:
        """Pack one rendered batch's masks, copy it to the host and append its rows."""
        images, packed = images.cpu().numpy(), pack_masks(masks).cpu().numpy()
        for k, row in enumerate(part):
            split = split_of[row["case_id"] if unit == "case" else row["copy_id"]]
            writer.add_packed(images[k], packed[k], absent[k], truncated[k], {**row, "split": split})

    # Left in reverse order: the writer thread is stopped and waited for, then the
    # preparation thread is told to stop, then DatasetWriter closes the dataset or, on an
    # exception (a background thread's too, raised again here), deletes what it wrote.
    # NOTE: two batches queued for the writer: the rendering runs on while one is
    # written, and on a GPU at most about two batches of masks wait in its memory.
    with (torch_threads(threads),
          DatasetWriter(out_path, names, settings.image_size, meta, splits=splits, overwrite=overwrite) as writer,
          _Prefetch(jobs, lambda job: prepare(job[0]), prefetch,
                    streams.preparation_context if streams else contextlib.nullcontext) as prepared,
          _BackgroundWriter(write, 2 if prefetch else 0,
                            streams.rendering_context if streams else contextlib.nullcontext) as written):
        bar = tqdm(total=n_images, desc="DRR + masks", disable=not progress, mininterval=10.0)
        for (copy, rows), (volume, groups_of_copy, ready) in prepared:
            if streams:
                streams.wait_for(ready, volume)
            marcher = RayMarcher(volume.mu, volume.labels, volume.affine, len(volume.label_ids), settings.step_mm,
                                 device=dev, compile=dev == "cuda")
            for a in range(0, len(rows), batch):
                part = rows[a:a + batch]
                poses = [PatientPose(**{k: row[k] for k in POSE_COLUMNS}) for row in part]
                images, masks, absent, truncated = render_views(
                    volume, [row["view"] for row in part], poses, settings, groups_of_copy,
                    [row["noise_seed"] for row in part], marcher, to_numpy=False)
                written.put(part, images, masks, absent, truncated)
                bar.update(len(part))
            del volume, marcher  # dropped before the next copy is taken (or, without prefetch, made)
        written.finish()
        bar.close()
    return Path(out_path)


class _CudaStreams:
    """How :func:`synthesize_dataset`'s threads share a GPU.

    The rendering and the writer use the stream current where the synthesis was
    called (the writer so that its copies follow the kernels that made the
    tensors). With ``side`` the preparation resamples on a stream of its own;
    the rendering's stream waits for each volume's event before it reads the
    volume, and the volume's memory is recorded as used by the rendering's
    stream, so the allocator reuses it only once that stream is past it.
    Without ``side`` everything runs on the rendering's stream, as before.
    """

    def __init__(self, side: bool):
        import torch

        self.rendering = torch.cuda.current_stream()
        self.side = torch.cuda.Stream(device=self.rendering.device) if side else None

    def preparing(self) -> ContextManager:
        import torch

        return torch.cuda.stream(self.side) if self.side is not None else contextlib.nullcontext()

    def ready(self) -> Any:
        """An event recorded on the preparation's stream (None without one)."""
        import torch

        if self.side is None:
            return None
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def wait_for(self, ready: Any, volume: WorkingVolume) -> None:
        """Make the rendering's stream wait for ``ready`` and own ``volume``'s memory too."""
        if ready is None:
            return
        self.rendering.wait_event(ready)
        for t in (volume.mu, volume.labels):
            t.record_stream(self.rendering)

    def preparation_context(self) -> ContextManager:
        """Entered once by the preparation thread (its current device: the rendering's)."""
        import torch

        return torch.cuda.device(self.rendering.device)

    def rendering_context(self) -> ContextManager:
        """Entered once by the writer thread: the rendering's device and stream."""
        import torch

        return torch.cuda.stream(self.rendering)


def geometry_meta(settings: RenderSettings, views: Sequence[str]) -> dict[str, Any]:
    """The part of a projected dataset's ``meta`` that says how its images were rendered:
    pixel spacing, view geometry and its display convention, mask threshold, render settings."""
    return {
        "pixel_spacing_mm": settings.pixel_spacing_mm,
        "view_geometry": {"sid_mm": settings.sid_mm, "field_mm": settings.field_mm,
                          "views": list(views), "convention": "radiological: PA patient's right on image left; "
                          "lateral = left lateral, anterior on image left; head up"},
        "mask_threshold_mm": settings.mask_threshold_mm,
        "render_settings": settings.as_dict(),
    }


def _cohort_meta(n_copies: int, poses_per_copy: int, seed: int, amplitude_mm: float, scale_range: float,
                 control_points: int, pose_ranges: PoseRanges) -> dict:
    return {"n_copies": n_copies, "poses_per_copy": poses_per_copy, "seed": seed,
            "amplitude_mm": amplitude_mm, "scale_range": scale_range,
            "control_points": control_points, "pose_ranges": pose_ranges.as_dict()}


def use_rendered_dataset(source: str | Path, dest: str | Path, arguments: dict[str, Any]) -> Path:
    """Make ``dest`` (a link) point at a dataset rendered elsewhere, after checking it.

    ``source``: a dataset written by :func:`synthesize_dataset` or merged from
    its shards (``chexanatomy synthesize --shard i/n``, ``chexanatomy
    merge-shards``); ``arguments``: what :func:`synthesis_arguments` returns
    for the chapter's parameters. The dataset must have been rendered with
    those settings, views and cohort and be whole (not one shard); otherwise a
    :class:`~chexanatomy_lib.ct.errors.CTInputError` names each difference.
    Returns ``dest``.
    """
    import json

    from .dataset import ProjectedDataset

    src = Path(source).resolve()
    meta = ProjectedDataset(src).meta
    a = arguments
    settings = replace(a["settings"], image_size=int(a["image_size"]))
    expected = {
        "render_settings": settings.as_dict(),
        "cohort": _cohort_meta(a["n_copies"], a["poses_per_copy"], a["seed"], a["amplitude_mm"], a["scale_range"],
                               a["control_points"], a["pose_ranges"]),
        "views": list(a["views"]),
    }
    expected = json.loads(json.dumps(expected))
    found = {"render_settings": meta.get("render_settings"), "cohort": meta.get("cohort"),
             "views": (meta.get("view_geometry") or {}).get("views")}
    diffs = []
    for part in expected:
        e, f = expected[part], found[part]
        if isinstance(e, dict) and isinstance(f, dict):
            diffs += [f"{part}.{k}: dataset {f.get(k)!r}, parameters {e.get(k)!r}"
                      for k in sorted(set(e) | set(f)) if e.get(k) != f.get(k)]
        elif e != f:
            diffs.append(f"{part}: dataset {f!r}, parameters {e!r}")
    if meta.get("shard") is not None:
        i, n = meta["shard"]
        raise CTInputError(src, f"holds shard {i}/{n} only; merge all shards first (chexanatomy merge-shards)")
    if diffs:
        raise CTInputError(src, "was not rendered with this chapter's parameters: " + "; ".join(diffs))
    dest = Path(dest)
    if dest.is_symlink() or dest.is_file():
        dest.unlink()
    elif dest.exists():
        import shutil

        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.symlink_to(src, target_is_directory=True)
    return dest


def synthesis_arguments(params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`synthesize_dataset` from chapter 1's parameters.

    ``params``: the parameters of ``notebooks/01_ct_projection.py`` by name
    (``image_size``, ``views``, ``field_mm``, ``sid_mm``, ``sod_range_mm``,
    ``translation_mm``, ``rotation_deg``, ``n_copies``, ``poses_per_copy``,
    ``deform_amplitude_mm``, ``scale_range``, ``control_points``,
    ``photons_per_pixel``, ``gamma``, ``mask_threshold_mm``,
    ``mask_smoothing_mm`` (0 when missing), ``working_spacing_mm``, ``step_mm``, ``split_fractions``, ``seed``, and
    ``device`` when given). The chapter and ``chexanatomy synthesize --shard
    i/n`` both build their datasets through this one mapping, so shards rendered
    on other machines are the chapter's dataset, image for image.
    """
    p = params
    settings = RenderSettings(
        image_size=int(p["image_size"]), field_mm=float(p["field_mm"]), sid_mm=float(p["sid_mm"]),
        working_spacing_mm=float(p["working_spacing_mm"]), step_mm=float(p["step_mm"]),
        mask_threshold_mm=float(p["mask_threshold_mm"]),
        mask_smoothing_mm=float(p.get("mask_smoothing_mm", 0.0)), centre_on=p.get("centre_on"),
        centre_offset_mm=tuple(float(v) for v in p.get("centre_offset_mm", (0.0, 0.0, 0.0))),
        detector=DetectorModel(photons_per_pixel=p["photons_per_pixel"], gamma=float(p["gamma"])))
    pose_ranges = PoseRanges(translation_mm=tuple(p["translation_mm"]), rotation_deg=tuple(p["rotation_deg"]),
                             sod_mm=tuple(p["sod_range_mm"]))
    out = dict(image_size=settings.image_size, views=list(p["views"]), n_copies=int(p["n_copies"]),
               poses_per_copy=int(p["poses_per_copy"]), seed=int(p["seed"]), settings=settings,
               amplitude_mm=float(p["deform_amplitude_mm"]), scale_range=float(p["scale_range"]),
               control_points=int(p["control_points"]), pose_ranges=pose_ranges,
               split_fractions=tuple(p["split_fractions"]))
    if p.get("device") is not None:
        out["device"] = str(p["device"])
    return out


class CaseRenderer:
    """Renders rows of a projected dataset again from their CT, at any resolution.

    ``case``: the source CT of the rows (CTCase, or manifest CaseSpec, loaded
    here); ``settings``: the dataset's ``meta["render_settings"]`` (dict) or a
    :class:`RenderSettings` (None: the defaults). The CT is prepared once
    (:attr:`source`) and the last deformed copy kept (:attr:`volume`), so one
    row at several sizes, or several rows of one copy, pay for that once:
    preparing the CT takes seconds, rendering one more size a fraction of that.
    """

    def __init__(self, case: Any, settings: RenderSettings | dict | None = None):
        case = _case_of(case)
        _check_case(case)
        if isinstance(settings, dict):
            settings = RenderSettings.from_dict(settings)
        self.case_id = str(case.case_id)  # the case every rendered row must belong to
        self.settings = settings or RenderSettings()  # image_size is replaced per call
        self.source = SourceCT.from_case(case, self.settings.mu_water)  # the prepared CT
        self.volume: WorkingVolume | None = None  # the last deformed copy rendered

    def _volume_of(self, copy: CopySpec) -> WorkingVolume:
        if self.volume is None or self.volume.copy != copy:
            self.volume = make_working_volume(self.source, self.settings.working_spacing_mm, copy,
                                              centre_on=centre_labels(self.settings, self.source.label_ids))
        return self.volume

    def render(self, row: Any, image_size: int, structures: Sequence[str] | None = None,
               threads: int | None = 1,
               settings: RenderSettings | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Render one dataset row again: ``(image, masks, absent, truncated)``.

        ``row``: a row of ``index.csv`` (dict or pandas Series) of this case;
        ``image_size``: pixels per side, the detector field kept, so masks at 896 px
        cover what 256 px masks cover; ``structures``: channel order (the
        dataset's ``structures``; None: all present in the case); ``threads``:
        torch threads while rendering (None: leave as is); ``settings``: other
        acquisition settings (detector, field, collimation; :mod:`~chexanatomy_lib.ct.shift`)
        with the same working volume (spacing and centring) as the renderer's, None:
        the renderer's. At the dataset's own size and settings the outputs equal the
        stored ones. Shapes as in :func:`render_view`.
        """
        from .projector import torch_threads

        row = dict(row)
        if self.case_id != str(row["case_id"]):
            raise ValueError(f"row belongs to case {row['case_id']!r}, got case {self.case_id!r}")
        if settings is not None:
            volume_keys = ("working_spacing_mm", "centre_on", "mu_water")
            changed = [k for k in volume_keys if getattr(settings, k) != getattr(self.settings, k)]
            if changed:
                raise ValueError(f"settings change the working volume ({', '.join(changed)}); "
                                 "make a CaseRenderer with those settings instead")
        settings = replace(settings or self.settings, image_size=int(image_size))
        pose = PatientPose(**{k: float(row[k]) for k in POSE_COLUMNS})
        names = list(structures) if structures is not None else structures_present(self.source.label_ids)
        with torch_threads(threads):
            volume = self._volume_of(CopySpec.from_row(row))
            return render_view(volume, str(row["view"]), pose, settings, label_groups(names, self.source.label_ids),
                               int(row["noise_seed"]))

    def cut_by_ct(self, row: Any, structures: Sequence[str]) -> np.ndarray:
        """``bool [S]``: the structures whose reference masks the CT volume's edge cuts in this
        row's view and pose (:func:`cut_by_ct`), unlike cuts by the detector's field."""
        row = dict(row)
        pose = PatientPose(**{k: float(row[k]) for k in POSE_COLUMNS})
        volume = self._volume_of(CopySpec.from_row(row))
        return cut_by_ct(volume, str(row["view"]), pose, label_groups(list(structures), self.source.label_ids))
