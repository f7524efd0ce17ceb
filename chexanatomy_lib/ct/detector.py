"""Detector model: from line integrals of attenuation to a displayed radiograph.

Physics, in the order it happens:

1. CT numbers to linear attenuation, ``mu = mu_water * (1 + HU / 1000)``,
   clipped at 0 (air and the scanner's padding value attenuate nothing)
   (:func:`hu_to_mu`).
2. Beer-Lambert: the detected intensity of a ray is
   ``I = I0 * exp(-integral mu ds)``.
3. Quantum noise: photon counts are Poisson with mean ``I`` for ``I0`` photons
   per pixel in the unattenuated beam (the dose); seeded.
4. Log: the attenuation estimate ``p = -log(counts / I0)``.
5. Contrast curve: a window ``[lo, hi]`` on ``p`` (fixed, or percentiles of
   the image's own values, as a real detector's auto-processing does) mapped
   to [0, 1] and shaped by a gamma, so bone is white and air black.

A collimator shutter (``exposed``: which pixels the beam reaches) leaves the
rest of the detector without photons: those pixels show white (no transmitted
beam, like the densest bone), and the window is taken from the exposed pixels
only, as a real detector's processing finds the collimation edges first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

#: linear attenuation of water at about 70 keV effective energy (1/mm)
MU_WATER_PER_MM = 0.019


def hu_to_mu(hu: np.ndarray, mu_water: float = MU_WATER_PER_MM) -> np.ndarray:
    """Linear attenuation (1/mm, ``float32``, >= 0) from Hounsfield units (any shape)."""
    mu = np.asarray(mu_water, dtype=np.float32) * (1.0 + np.asarray(hu, dtype=np.float32) / 1000.0)
    return np.clip(mu, 0.0, None).astype(np.float32, copy=False)


@dataclass(frozen=True)
class DetectorModel:
    """Beer-Lambert intensity, Poisson noise, log and a contrast curve."""

    photons_per_pixel: float | None = 5.0e4  # I0, unattenuated photons per pixel; None = noiseless
    window_low_pct: float = 1.0  # lower end of the window: this percentile of the image's p
    window_high_pct: float = 99.7  # upper end: this percentile of the image's p
    window: tuple[float, float] | None = None  # fixed (lo, hi) window on p instead of percentiles
    gamma: float = 1.3  # contrast curve exponent (> 1 darkens soft tissue and lungs)

    def __post_init__(self) -> None:
        if self.photons_per_pixel is not None and not self.photons_per_pixel > 0:
            raise ValueError(f"photons_per_pixel must be > 0 or None, got {self.photons_per_pixel}")
        if not 0 <= self.window_low_pct < self.window_high_pct <= 100:
            raise ValueError("need 0 <= window_low_pct < window_high_pct <= 100")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"window must be (lo, hi) with lo < hi, got {self.window}")
        if not self.gamma > 0:
            raise ValueError(f"gamma must be > 0, got {self.gamma}")

    def as_dict(self) -> dict:
        return asdict(self)

    def attenuation(self, line_integral, noise_seed=None):
        """Measured attenuation ``p = -log(counts / I0)``, ``float32``, same shape.

        ``line_integral``: ``[..., H, W]`` NumPy array or torch tensor (any
        device; the result is of the same kind and on the same device).
        ``noise_seed``: one int per image (a sequence over the leading dims,
        flattened; None for a noiseless image), an int (image ``k`` of a batch
        uses ``seed + k``), or a ``numpy.random.Generator`` that draws them. Noiseless
        (``photons_per_pixel=None`` or no seed) it is the line integral itself.
        Zero counts are read as half a photon, so ``p`` stays finite.

        NOTE: the noise is drawn by torch from a generator on the input's device,
        so one seed gives the same image every time on one device, and different
        noise realisations (of the same distribution) on a CPU and a GPU.
        """
        p, to_numpy = _as_tensor(line_integral)
        if self.photons_per_pixel is not None and noise_seed is not None:
            i0 = float(self.photons_per_pixel)
            flat = p.reshape(-1, *p.shape[-2:]) if p.ndim >= 2 else p.reshape(1, -1)
            seeds = _seeds(noise_seed, len(flat))
            out = flat.clone()
            for b, seed in enumerate(seeds):
                if seed is None:
                    continue
                g = torch.Generator(device=p.device).manual_seed(int(seed))
                counts = torch.poisson(i0 * torch.exp(-flat[b].double()), generator=g)
                out[b] = (-torch.log(counts.clamp(min=0.5) / i0)).float()
            p = out.reshape(p.shape)
        return p.cpu().numpy() if to_numpy else p

    def display(self, p, exposed=None):
        """Contrast curve: ``float32`` in [0, 1], white = dense; ``[..., H, W]`` array or
        tensor, each image windowed on its own.

        ``exposed``: ``bool [H, W]`` (array or tensor), the pixels the collimator lets the
        beam reach (None: all). The window's percentiles come from those pixels; the
        others are 1 (white: no beam arrives there).
        """
        p, to_numpy = _as_tensor(p)
        flat = p.reshape(-1, p.shape[-2] * p.shape[-1]) if p.ndim >= 2 else p.reshape(1, -1)
        keep = None
        if exposed is not None:
            keep = torch.as_tensor(np.asarray(exposed) if not isinstance(exposed, torch.Tensor) else exposed,
                                   device=p.device).reshape(-1).bool()
            if keep.numel() != flat.shape[1] or not bool(keep.any()):
                raise ValueError(f"exposed must be a non-empty bool mask of {tuple(p.shape[-2:])} pixels")
        if self.window is not None:
            lo = torch.full((len(flat), 1), float(self.window[0]), device=p.device)
            hi = torch.full((len(flat), 1), float(self.window[1]), device=p.device)
        else:
            q = torch.tensor([self.window_low_pct / 100, self.window_high_pct / 100], device=p.device)
            lo, hi = torch.quantile(flat if keep is None else flat[:, keep], q, dim=1, keepdim=True)  # NumPy's "linear"
        flat_ok = hi > lo  # a flat image (nothing in the beam) is black
        y = ((flat - lo) / torch.where(flat_ok, hi - lo, torch.ones_like(hi))).clamp_(0.0, 1.0) ** self.gamma
        y = torch.where(flat_ok, y, torch.zeros_like(y))
        if keep is not None:
            y[:, ~keep] = 1.0
        y = y.reshape(p.shape).float()
        return y.cpu().numpy() if to_numpy else y

    def __call__(self, line_integral, noise_seed=None, exposed=None):
        """Radiograph ``float32`` in [0, 1] (shape, kind and device of ``line_integral``,
        e.g. ``[H, W]`` or ``[B, H, W]``); ``noise_seed`` as in :meth:`attenuation`,
        ``exposed`` as in :meth:`display`."""
        return self.display(self.attenuation(line_integral, noise_seed), exposed)


def _as_tensor(x) -> tuple[torch.Tensor, bool]:
    """``(float32 tensor, was_numpy)``."""
    if isinstance(x, torch.Tensor):
        return x.float(), False
    return torch.from_numpy(np.asarray(x, dtype=np.float32)), True


def _seeds(noise_seed, n: int) -> list:
    if isinstance(noise_seed, np.random.Generator):
        return [int(s) for s in noise_seed.integers(2**63 - 1, size=n)]
    if isinstance(noise_seed, (int, np.integer)):
        return [int(noise_seed) + k for k in range(n)] if n > 1 else [int(noise_seed)]
    seeds = list(noise_seed)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} noise seeds for {n} images")
    return seeds
