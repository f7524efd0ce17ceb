"""What a mask becomes on the codec's routes, for chapter 2's comparisons.

* through the tokens: a :class:`~chexanatomy_lib.codec.mask_codec.MaskCodec`'s round trip
  (box quantised to location bins, 16 codes, decoded and pasted back);
* *box only*: the filled location-token box (what the ``detect`` task alone gives);
* *mean template*: each structure's mean 64x64 training crop pasted into the mask's own
  location-token box (an average shape, nothing about this image);
* *resize only*: the 64x64 crop itself pasted back (no VQ-VAE): the ceiling the crop
  size leaves to any codebook.

Masks in, masks out (bool [N, H, W], non-empty); scoring them is
:mod:`chexanatomy_lib.evaluation`'s.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .geometry import MASK_SIZE, CropPolicy, ResizeMethod, crop_boxes, masks_to_crops, paste_maps, quantise_boxes
from .mask_codec import MaskCodec


def token_boxes(masks: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Masks bool [N, H, W] (non-empty) -> the boxes their location tokens decode to, float64 [N, 4]."""
    m = torch.from_numpy(np.asarray(masks))
    boxes = [crop_boxes(m[s:s + batch_size]) for s in range(0, len(m), batch_size)]
    return quantise_boxes(torch.cat(boxes) if boxes else torch.zeros((0, 4), dtype=torch.float32)).numpy()


def box_only_masks(masks: np.ndarray) -> np.ndarray:
    """Each mask replaced by its filled location-token box: bool [N, H, W]."""
    h, w = masks.shape[-2:]
    return paste_maps(np.ones((len(masks), MASK_SIZE, MASK_SIZE), np.float32), token_boxes(masks), h, w)


def mean_templates(crops: np.ndarray, structures: Sequence[str]) -> dict[str, np.ndarray]:
    """Mean 64x64 crop per structure: crops float [M, 64, 64] with one structure name per crop
    -> ``{name: float [64, 64] in [0, 1]}``."""
    names = np.asarray(structures)
    return {str(n): crops[np.flatnonzero(names == n)].mean(0) for n in np.unique(names)}


def template_masks(masks: np.ndarray, structures: Sequence[str], templates: dict[str, np.ndarray]) -> np.ndarray:
    """Each mask replaced by its structure's mean training crop (``templates[name]`` float [64, 64])
    pasted into the mask's own location-token box, inside where the mean is > 0.5: bool [N, H, W]."""
    h, w = masks.shape[-2:]
    maps = np.stack([templates[s] - 0.5 for s in structures]).astype(np.float32)
    return paste_maps(maps, token_boxes(masks), h, w)


def resize_only_masks(masks: np.ndarray, crop: CropPolicy = "aligned", resize: ResizeMethod = "bilinear_aa"
                      ) -> np.ndarray:
    """Each mask's 64x64 crop alone (no VQ-VAE) pasted back into its location-token box
    (inside = crop > 0.5): bool [N, H, W]."""
    h, w = masks.shape[-2:]
    boxes, crops = masks_to_crops(masks, crop=crop, resize=resize)
    return paste_maps(2.0 * crops - 1.0, quantise_boxes(boxes), h, w)


def roundtrip_routes(codecs: dict[str, MaskCodec | None], masks: np.ndarray, structures: Sequence[str] | None = None,
                     templates: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Every route's masks: ``{route: bool [N, H, W]}`` for masks bool [N, H, W] (non-empty).

    codecs: ``{route name: MaskCodec}`` (``None`` entries are skipped); ``"box only"`` is
    added, and ``"mean template"`` when ``templates`` and the masks' ``structures`` are given.
    """
    routes = {name: codec.roundtrip(masks) for name, codec in codecs.items() if codec is not None}
    routes["box only"] = box_only_masks(masks)
    if templates is not None and structures is not None:
        routes["mean template"] = template_masks(masks, list(structures), templates)
    return routes
