"""From a fine-tuned VLM to masks: the segmenter and the checkpoint folder.

- `VLMSegmenter`: one ``segment`` request per image listing every structure, decoded
  with or without the grammar. `.predict(images, structures)` gives the arrays of the
  shared prediction format (as the U-Net's segmenter does, so
  `chexanatomy_lib.evaluation.predictions.predict_split` treats both alike);
  `.segment(image, structures)` one radiograph of any size (``chexanatomy segment``).
- `save_finetuned` / `VLMSegmenter.load`: the chapter's checkpoint folder (weights or
  LoRA adapter, processor, the mask codec, `model_card.json`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

CODEC_DIR = "codec"


def prompt_names(structures: Sequence[str], registry=None) -> list[str]:
    """Registry names -> the display names used to request them (``"lung_left"`` -> ``"left lung"``)."""
    if registry is None:
        from ..ct.registry import load_registry

        registry = load_registry()
    return [registry.get(s).display for s in structures]


def save_finetuned(vlm, out_dir: str | Path, structures: Sequence[str], codec_dir: str | Path,
                   extra: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint folder read by chapter 4 and ``chexanatomy segment``.

    out_dir/model or out_dir/adapter (weights), out_dir/processor, out_dir/codec
    (a copy of the mask VQ-VAE folder), out_dir/model_card.json with
    ``{"kind": "vlm", "structures": [...], "prompt_names": [...], "codec": "codec", ...}``.
    """
    from .model import save_vlm

    out = Path(out_dir)
    codec_src = Path(codec_dir)
    if not codec_src.is_dir():
        raise FileNotFoundError(f"{codec_src}: mask codec folder not found (chapter 2 writes it)")
    dst = out / CODEC_DIR
    if dst.exists():
        shutil.rmtree(dst)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(codec_src, dst)
    card = {"structures": list(structures), "prompt_names": prompt_names(structures), "codec": CODEC_DIR}
    card.update(extra or {})
    return save_vlm(vlm, out, card)


class VLMSegmenter:
    """Segment structures on radiographs with a fine-tuned VLM.

    vlm: a `VLM` (`vlm.model`, `vlm.processor`); codec: the `MaskCodec` its seg tokens
    decode with; device: where generation runs (None: the model's device);
    constrained: decode within the output grammar (False: free greedy decoding);
    loc_rule: how a constrained box coordinate is read (`decode.LOC_RULES`; None: the
    rule in the checkpoint's model card, else ``"median"``); structures: the registry
    names the model was trained on (None: those of its model card; a structure outside
    them is refused).
    """

    def __init__(self, vlm, codec, device: str | None = None, constrained: bool = True,
                 loc_rule: str | None = None, structures: Sequence[str] | None = None):
        from .decode import LOC_RULES

        self.vlm = vlm
        self.codec = codec
        self.device = device
        self.constrained = constrained
        card = vlm.info.get("card", {})
        self.structures = list(structures) if structures is not None else list(card.get("structures", []))
        self.loc_rule = loc_rule or card.get("loc_rule", "median")
        if self.loc_rule not in LOC_RULES:
            raise ValueError(f"loc_rule must be one of {LOC_RULES}, got {self.loc_rule!r}")

    def decode(self, images: Sequence[np.ndarray], structures: Sequence[str] | None = None, batch_size: int = 16,
               progress: bool = False) -> list:
        """One ``segment`` request per image (float [H, W] in [0, 1]) listing ``structures``
        (default: the model's); returns the `decode.Decoded` output of each image."""
        from .decode import generate_segment

        names = [self._prompt_name(t) for t in (self.structures if structures is None else structures)]
        return generate_segment(self.vlm, [np.asarray(im, dtype=np.float32) for im in images], names,
                                constrained=self.constrained, batch_size=batch_size, progress=progress,
                                device=self.device, loc_rule=self.loc_rule)

    def predict(self, images: np.ndarray, structures: Sequence[str] | None = None, batch_size: int = 16,
                progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict ``structures`` (default: the model's) on images float [N, H, W] in [0, 1].

        Returns masks bool [N, S, H, W] at the images' size (decoded by the codec), boxes
        float32 [N, S, 4] (the decoded location boxes, NaN where invalid) and valid bool
        [N, S] (whether the output for that structure parsed as a well-formed instance).
        """
        from .decode import instances_to_arrays

        images = np.asarray(images, dtype=np.float32)
        decoded = self.decode(list(images), structures, batch_size, progress)
        return instances_to_arrays(decoded, self.codec, images.shape[-2], images.shape[-1])

    @classmethod
    def load(cls, ckpt_dir: str | Path, device: str = "auto", constrained: bool = True,
             loc_rule: str | None = None) -> "VLMSegmenter":
        """Load a folder written by `save_finetuned` (CheckpointError naming what is missing)."""
        from ..checkpoints import CheckpointError
        from ..codec import MaskCodec
        from ..devices import resolve_device
        from .model import load_saved_vlm

        d = Path(ckpt_dir)
        vlm = load_saved_vlm(d)
        codec_dir = d / vlm.info["card"].get("codec", CODEC_DIR)
        if not codec_dir.is_dir():
            raise CheckpointError(codec_dir, "the mask codec is missing from this checkpoint")
        dev = resolve_device(device)
        vlm.model.to(dev)
        return cls(vlm, MaskCodec.ours(codec_dir), dev, constrained, loc_rule)

    def _prompt_name(self, text: str) -> str:
        from ..ct.registry import load_registry

        reg = load_registry()
        s = reg.resolve(text)  # raises UnknownStructureError with suggestions
        if self.structures and s.name not in self.structures:
            raise ValueError(f"structure {text!r} ({s.name}) was not among this model's training targets "
                             f"{self.structures}")
        return s.display

    def segment(self, image: np.ndarray, structures: Sequence[str]) -> dict[str, tuple]:
        """Segment `structures` (registry names, display names or synonyms) on one image (any size)."""
        from ..radiograph import letterbox
        from .decode import instances_to_arrays

        img = np.asarray(image, dtype=np.float32)
        if img.ndim != 2:
            raise ValueError(f"image must be [H, W], got shape {img.shape}")
        # NOTE: masks are decoded on the square (at most 1024 px) and resized back
        square, lb = letterbox(img, min(max(img.shape), 1024))
        dec = self.decode([square], structures)
        masks, boxes, valid = instances_to_arrays(dec, self.codec, lb.size, lb.size)
        out: dict[str, tuple] = {}
        tokens = [p for p in dec[0].text.split(" ; ")]
        for j, text in enumerate(structures):
            if not valid[0, j]:
                out[str(text)] = (np.zeros(img.shape, bool), None, tokens[j] if j < len(tokens) else None)
                continue
            box = lb.box_to_original(boxes[0, j])
            if box[2] <= box[0] or box[3] <= box[1]:
                box = None  # NOTE: a box that lies wholly in the letterbox padding is no box in the image
            out[str(text)] = (lb.mask_to_original(masks[0, j]), box, tokens[j] if j < len(tokens) else None)
        return out
