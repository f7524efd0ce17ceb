"""Segmenting radiographs with a saved U-Net baseline.

`load_segmenter(checkpoint_dir)` returns a `UNetSegmenter`. Like the VLM's segmenter it
has `.predict(images, structures)` (a batch, the arrays of the shared prediction
format) and `.segment(image, structures)` (one radiograph of any size), so
`chexanatomy_lib.evaluation.predictions.predict_split` and `chexanatomy segment`
treat both models alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..codec.geometry import masks_to_boxes
from ..devices import resolve_device
from .checkpoint import CheckpointError, load_model
from .data import resize_images, upsample_probabilities

__all__ = ["CheckpointError", "UNetSegmenter", "load_segmenter"]


class UNetSegmenter:
    """A trained baseline ready to segment.

    Attributes: `structures` (registry names, output channel order),
    `input_size` (side of the square network input, px), `threshold` (on the
    sigmoid probability), `card` (the model card), `device`.
    """

    def __init__(self, model: torch.nn.Module, card: dict[str, Any], device: str = "cpu"):
        self.card = card
        self.structures: list[str] = list(card["structures"])
        self.input_size = int(card["input_size"])
        self.threshold = float(card["threshold"])
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    def __repr__(self) -> str:
        return f"UNetSegmenter({len(self.structures)} structures, input {self.input_size} px, {self.device})"

    @torch.no_grad()
    def probabilities(self, images: np.ndarray | torch.Tensor, batch_size: int = 16) -> np.ndarray:
        """Sigmoid probabilities float32 [N, S, H, W] in [0, 1] for images float [N, H, W]
        in [0, 1] of any size: each image is resized to the network input and the
        probabilities are resized back to H x W (bilinear)."""
        images = images if torch.is_tensor(images) else torch.as_tensor(np.asarray(images, dtype=np.float32))
        if images.ndim != 3:
            raise ValueError(f"images must be float [N, H, W], got shape {tuple(images.shape)}")
        if not torch.isfinite(images).all() or images.numel() and (images.min() < 0 or images.max() > 1):
            raise ValueError("image values must be finite and in [0, 1]")
        size = tuple(images.shape[-2:])
        out = np.empty((images.shape[0], len(self.structures), *size), dtype=np.float32)
        for start in range(0, images.shape[0], batch_size):
            x = resize_images(images[start : start + batch_size], self.input_size).to(self.device)
            prob = torch.sigmoid(self.model(x).float())
            out[start : start + x.shape[0]] = upsample_probabilities(prob, size).cpu().numpy()
        return out

    def predict_masks(self, images: np.ndarray | torch.Tensor, batch_size: int = 16) -> np.ndarray:
        """Masks bool [N, S, H, W] (probability > threshold) for images float [N, H, W] in [0, 1]."""
        return self.probabilities(images, batch_size) > self.threshold

    def predict(self, images: np.ndarray, structures: Sequence[str] | None = None, batch_size: int = 16,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict ``structures`` (default: every output channel) on images float [N, H, W] in [0, 1].

        Returns masks bool [N, S, H, W] at the images' size, boxes float32 [N, S, 4] (the
        tight box of each mask, NaN when it is empty) and valid bool [N, S] (always True:
        a U-Net always produces a mask).
        """
        from tqdm.auto import tqdm

        channels = self._channels(structures) if structures is not None else list(range(len(self.structures)))
        images = np.asarray(images, dtype=np.float32)
        masks = np.zeros((len(images), len(channels), *images.shape[1:]), dtype=bool)
        for start in tqdm(range(0, len(images), batch_size), desc="U-Net inference", disable=not progress):
            masks[start:start + batch_size] = self.predict_masks(images[start:start + batch_size], batch_size)[:, channels]
        boxes = masks_to_boxes(masks).astype(np.float32)
        return masks, boxes, np.ones(masks.shape[:2], dtype=bool)

    def _channels(self, structures: Sequence[str]) -> list[int]:
        from chexanatomy_lib.ct.errors import RegistryError
        from chexanatomy_lib.ct.registry import load_registry

        reg = load_registry()
        channels = []
        for text in structures:
            name = text if text in self.structures else None
            if name is None:
                try:
                    name = reg.resolve(text).name
                except RegistryError as err:
                    raise ValueError(f"{err}; this U-Net segments {self.structures}") from None
            if name not in self.structures:
                raise ValueError(
                    f"structure {text!r} ({name}) was not among this U-Net's training targets {self.structures}"
                )
            channels.append(self.structures.index(name))
        return channels

    def segment(
        self, image: np.ndarray, structures: Sequence[str]
    ) -> dict[str, tuple[np.ndarray, np.ndarray | None, None]]:
        """Segment one image float32 [H, W] in [0, 1] (any size).

        `structures`: registry names, display names or synonyms; each must be one
        of `self.structures`. Returns {requested text: (mask bool [H, W], box
        float32 [4] normalised (ymin, xmin, ymax, xmax) or None when the mask is
        empty, None)}; the third entry (generated text for a VLM) is always None.
        """
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"image must be [H, W], got shape {image.shape}")
        channels = self._channels(structures)
        masks = self.predict_masks(image[None].astype(np.float32))[0]
        out: dict[str, tuple[np.ndarray, np.ndarray | None, None]] = {}
        for text, c in zip(structures, channels):
            m = masks[c]
            box = masks_to_boxes(m).astype(np.float32) if m.any() else None
            out[str(text)] = (m, box, None)
        return out


def load_segmenter(checkpoint_dir: str | Path, device: str = "auto") -> UNetSegmenter:
    """A `UNetSegmenter` from a folder written by `train_unet` (model_card.json with
    kind "unet" + model.safetensors). Raises `CheckpointError` naming the file
    when the folder is missing, incomplete or holds another kind of model."""
    model, card = load_model(checkpoint_dir)
    return UNetSegmenter(model, card, resolve_device(device))
