"""The U-Net baseline: MONAI's 2D U-Net trained on the projected dataset with the
VLM's splits, input resolution and augmentation, saved with a model card and
scored through the shared prediction format.

- `chexanatomy_lib.unet.model`       `UNetConfig`, `build_unet`
- `chexanatomy_lib.unet.data`        training samples, resizing, default structures
- `chexanatomy_lib.unet.loss`        `MaskedDiceBCELoss`
- `chexanatomy_lib.unet.train`       `TrainConfig`, `train_unet` (the project's training loop)
- `chexanatomy_lib.unet.checkpoint`  model card, weights, `CheckpointError`
- `chexanatomy_lib.unet.inference`   `load_segmenter`, `UNetSegmenter` (`.predict`, `.segment`)

Names below are imported lazily, so `import chexanatomy_lib.unet` loads neither
MONAI nor Accelerate. This package never imports `chexanatomy_lib.vlm`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "UNetConfig": "model",
    "build_unet": "model",
    "Augmentation": "data",
    "default_structures": "data",
    "MaskedDiceBCELoss": "loss",
    "TrainConfig": "train",
    "UNetTrainResult": "train",
    "train_unet": "train",
    "load_history": "train",
    "CheckpointError": "checkpoint",
    "read_model_card": "checkpoint",
    "UNetSegmenter": "inference",
    "load_segmenter": "inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
