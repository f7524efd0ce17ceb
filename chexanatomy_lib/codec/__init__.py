"""The token codec: every conversion between boxes/masks and PaliGemma tokens.

* ``<loc>`` tokens for boxes (:func:`box_to_loc_tokens`, :func:`loc_tokens_to_box`, ...),
* ``<seg>`` tokens for masks through a mask VQ-VAE (:class:`MaskVQVAE`, :class:`MaskCodec`),
* prompts, targets and a parser for model output (:func:`format_prompt`,
  :func:`format_target`, :func:`parse_output`).
"""

from .errors import CheckpointError, CodecError
from .mask_codec import MaskCodec, masks_to_crops, resize_weights
from .tokens import (
    ParsedInstance,
    box_to_bins,
    box_to_loc_tokens,
    box_to_pixel_box,
    format_prompt,
    format_target,
    loc_tokens_to_box,
    mask_to_box,
    masks_to_boxes,
    parse_output,
    pixel_box_to_tokens,
    seg_tokens,
    tokens_to_pixel_box,
)
from .vqvae import MaskVQVAE, VQVAEConfig, VQVAETrainConfig, train_vqvae

__all__ = [
    "CheckpointError", "CodecError", "MaskCodec", "MaskVQVAE", "ParsedInstance", "VQVAEConfig",
    "VQVAETrainConfig", "box_to_bins", "box_to_loc_tokens", "box_to_pixel_box", "format_prompt",
    "format_target", "loc_tokens_to_box", "masks_to_crops", "mask_to_box", "masks_to_boxes", "parse_output", "pixel_box_to_tokens",
    "resize_weights", "seg_tokens", "tokens_to_pixel_box", "train_vqvae",
]
