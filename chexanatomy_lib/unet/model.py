"""The U-Net baseline's network: MONAI's configurable 2D U-Net.

One output channel per structure with an independent sigmoid (not a softmax):
projected structures overlap (the heart lies in front of the lungs, the ribs
cross everything), so a pixel can belong to several structures at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["UNetConfig", "build_unet", "count_parameters"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the baseline.

    NOTE: `monai.networks.nets.UNet` rather than `BasicUNet`: its depth and
    widths are free parameters (`BasicUNet` has a fixed five-level layout with
    two full-resolution 3x3 convolutions per level), so the smoke profile (four
    narrow levels at 128 px) and the paper profile (wider, deeper) build the same
    class from one config. The U-Net ends in `head` feature maps and a 1x1
    convolution maps them to one logit per structure: MONAI's top block would
    otherwise run its 3x3 convolutions at full resolution with one channel per
    structure, which for ~70 structures costs more than the rest of the network.
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)  # feature maps per level, shallow to deep
    strides: tuple[int, ...] = (2, 2, 2)  # down-sampling between levels (len(channels) - 1)
    num_res_units: int = 1  # residual units per block (0 = plain conv blocks)
    norm: str = "instance"  # "instance" or "batch"
    dropout: float = 0.0  # dropout probability inside the blocks
    head: int = 16  # feature maps before the 1x1 convolution to one logit per structure

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if len(self.channels) < 2:
            raise ValueError(f"a U-Net needs at least 2 levels, got channels={self.channels}")
        if len(self.strides) != len(self.channels) - 1:
            raise ValueError(
                f"strides {self.strides} must have one entry fewer than channels {self.channels}"
            )
        if self.head < 1:
            raise ValueError(f"head must be >= 1, got {self.head}")
        if self.norm not in ("instance", "batch"):
            raise ValueError(f"norm must be 'instance' or 'batch', got {self.norm!r}")

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (the product of the strides)."""
        m = 1
        for s in self.strides:
            m *= s
        return m

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["strides"] = list(self.strides)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown U-Net config keys: {sorted(unknown)}")
        return cls(**d)


def build_unet(n_structures: int, config: UNetConfig | None = None) -> torch.nn.Module:
    """A 2D U-Net mapping `[B, 1, h, w]` float images in [0, 1] to `[B, n_structures, h, w]`
    float logits (apply a sigmoid per channel for probabilities).

    `h` and `w` must be multiples of `config.size_multiple`.
    """
    from monai.networks.nets import UNet

    config = config or UNetConfig()
    if n_structures < 1:
        raise ValueError("the U-Net needs at least one structure")
    body = UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=config.head,
        channels=config.channels,
        strides=config.strides,
        num_res_units=config.num_res_units,
        norm=config.norm.upper(),
        dropout=config.dropout,
    )
    return torch.nn.Sequential(body, torch.nn.PReLU(), torch.nn.Conv2d(config.head, int(n_structures), 1))


def count_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
