"""Saved models on disk: the model card every checkpoint folder carries, and the one
error for a checkpoint that cannot be used.

A checkpoint folder (chapter 3's VLM, chapter 4's U-Net) holds ``model_card.json``,
a JSON object whose ``"kind"`` (``"vlm"`` or ``"unet"``) says which model reads the
rest of the folder. This module knows cards, not models: the VLM and the U-Net
each validate the fields they need, and ``chexanatomy segment`` picks the model by
the card's kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_NAME = "model_card.json"
KINDS = {"vlm": "a VLM", "unet": "a U-Net"}  # kind -> what it is, for messages


class CheckpointError(ValueError):
    """A checkpoint (folder, file, card or weights) that cannot be used.

    ``path`` names the offending folder or file (None when there is no single one,
    e.g. a hub id that was looked up in several places), ``problem`` what is wrong.
    """

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)  # the folder or file at fault
        self.problem = problem  # what is wrong with it, and what to do
        super().__init__(problem if path is None else f"{path}: {problem}")


def read_card(checkpoint_dir: str | Path, kind: str | None = None) -> dict[str, Any]:
    """The model card of a checkpoint folder, as a dict with at least ``"kind"``.

    kind: the kind the caller can load (``"vlm"`` or ``"unet"``); None accepts any kind.
    Raises :class:`CheckpointError` when the folder or its card is missing, the card is
    not a JSON object, has no kind, or names another kind than ``kind``.
    """
    root = Path(checkpoint_dir)
    if not root.exists():
        raise CheckpointError(root, f"checkpoint folder does not exist (expected a folder with {CARD_NAME}, "
                                    "e.g. <run_dir>/03_vlm_finetune/checkpoint written by chapter 3)")
    if not root.is_dir():
        raise CheckpointError(root, f"a checkpoint must be a folder holding {CARD_NAME} and the weights")
    path = root / CARD_NAME
    if not path.is_file():
        raise CheckpointError(path, "missing; this folder is not a saved model")
    try:
        card = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(path, f"not valid JSON ({err})") from None
    if not isinstance(card, dict):
        raise CheckpointError(path, "must hold a JSON object")
    if "kind" not in card:
        raise CheckpointError(path, f"has no 'kind' entry (expected one of {list(KINDS)})")
    if kind is not None and card["kind"] != kind:
        raise CheckpointError(path, f"describes a model of kind {card['kind']!r}, not {KINDS.get(kind, kind)} ({kind!r})")
    return card


def write_card(checkpoint_dir: str | Path, kind: str, card: dict[str, Any]) -> Path:
    """Write ``card`` with ``"kind"`` set (first key) to ``<checkpoint_dir>/model_card.json``; returns its path."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / CARD_NAME
    path.write_text(json.dumps({"kind": kind, **{k: v for k, v in card.items() if k != "kind"}}, indent=2) + "\n")
    return path
