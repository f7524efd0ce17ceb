"""Cone-beam forward projector: line integrals and per-label path lengths.

For every ray (source -> detector pixel) the projector returns

* the line integral of linear attenuation, ``sum(mu * ds)`` (dimensionless),
  which the :mod:`~chexanatomy_lib.ct.detector` model turns into a radiograph;
* the path length (mm) of the ray inside every label of the labelmap, all
  labels at once, from which a structure's 2D mask is a threshold
  (:func:`masks_from_path_lengths`).

Method: uniform-step ray marching through a working volume (the CT resampled,
trilinearly, to an isotropic grid, see :mod:`~chexanatomy_lib.ct.cohort`). Each
ray is clipped to the volume's box and sampled every ``step_mm`` at the centres
of equal steps; each sample reads its nearest voxel (piecewise-constant voxels,
as in Siddon's method), attenuation and label together in one gather; the step
counts are accumulated per (ray, label) with one ``bincount`` over all labels.
Rays are processed in small chunks, in image tiles, so memory stays bounded
whatever the image size and the voxels a chunk reads stay in cache.

NOTE: DiffDRR (Siddon's exact ray tracing) is the reference this projector is
tested against, but it is not used for bulk synthesis: with
``mask_to_channels=True`` it materialises every (ray, voxel-crossing) pair for
all label channels at once, about 9 s and 14 GB per 256 px image at full CT
resolution on a 2-core CPU. Marching a 2 mm working grid in chunks gives masks
that agree with it (Dice above 0.98 for lungs and heart on the bundled CT, see
``benchmarks/bench_drr.py``) more than ten times faster in under 1 GB.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block with ``n`` intra-op torch threads (None: leave as is), then restore.

    NOTE: ray marching runs on small chunks that fit in cache; extra intra-op
    threads gain little there, and on a shared, oversubscribed CPU their
    synchronisation slowed a 256 px image from 0.7 s to over 8 s in our runs.
    Synthesis therefore uses one thread per process and scales with shards.
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class RayMarcher:
    """Projects one attenuation volume and its labelmap along arbitrary rays.

    ``mu`` and ``labels`` share one voxel grid; ``affine`` maps voxel indices
    ``(i, j, k)`` (voxel centres) to world millimetres. ``labels`` holds
    *compact* label indices ``0..L-1`` (0 = unlabelled); see
    :func:`~chexanatomy_lib.ct.cohort.compact_lookup`. Both volumes are read
    piecewise constant (nearest voxel), as in Siddon's method, so a ray's path
    length in a label is the number of its samples falling in that label's
    voxels times the step.

    ``device``: where the volume lives and rays are traced (``"cpu"``,
    ``"cuda"``; None: the device of ``mu`` if it is a tensor, else the CPU).
    ``layout``: on the CPU (``"rays"``) rays are traced in small chunks of
    ``chunk_rays`` (default 1024) that stay in cache, each ray's samples
    contiguous; on a GPU (``"steps"``) in large chunks (default 2**17 rays),
    rays of several images together, sorted by their length inside the volume
    so that a chunk marches no further than its longest ray needs, neighbouring
    threads on neighbouring rays. Both give the same result on any device.
    """

    def __init__(
        self,
        mu: torch.Tensor | np.ndarray,  # float32 [X, Y, Z] linear attenuation (1/mm), >= 0
        labels: torch.Tensor | np.ndarray,  # integer [X, Y, Z] compact label index in 0..n_labels-1
        affine: np.ndarray,  # float [4, 4] voxel index -> world (mm)
        n_labels: int,  # number of compact labels, background included
        step_mm: float = 1.0,  # ray-marching step (mm)
        chunk_rays: int | None = None,  # rays per chunk (None: 1024 on the CPU, 2**17 on a GPU)
        device: str | torch.device | None = None,  # where to trace (None: mu's device, else the CPU)
        layout: str | None = None,  # "rays" (CPU default) or "steps" (GPU default), see _march
        compile: bool = False,  # fuse the per-sample arithmetic with torch.compile (GPU; needs Triton)
    ):
        if device is None:
            device = mu.device if isinstance(mu, torch.Tensor) else "cpu"
        self.device = torch.device(device)
        layout = layout or ("rays" if self.device.type == "cpu" else "steps")
        if layout not in ("rays", "steps"):
            raise ValueError(f"layout must be 'rays' or 'steps', got {layout!r}")
        self.ray_major = layout == "rays"
        mu = torch.as_tensor(mu, dtype=torch.float32).to(self.device)
        labels = torch.as_tensor(labels).to(self.device)
        if mu.ndim != 3 or labels.shape != mu.shape:
            raise ValueError(f"mu {tuple(mu.shape)} and labels {tuple(labels.shape)} must be the same 3D grid")
        if not step_mm > 0:
            raise ValueError(f"step_mm must be > 0, got {step_mm}")
        if n_labels < 1 or (labels.numel() and int(labels.max()) >= n_labels) or (labels.numel() and int(labels.min()) < 0):
            raise ValueError(f"labels must be compact indices in 0..{n_labels - 1}")
        self.shape = tuple(int(s) for s in mu.shape)
        # NOTE: one voxel of zero padding (mu 0, label 0) on every face: samples outside
        # the volume are clamped into it, so no per-sample bounds mask is needed.
        self.padded = tuple(s + 2 for s in self.shape)
        mu = F.pad(mu, (1, 1, 1, 1, 1, 1)).reshape(-1)
        labels = F.pad(labels.to(torch.int32), (1, 1, 1, 1, 1, 1)).reshape(-1)
        self.n_labels = int(n_labels)
        # NOTE: attenuation and label share one int32 per voxel (label in the low 8 bits,
        # attenuation quantised to 23 bits above them) so each sample costs one gather;
        # the gathers dominate the run time. Quantisation step: max(mu) / 2**23.
        self.packed = n_labels <= 256
        if self.packed:
            self.mu_quantum = max(float(mu.max()), 1e-12) / (2**23 - 1)
            q = torch.round(mu / self.mu_quantum).to(torch.int32)
            self.voxels = (q * 256 + labels).contiguous()
        else:
            self.mu_flat, self.labels_flat = mu.contiguous(), labels.contiguous()
        self.affine = np.asarray(affine, dtype=np.float64)
        self.inv_affine = np.linalg.inv(self.affine)
        self.step_mm = float(step_mm)
        self.chunk_rays = int(chunk_rays) if chunk_rays else (1024 if self.ray_major else 2**17)
        if int(np.prod(self.padded)) >= 2**31:
            raise ValueError(f"volume {self.shape} too large for 32-bit voxel indices")
        self._gather = _compiled_gather() if compile else _gather

    def project(self, source: np.ndarray, pixels: np.ndarray,
                image_shape: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Trace rays from ``source`` (``[3]``, world mm) to ``pixels`` (``[N, 3]``, world mm).

        ``image_shape``: ``(H, W)`` when ``pixels`` is a row-major image; on the
        CPU rays are then traced in 32 x 32 pixel tiles (neighbouring rays read
        neighbouring voxels, which keeps them in cache); the result is in
        ``pixels`` order.

        Returns ``line_integral`` ``float32 [N]`` (sum of ``mu * ds``) and
        ``path_mm`` ``float32 [N, n_labels]`` (mm of each ray inside each label;
        column 0 is unlabelled tissue and air inside the volume), on the CPU.
        Each ray is sampled at ``t0 + (k + 1/2) * step`` from its entry ``t0``
        into the volume; lengths are exact to within one step at the exit.
        """
        src_w = torch.as_tensor(np.asarray(source, dtype=np.float64).reshape(1, 3))
        pix_w = torch.as_tensor(np.asarray(pixels, dtype=np.float64).reshape(1, -1, 3))
        if image_shape is not None and int(np.prod(image_shape)) != pix_w.shape[1]:
            raise ValueError(f"image_shape {image_shape} does not match {pix_w.shape[1]} pixels")
        line, path = self._trace(src_w.to(self.device), pix_w.to(self.device), image_shape)
        return line[0].cpu(), path[0].cpu()

    def project_images(self, sources: np.ndarray, corners: np.ndarray, d_rows: np.ndarray, d_cols: np.ndarray,
                       height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Trace ``B`` whole images at once, their rays expanded on :attr:`device`.

        ``sources``, ``corners``, ``d_rows``, ``d_cols``: ``float [B, 3]`` (world mm)
        as :func:`~chexanatomy_lib.ct.geometry.patient_ray_grid` returns them per
        image; pixel ``(r, c)`` of image ``b`` is ``corners[b] + (r + 0.5) *
        d_rows[b] + (c + 0.5) * d_cols[b]``.

        Returns ``line_integral`` ``float32 [B, H*W]`` and ``path_mm`` ``float32
        [B, H*W, n_labels]`` (row-major pixels) on :attr:`device`.
        """
        as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64).reshape(-1, 3), device=self.device)  # noqa: E731
        src, corner, d_row, d_col = (as_t(a) for a in (sources, corners, d_rows, d_cols))
        r = torch.arange(int(height), device=self.device, dtype=torch.float64) + 0.5
        c = torch.arange(int(width), device=self.device, dtype=torch.float64) + 0.5
        pix = (corner[:, None, None, :] + r[None, :, None, None] * d_row[:, None, None, :]
               + c[None, None, :, None] * d_col[:, None, None, :])
        return self._trace(src, pix.reshape(len(src), -1, 3), (int(height), int(width)))

    def _trace(self, src_w: torch.Tensor, pix_w: torch.Tensor,
               image_shape: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``src_w`` ``float64 [B, 3]``, ``pix_w`` ``float64 [B, N, 3]`` (world mm, on the
        device) -> line ``float32 [B, N]``, path ``float32 [B, N, L]`` (on the device)."""
        dev = self.device
        b, n = pix_w.shape[:2]
        inv = torch.as_tensor(self.inv_affine, device=dev)
        src_v = src_w @ inv[:3, :3].T + inv[:3, 3]  # [B, 3] voxel coordinates
        pix_v = pix_w @ inv[:3, :3].T + inv[:3, 3]  # [B, N, 3]
        length_w = torch.linalg.vector_norm(pix_w - src_w[:, None], dim=-1)  # [B, N] mm
        dir_v = (pix_v - src_v[:, None]) / length_w[..., None]  # voxel index per mm along each ray
        src_r = src_v[:, None].expand(b, n, 3).reshape(-1, 3)
        dir_v = dir_v.reshape(-1, 3)
        t0, t1 = _clip_to_box(src_r, dir_v, torch.tensor(self.shape, device=dev, dtype=torch.float64))
        t1 = torch.minimum(t1, length_w.reshape(-1))
        span = (t1 - t0).clamp(min=0.0)
        # first sample (nearest-voxel coordinates: +1 for the padding, +0.5 so floor() rounds)
        # and the step between samples, in padded voxel units
        first = src_r + (t0 + 0.5 * self.step_mm)[:, None] * dir_v + 1.5
        stride = dir_v * self.step_mm
        n_steps = torch.ceil(span / self.step_mm).to(torch.int64)
        line = torch.zeros(b * n, dtype=torch.float64, device=dev)
        counts = torch.zeros(b * n, self.n_labels, dtype=torch.int32, device=dev)
        # only rays that cross the volume are marched (the rest see nothing)
        if self.ray_major:
            rays = torch.nonzero(n_steps > 0).flatten()
            if image_shape is not None:  # tile-major order inside each image: cache locality
                h, w = image_shape
                pix = torch.arange(h * w)
                pr, pc = pix // w, pix % w
                tile = torch.argsort((pr // 32) * ((w + 31) // 32) * 1024 + (pc // 32) * 1024 + (pr % 32) * 32 + pc % 32)
                rank = torch.empty_like(tile)
                rank[tile] = torch.arange(h * w)
                key = (rays // (h * w)) * (h * w) + rank[rays % (h * w)]
                rays = rays[torch.argsort(key)]
        else:  # longest first: each chunk marches about as far as its rays need
            rays = torch.argsort(n_steps, descending=True)
            rays = rays[: int((n_steps > 0).sum())]
        for a in range(0, len(rays), self.chunk_rays):
            idx = rays[a:a + self.chunk_rays]
            k = int(n_steps[idx].max())
            ln, ct = self._march(first[idx].float(), stride[idx].float(), k)
            line[idx] = ln
            counts[idx] = ct
        return line.to(torch.float32).view(b, n), counts.to(torch.float32).mul_(self.step_mm).view(b, n, -1)

    def _march(self, first: torch.Tensor, stride: torch.Tensor, n_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """March ``m`` rays ``n_steps`` samples: ``first`` and ``stride`` ``float32 [m, 3]``
        (padded voxel coordinates + 0.5). Returns line integral ``float64 [m]`` (sum of
        ``mu * step``) and sample counts per label ``int32 [m, L]``."""
        m, dev = len(first), self.device
        ray_major = self.ray_major
        k = torch.arange(n_steps, device=dev, dtype=torch.float32)
        if self.packed:
            total, key = self._gather(first, stride, k, self.voxels, self.padded, self.n_labels, ray_major)
            line = total.to(torch.float64) * (self.mu_quantum * self.step_mm)
        else:
            total, key = self._gather(first, stride, k, self.mu_flat, self.padded, self.n_labels, ray_major,
                                      self.labels_flat)
            line = total.to(torch.float64) * self.step_mm
        if ray_major:
            counts = torch.bincount(key.view(-1), minlength=m * self.n_labels).to(torch.int32)
        else:  # NOTE: bincount on a GPU first reads the maximum (a host sync); index_add_ does not
            counts = torch.zeros(m * self.n_labels, dtype=torch.int32, device=dev)
            counts.index_add_(0, key.view(-1), torch.ones(1, dtype=torch.int32, device=dev).expand(key.numel()))
        return line, counts.view(m, self.n_labels)


def _gather(first: torch.Tensor, stride: torch.Tensor, k: torch.Tensor, voxels: torch.Tensor,
            padded: tuple[int, int, int], n_labels: int, ray_major: bool,
            labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``m`` rays at steps ``k`` (``float32 [S]``) of a padded volume.

    ``voxels``: packed ``int32`` (attenuation above the low 8 label bits) or, with
    ``labels`` given, ``float32`` attenuation. Returns the per-ray sum of the
    attenuation values (``int64`` quanta or ``float32``, ``[m]``) and the key
    ``ray * n_labels + label`` of every sample (``int32``, ``[m, S]`` for the
    "rays" layout, ``[S, m]`` for "steps"). A pure function of tensors and
    integers, so that one compiled version serves every volume of a shape.
    """
    # NOTE: on the CPU each ray's samples are contiguous ([m, S], in cache); on a GPU
    # neighbouring threads take neighbouring rays ([S, m]) so that the per-(ray,
    # label) counter updates of one warp go to different addresses.
    k = k[None, :] if ray_major else k[:, None]
    flat = None
    for ax in range(3):
        p, s = (first[:, ax:ax + 1], stride[:, ax:ax + 1]) if ray_major else (first[:, ax], stride[:, ax])
        c = torch.addcmul(p, k, s).floor_().clamp_(0, padded[ax] - 1).to(torch.int32)
        flat = c if flat is None else flat.mul_(padded[ax]).add_(c)
    sum_dim = 1 if ray_major else 0
    if labels is None:
        v = voxels[flat]
        total = torch.bitwise_right_shift(v, 8).sum(dim=sum_dim)
        key = v.bitwise_and_(255)
    else:
        total = voxels[flat].sum(dim=sum_dim)
        key = labels[flat]
    ray = torch.arange(first.shape[0], dtype=torch.int32, device=first.device) * n_labels
    key += ray[:, None] if ray_major else ray[None, :]
    return total, key


@functools.cache
def _compiled_gather():
    """:func:`_gather` compiled once per process (``torch.compile``, dynamic shapes)."""
    return torch.compile(_gather, dynamic=True)


def _clip_to_box(src: torch.Tensor, direction: torch.Tensor, shape: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances (``float64 [N]``, mm) of rays ``src + t * direction``
    (``[N, 3]`` voxel coordinates, ``direction`` in voxels per mm) through the box of
    voxels ``[-0.5, shape - 0.5]``; ``t0 >= 0``; a ray that misses has ``t1 <= t0``."""
    lo, hi = -0.5, shape - 0.5
    par = direction == 0
    safe = torch.where(par, torch.ones_like(direction), direction)
    ta = (lo - src) / safe
    tb = (hi - src) / safe
    near = torch.minimum(ta, tb)
    far = torch.maximum(ta, tb)
    # a ray parallel to a pair of faces is inside that slab for all t, or never
    inside = (src >= lo) & (src <= hi)
    inf = torch.full_like(near, float("inf"))
    near = torch.where(par, torch.where(inside, -inf, inf), near)
    far = torch.where(par, torch.where(inside, inf, -inf), far)
    return near.amax(dim=1).clamp(min=0.0), far.amin(dim=1)


def gaussian_blur_2d(images: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Separable Gaussian blur of ``images`` ``float [..., H, W]`` (sigma in pixels, kernel
    truncated at 3 sigma, edges replicated); a new tensor of the same shape and device.

    NOTE: a sum of shifted slices rather than ``conv2d`` (or kornia's
    ``gaussian_blur2d``, which calls it): with one channel per image PyTorch's CPU
    convolution took twice as long (95 masks of 256 px: 0.22 s against 0.13 s).
    """
    if sigma_px <= 0:
        return images.clone()
    r = max(1, int(np.ceil(3.0 * sigma_px)))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma_px) ** 2)
    weights = (k / k.sum()).tolist()
    out = images
    for _ in range(2):  # along W, then along H (transposed)
        n = out.shape[-1]
        padded = out[..., torch.arange(-r, n + r, device=out.device).clamp(0, n - 1)]
        acc = torch.zeros_like(out)
        for j, w in enumerate(weights):
            acc.add_(padded[..., j:j + n], alpha=w)
        out = acc.transpose(-1, -2)
    return out.contiguous()


def smooth_masks(masks: torch.Tensor, sigma_px: float) -> torch.Tensor:
    """Anti-alias binary masks: Gaussian-blur each and threshold it again at one half.

    ``masks`` ``bool [S, H, W]``; ``sigma_px``: Gaussian sigma in pixels (0: a copy).
    A straight edge stays where it is and a staircase of voxel faces becomes its
    mean line; a convex corner is rounded (radius of the order of sigma) and parts
    thinner than about two sigma are dropped. Each mask is blurred only inside its
    support grown by the kernel's radius (outside it the blur is zero anyway), so the
    cost is that of the structure's box, not of the image. Returns ``bool [S, H, W]``.
    """
    out = masks.clone()
    if sigma_px <= 0:
        return out
    r = max(1, int(np.ceil(3.0 * sigma_px)))
    h, w = masks.shape[-2:]
    rows, cols = masks.any(dim=2), masks.any(dim=1)  # [S, H], [S, W]
    for s in torch.nonzero(rows.any(dim=1)).flatten().tolist():
        ys, xs = torch.nonzero(rows[s]).flatten(), torch.nonzero(cols[s]).flatten()
        y0, y1 = max(int(ys[0]) - r, 0), min(int(ys[-1]) + r + 1, h)
        x0, x1 = max(int(xs[0]) - r, 0), min(int(xs[-1]) + r + 1, w)
        out[s, y0:y1, x0:x1] = gaussian_blur_2d(masks[s, y0:y1, x0:x1].float(), sigma_px) > 0.5
    return out


def masks_from_path_lengths(path_mm: torch.Tensor, groups: list, threshold_mm: float) -> torch.Tensor:
    """Binary masks from per-label path lengths.

    ``path_mm`` ``float32 [..., N, L]`` (mm, e.g. ``[B, H*W, L]`` from
    :meth:`RayMarcher.project_images`); ``groups[s]`` the compact label indices making up
    structure ``s`` (one for a TotalSegmentator class, several for a union such as a
    whole lung; empty for a structure not in the volume), or a
    :class:`~chexanatomy_lib.ct.synthesis.LabelGroup` whose ``exclude`` labels take a
    pixel out again (a lung field: the lung minus what lies in front of or behind the
    heart, mediastinum and abdomen). A ray belongs to structure ``s`` when its summed
    path length through the included labels exceeds ``threshold_mm`` (>= 0) and its
    summed path length through the excluded ones does not.
    Returns ``bool [..., S, N]`` on the device of ``path_mm``.
    """
    if not threshold_mm >= 0:
        raise ValueError(f"threshold_mm must be >= 0, got {threshold_mm}")
    include = [list(getattr(g, "include", g)) for g in groups]
    exclude = [list(getattr(g, "exclude", ())) for g in groups]
    masks = _path_length_masks(path_mm, include, threshold_mm)
    cut = [s for s, e in enumerate(exclude) if e]
    if cut:
        covered = _path_length_masks(path_mm, [exclude[s] for s in cut], threshold_mm)
        masks[..., cut, :] &= ~covered
    return masks


def _path_length_masks(path_mm: torch.Tensor, groups: list[list[int]], threshold_mm: float) -> torch.Tensor:
    # one product with a 0/1 membership matrix sums every group of every ray at once,
    # on the device the rays were traced on
    member = torch.zeros(path_mm.shape[-1], len(groups), device=path_mm.device)
    for s, g in enumerate(groups):
        member[g, s] = 1.0
    lengths = path_mm @ member  # [..., N, S] mm through each structure
    return (lengths > threshold_mm).transpose(-1, -2)
