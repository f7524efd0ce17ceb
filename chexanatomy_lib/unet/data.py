"""Training samples for the baseline, read from a projected dataset.

The U-Net sees exactly what the VLM sees: the same dataset, the same seeded
splits, the same input resolution and the same geometric augmentation
(`chexanatomy_lib.augment`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..codec.geometry import resample_masks

__all__ = [
    "Augmentation",
    "SegmentationSamples",
    "default_structures",
    "resize_images",
    "upsample_probabilities",
]


@dataclass(frozen=True)
class Augmentation:
    """Random similarity transform (`chexanatomy_lib.augment.random_affine`) applied
    to a sample with probability `prob`; `prob = 0` disables augmentation.

    The defaults are the VLM's (`chexanatomy_lib.vlm.tasks`), and so is the rule
    for structures pushed out of the frame: one that keeps less than
    `min_area_kept` of its area is no target in that sample.
    """

    prob: float = 0.5  # probability that a sample is transformed
    max_rotation_deg: float = 8.0  # rotation uniform in +-this (degrees)
    max_scale: float = 0.08  # zoom uniform in [1 - max_scale, 1 + max_scale]
    max_shift: float = 0.04  # shift uniform in +-this fraction of the side
    min_area_kept: float = 0.9  # a structure keeping less of its area is left out of the loss

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ValueError(f"augmentation prob must be in [0, 1], got {self.prob}")

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and max(self.max_rotation_deg, self.max_scale, self.max_shift) > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_structures(dataset: Any, split: str = "train") -> list[str]:
    """Structures a model can learn from `split`, in dataset order: those that are
    present and untruncated in at least one image of the split.

    Where a structure is truncated (cut by the CT's field of view, so its
    projected mask is partial) that image is left out of its loss; structures
    truncated or absent in every image have nothing to learn from.
    """
    idx = np.asarray(dataset.split_indices(split))
    if idx.size == 0:
        raise ValueError(f"the dataset has no images in split {split!r}")
    usable = ~np.asarray(dataset.truncated)[idx] & ~np.asarray(dataset.absent)[idx]
    return [name for name, k in zip(dataset.structures, usable.any(axis=0)) if k]


def resize_images(images: np.ndarray | torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Images float [N, H, W] in [0, 1] -> float32 tensor [N, 1, h, w] (bilinear, antialiased)."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32) if not torch.is_tensor(images) else images)
    x = x.float()
    if x.ndim != 3:
        raise ValueError(f"images must be [N, H, W], got shape {tuple(x.shape)}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = x[:, None]
    if tuple(x.shape[-2:]) == hw:
        return x.contiguous()
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=True).clamp_(0.0, 1.0)


def upsample_probabilities(prob: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Probabilities float [N, S, h, w] -> [N, S, H, W] (bilinear; antialiased when shrinking)."""
    if tuple(prob.shape[-2:]) == tuple(size):
        return prob
    shrink = prob.shape[-2] > size[0] or prob.shape[-1] > size[1]
    return F.interpolate(prob.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=shrink)


class SegmentationSamples(torch.utils.data.Dataset):
    """One split of a projected dataset at the model's input size, held in memory.

    Items are addressed by `(epoch, position)` (or a bare `position`, meaning no
    augmentation): the augmentation of an item depends only on
    `(seed, epoch, image index)`, so an interrupted run that resumes draws
    exactly the transforms it would have drawn.

    An item is a dict:
      image  float32 [1, h, w] in [0, 1]
      target float32 [S, h, w] in {0, 1}
      valid  bool [S]  (False where the structure is truncated in this image or an
                       augmentation pushed too much of it out of the frame)
      index  int       (row of the dataset)
    """

    def __init__(
        self,
        dataset: Any,  # chexanatomy_lib.ct.dataset.ProjectedDataset
        split: str,  # "train", "val" or "test"
        structures: Sequence[str],  # registry names, in output-channel order
        input_size: int,  # side of the square model input (px)
        augmentation: Augmentation | None = None,  # None = no augmentation
        seed: int = 0,  # seeds the per-item augmentation
        chunk: int = 32,  # images read from disk at a time
        indices: Sequence[int] | None = None,  # only these rows of the split (a k-shot draw); None: all
    ):
        self.split = split
        self.structures = list(structures)
        self.input_size = int(input_size)
        self.augmentation = augmentation if augmentation is not None and augmentation.enabled else None
        self.seed = int(seed)
        missing = [s for s in self.structures if s not in list(dataset.structures)]
        if missing:
            raise ValueError(f"structures not in the dataset: {missing}; it has {list(dataset.structures)}")
        self.indices = np.asarray(dataset.split_indices(split), dtype=np.int64)
        if indices is not None:
            wanted = np.asarray(indices, dtype=np.int64)
            outside = sorted(set(wanted.tolist()) - set(self.indices.tolist()))
            if outside:
                raise ValueError(f"rows {outside[:5]} are not in split {split!r}")
            self.indices = wanted
        if self.indices.size == 0:
            raise ValueError(f"the dataset has no images in split {split!r}")
        col = [list(dataset.structures).index(s) for s in self.structures]
        self.valid = torch.from_numpy(~np.asarray(dataset.truncated)[self.indices][:, col])
        images = np.asarray(dataset.images)
        self.images = resize_images(images[self.indices], self.input_size)[:, 0]  # [N, h, w]
        parts = []
        for start in range(0, self.indices.size, chunk):
            sel = self.indices[start : start + chunk]
            masks = dataset.masks_for(sel, self.structures)
            parts.append(torch.from_numpy(resample_masks(masks, self.input_size, "area",
                                                         batch_size=max(1, masks.shape[0] * masks.shape[1]))))
        self.masks = torch.cat(parts)  # bool [N, S, h, w]

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, pos = (None, key) if isinstance(key, (int, np.integer)) else key
        image, masks, valid = self.images[pos], self.masks[pos], self.valid[pos]
        if self.augmentation is not None and epoch is not None:
            from chexanatomy_lib.augment import random_affine

            a = self.augmentation
            rng = np.random.default_rng([self.seed, int(epoch), int(self.indices[pos])])
            if rng.random() < a.prob:
                # NOTE: applied at the network's input size, not the stored size:
                # the transform (about the centre, shift in fractions of the side)
                # is the same in normalised coordinates, at a quarter of the cost.
                img_np, m_np = random_affine(
                    image.numpy(), masks.numpy(), rng, a.max_rotation_deg, a.max_scale, a.max_shift
                )
                area0 = masks.flatten(1).sum(1)
                image, masks = torch.from_numpy(np.clip(img_np, 0.0, 1.0)), torch.from_numpy(m_np)
                kept = masks.flatten(1).sum(1) >= a.min_area_kept * area0
                valid = valid & kept
        return {
            "image": image[None].float(),
            "target": masks.float(),
            "valid": valid,
            "index": int(self.indices[pos]),
        }
