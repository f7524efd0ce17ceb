"""The token codec: the geometry of boxes and masks and every conversion to and from
PaliGemma tokens. It knows masks and tokens only (no CT, no model, no scores).

* :mod:`~chexanatomy_lib.codec.geometry`: tight boxes, location bins, pixel boxes,
  crop windows, resampling weights, crops and pastes;
* :mod:`~chexanatomy_lib.codec.tokens`: ``<loc>``/``<seg>`` text, prompts, targets and
  the output parser;
* :mod:`~chexanatomy_lib.codec.vqvae`, :mod:`~chexanatomy_lib.codec.vqvae_training`:
  the mask VQ-VAE (ours or big_vision's ``vae-oid.npz``) and its training;
* :mod:`~chexanatomy_lib.codec.mask_codec`: :class:`MaskCodec`, masks <-> (box, 16 codes).
"""

from .errors import CheckpointError, CodecError
from .geometry import (
    box_to_bins,
    box_to_pixel_box,
    mask_to_box,
    masks_to_boxes,
    masks_to_crops,
    paste_maps,
    pixel_boxes,
    quantise_boxes,
    resample_masks,
    resample_weights,
)
from .mask_codec import MaskCodec
from .tokens import (
    ParsedInstance,
    box_to_loc_tokens,
    format_prompt,
    format_target,
    loc_tokens_to_box,
    parse_output,
    pixel_box_to_tokens,
    seg_tokens,
    tokens_to_pixel_box,
)
from .vqvae import MaskVQVAE, VQVAEConfig
from .vqvae_training import VQVAETrainConfig, train_vqvae

__all__ = [
    "CheckpointError", "CodecError", "MaskCodec", "MaskVQVAE", "ParsedInstance", "VQVAEConfig",
    "VQVAETrainConfig", "box_to_bins", "box_to_loc_tokens", "box_to_pixel_box", "format_prompt",
    "format_target", "loc_tokens_to_box", "mask_to_box", "masks_to_boxes", "masks_to_crops", "parse_output",
    "paste_maps", "pixel_box_to_tokens", "pixel_boxes", "quantise_boxes", "resample_masks", "resample_weights",
    "seg_tokens", "tokens_to_pixel_box", "train_vqvae",
]
