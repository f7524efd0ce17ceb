"""Masks <-> (box, 16 codes): the box's location bins, the crop's VQ-VAE codes, and back.

Encoding (big_vision's ``refcoco_mask2str``): the object's tight box
``(ymin, xmin, ymax, xmax)`` normalised; its crop resized to 64x64 (antialiased
bilinear, soft values in [0, 1]); the VQ-VAE's 16 codes. Decoding (big_vision's
segmentation evaluator): the pixel box by truncation of the box read from the
location bins (``bin / 1023``); the 64x64 decoder output (in [-1, 1]) resized
bilinearly into it; inside = ``> 0``. The crop policies and every resampling step
are the geometry module's (:mod:`chexanatomy_lib.codec.geometry`); this module adds
the VQ-VAE.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import CodecError
from .geometry import (
    CROP_POLICIES, RESIZE_METHODS, CropPolicy, ResizeMethod, crop_boxes, crop_masks, paste_maps, quantise_boxes,
)
from .tokens import NUM_SEG_TOKENS, box_to_loc_tokens, seg_tokens
from .vqvae import MaskVQVAE


class MaskCodec:
    """One interface over a mask VQ-VAE (ours or the official one).

    crop: ``"tight"`` (the object's box, as big_vision), ``"aligned"`` (the same box
        and location tokens, the crop taken over the pixel box the decoder pastes
        into: see :func:`~chexanatomy_lib.codec.geometry.crop_windows`) or ``"padded"``
        (box grown by ``pad_px`` pixels on each side, clipped to the image: the
        reference implementation's policy, kept for comparison).
    resize: ``"bilinear_aa"`` (soft crops, as big_vision) or ``"nearest"`` (nearest
        neighbour, binary crops: the reference implementation's policy).
    batch_size: masks per internal batch (bounds memory: ``batch * 64 * (H + W)`` floats).
    code_search: 0 (each grid cell's nearest codebook entry, as big_vision), or the number
        of nearest entries per cell among which the decoder picks the one it draws the
        crop best from (:meth:`MaskVQVAE.search_codes`, ``search_passes`` sweeps): a higher
        round trip at about ``32 * code_search`` decoder passes per mask.
    """

    def __init__(self, vqvae: MaskVQVAE, crop: CropPolicy = "tight", resize: ResizeMethod = "bilinear_aa",
                 pad_px: int = 10, batch_size: int = 256, code_search: int = 0, search_passes: int = 2):
        if crop not in CROP_POLICIES:
            raise ValueError(f"crop must be one of {CROP_POLICIES}; got {crop!r}")
        if resize not in RESIZE_METHODS:
            raise ValueError(f"resize must be one of {RESIZE_METHODS}; got {resize!r}")
        self.vqvae = vqvae.eval()
        self.crop = crop
        self.resize = resize
        self.pad_px = int(pad_px)
        self.batch_size = int(batch_size)
        if code_search < 0 or search_passes < 0:
            raise ValueError(f"code_search and search_passes must be >= 0; got {code_search}, {search_passes}")
        self.code_search = int(code_search)
        self.search_passes = int(search_passes)

    @classmethod
    def ours(cls, directory: str | Path, **kw) -> "MaskCodec":
        """Codec over a VQ-VAE saved by :meth:`MaskVQVAE.save` (e.g. chapter 2's ``vqvae/``).

        The crop and resize policies default to those its training crops were made
        with (``training.json``'s ``"crop"`` and ``"resize"``; big_vision's when absent).
        """
        record = MaskVQVAE.training_record(directory)
        kw.setdefault("crop", record.get("crop", "tight"))
        kw.setdefault("resize", record.get("resize", "bilinear_aa"))
        return cls(MaskVQVAE.load(directory), **kw)

    @classmethod
    def official(cls, npz_path: str | Path, **kw) -> "MaskCodec":
        """Codec over big_vision's ``vae-oid.npz`` (user-supplied; big_vision's tight crop by default)."""
        return cls(MaskVQVAE.load_official_npz(npz_path), **kw)

    def to(self, device: str | torch.device) -> "MaskCodec":
        self.vqvae.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.vqvae.device

    def _as_masks(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        m = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks))
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3:
            raise CodecError(f"masks must be bool [N, H, W]; got shape {tuple(m.shape)}")
        return m.to(self.device)

    def encode(self, masks: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Masks bool [N, H, W] (or [H, W]) -> (boxes float32 [N, 4] normalised, codes int64 [N, 16] in range(128)).

        The boxes are the exact crop boxes; quantise them with :func:`box_to_loc_tokens`
        (as :meth:`instance_tokens` does). Raises :class:`CodecError` on an empty mask.
        """
        m = self._as_masks(masks)
        if len(m) == 0:
            return np.zeros((0, 4), np.float32), np.zeros((0, NUM_SEG_TOKENS), np.int64)
        all_boxes = crop_boxes(m, self.crop, self.pad_px)  # raises CodecError naming empty masks
        # NOTE: batches of similar box size keep the crop windows small (same result).
        order = torch.argsort((all_boxes[:, 2] - all_boxes[:, 0]) * (all_boxes[:, 3] - all_boxes[:, 1]))
        codes = torch.zeros((len(m), NUM_SEG_TOKENS), dtype=torch.int64)
        for s in range(0, len(m), self.batch_size):
            sel = order[s:s + self.batch_size]
            crops = crop_masks(m, all_boxes[sel], self.crop, self.resize, index=sel)
            codes[sel.cpu()] = self.vqvae.encode(crops, self.code_search, self.search_passes).cpu()
        return all_boxes.cpu().numpy(), codes.numpy()

    def decode(self, boxes: np.ndarray | torch.Tensor, codes: np.ndarray | torch.Tensor,
               height: int, width: int) -> np.ndarray:
        """(boxes float [N, 4] normalised, codes int [N, 16]) -> masks bool [N, height, width].

        Pixel box by truncation (``int(ymin * height)`` ...); a box that collapses to
        zero rows or columns, or holds a NaN, decodes to an empty mask.
        """
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float64) if not isinstance(boxes, torch.Tensor) else boxes)
        b = b.to(torch.float64).reshape(-1, 4)
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes)
        c = c.reshape(-1, NUM_SEG_TOKENS)
        if len(b) != len(c):
            raise CodecError(f"decode: {len(b)} boxes but {len(c)} code rows")
        return paste_maps(None, b, height, width, lambda sel: self.vqvae.decode(c[sel].to(self.device)),
                          self.batch_size, self.device)

    def roundtrip(self, masks: np.ndarray | torch.Tensor) -> np.ndarray:
        """Masks bool [N, H, W] -> what a perfect token predictor gets back, bool [N, H, W].

        encode -> box quantised to location bins (``round(v*1023)/1023``) -> decode.
        """
        m = self._as_masks(masks)
        boxes, codes = self.encode(m)
        return self.decode(quantise_boxes(boxes), codes, m.shape[1], m.shape[2])

    def instance_tokens(self, box: np.ndarray, codes: np.ndarray) -> str:
        """(box float [4] normalised, codes int [16]) -> ``"<loc×4><seg×16>"``."""
        return box_to_loc_tokens(box) + seg_tokens(np.asarray(codes).astype(np.int64))
