"""The baseline's saved model: weights plus a model card, and clear errors for
folders that are not one.

A checkpoint folder holds
  model_card.json      {"kind": "unet", "format_version": 1, "structures": [...],
                        "input_size": int, "threshold": float, "model": {UNetConfig}, ...}
  model.safetensors    the network's weights (float32)
  training_state/      optimizer, scheduler, RNG and data-order state for resuming
  history.json         learning curves (see `chexanatomy_lib.unet.train`)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CARD_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "read_model_card",
    "save_model",
    "load_model",
]

CARD_NAME = "model_card.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
_REQUIRED = ("kind", "format_version", "structures", "input_size", "threshold", "model")


class CheckpointError(Exception):
    """A checkpoint folder is missing, incomplete or not a U-Net checkpoint; `path` names it."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)  # the offending folder or file
        self.problem = problem  # what is wrong with it
        super().__init__(f"{self.path}: {problem}")


def read_model_card(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The validated model card of a U-Net checkpoint folder.

    Raises CheckpointError when the folder or its card is missing, the card is not
    JSON, names another kind of model, or lacks a field.
    """
    root = Path(checkpoint_dir)
    if not root.exists():
        raise CheckpointError(root, "checkpoint folder does not exist")
    if not root.is_dir():
        raise CheckpointError(root, "checkpoint must be a folder holding model_card.json and model.safetensors")
    card_path = root / CARD_NAME
    if not card_path.is_file():
        raise CheckpointError(card_path, "missing; this folder is not a saved model")
    try:
        card = json.loads(card_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(card_path, f"not valid JSON ({err})") from err
    if not isinstance(card, dict):
        raise CheckpointError(card_path, "must hold a JSON object")
    if card.get("kind") != "unet":
        raise CheckpointError(card_path, f"describes a model of kind {card.get('kind')!r}, not a U-Net ('unet')")
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
    full = {"kind": "unet", "format_version": FORMAT_VERSION, **card}
    full["kind"], full["format_version"] = "unet", FORMAT_VERSION
    path = root / CARD_NAME
    path.write_text(json.dumps(full, indent=2) + "\n")
    return path


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
