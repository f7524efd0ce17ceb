"""The baseline's saved model: weights plus a model card, and clear errors for
folders that are not one.

A checkpoint folder holds
  model_card.json      {"kind": "unet", "format_version": 1, "structures": [...],
                        "input_size": int, "threshold": float, "model": {UNetConfig}, ...}
  model.safetensors    the network's weights (float32)
  checkpoints/         the training loop's saved state for resuming (`chexanatomy_lib.training`)
  training_log.json    learning curves (see `chexanatomy_lib.unet.train`)

Cards are read and written through `chexanatomy_lib.checkpoints`, which also defines
the `CheckpointError` raised here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CARD_NAME, CheckpointError, read_card, write_card

__all__ = [
    "CARD_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "read_model_card",
    "save_model",
    "load_model",
]

WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
_REQUIRED = ("format_version", "structures", "input_size", "threshold", "model")


def read_model_card(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The validated model card of a U-Net checkpoint folder.

    Raises CheckpointError when the folder or its card is missing, the card is not
    JSON, names another kind of model, or lacks a field.
    """
    card = read_card(checkpoint_dir, kind="unet")
    card_path = Path(checkpoint_dir) / CARD_NAME
    missing = [k for k in _REQUIRED if k not in card]
    if missing:
        raise CheckpointError(card_path, f"lacks the field(s) {missing}")
    if card["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            card_path, f"format_version {card['format_version']!r} is not supported (expected {FORMAT_VERSION})"
        )
    return card


def save_model(checkpoint_dir: str | Path, model: torch.nn.Module, card: dict[str, Any]) -> Path:
    """Write `model`'s weights and `card` (kind and format version are added) into
    `checkpoint_dir`; returns the card's path."""
    from safetensors.torch import save_file

    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / WEIGHTS_NAME))
    return write_card(root, "unet", {"format_version": FORMAT_VERSION,
                                     **{k: v for k, v in card.items() if k != "format_version"}})


def load_model(checkpoint_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(network in eval mode on the CPU, model card) of a saved checkpoint."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .model import UNetConfig, build_unet

    root = Path(checkpoint_dir)
    card = read_model_card(root)
    weights = root / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(weights, "missing; the model card has no weights beside it")
    try:
        config = UNetConfig.from_dict(card["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(root / CARD_NAME, f"invalid 'model' entry: {err}") from err
    model = build_unet(len(card["structures"]), config)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(weights, f"unreadable weights ({err})") from err
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(weights, f"weights do not fit the architecture in the model card ({err})") from err
    model.eval()
    return model, card
