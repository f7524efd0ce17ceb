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
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

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

    def attenuation(self, line_integral: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Measured attenuation ``p = -log(counts / I0)`` (``float32``, same shape).

        Noiseless (``photons_per_pixel=None`` or ``rng=None``) it is the line
        integral itself. Zero counts are read as half a photon, so ``p`` stays finite.
        """
        p = np.asarray(line_integral, dtype=np.float64)
        if self.photons_per_pixel is None or rng is None:
            return p.astype(np.float32)
        i0 = float(self.photons_per_pixel)
        counts = rng.poisson(i0 * np.exp(-p)).astype(np.float64)
        return (-np.log(np.maximum(counts, 0.5) / i0)).astype(np.float32)

    def display(self, p: np.ndarray) -> np.ndarray:
        """Contrast curve: ``float32`` in [0, 1], white = dense."""
        p = np.asarray(p, dtype=np.float32)
        if self.window is not None:
            lo, hi = self.window
        else:
            lo, hi = np.percentile(p, [self.window_low_pct, self.window_high_pct])
        if not hi > lo:  # a flat image (nothing in the beam)
            return np.zeros_like(p, dtype=np.float32)
        y = np.clip((p - lo) / (hi - lo), 0.0, 1.0) ** self.gamma
        return y.astype(np.float32)

    def __call__(self, line_integral: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """Radiograph ``float32`` in [0, 1] (shape of ``line_integral``, e.g. ``[H, W]``)."""
        return self.display(self.attenuation(line_integral, rng))
