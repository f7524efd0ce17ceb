"""Masks <-> (box, 16 codes): crop, resize to 64x64, VQ-VAE, and paste back.

Encoding (big_vision's ``refcoco_mask2str``): the object's tight box
``(ymin, xmin, ymax, xmax)`` normalised; the crop
``mask[round(h*ymin):round(h*ymax), round(w*xmin):round(w*xmax)]`` resized to 64x64
(antialiased bilinear, soft values in [0, 1]); the VQ-VAE's 16 codes.

Decoding (big_vision's segmentation evaluator): pixel box
``int(ymin*h), int(xmin*w), int(ymax*h), int(xmax*w)`` (truncation) of the box read
from the location bins (``bin / 1023``); the 64x64 decoder output (in [-1, 1])
resized bilinearly into that box; inside = ``> 0``.

The ``"aligned"`` crop policy (ours) keeps the same box, location tokens and
decoding, but crops the mask over the pixel box the decoder will paste into (the
truncated box of the location bins) instead of the exact box. NOTE: rounding a
pixel edge ``k / h`` to a bin and truncating ``bin / 1023 * h`` gives ``k`` or
``k - 1``, so about half of the decoded edges sit one pixel up or left of the
crop's; a tight crop is then pasted one pixel off, which costs a thin structure
(a rib a few pixels thick) a large part of its Dice. Cropping over the decoded
box puts every pixel back where it came from.

Both resizes are done as batched separable linear maps (one ``[64, H]`` and one
``[64, W]`` weight matrix per mask), so a whole batch of masks with different
boxes is one pair of matrix products, on the CPU or the GPU.
NOTE: the weights are the triangle filter with support scaled by the zoom factor
(PIL's ``BILINEAR`` resize and ``torch.nn.functional.interpolate(...,
antialias=True)``, which TensorFlow's ``antialias=True`` bilinear resize also uses);
``tests/test_codec_mask.py`` checks them against ``interpolate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch

from .errors import CodecError
from .tokens import box_to_loc_tokens, seg_tokens
from .vqvae import MASK_SIZE, MaskVQVAE

CropPolicy = Literal["tight", "padded", "aligned"]
CROP_POLICIES = ("tight", "padded", "aligned")


def quantise_boxes(boxes: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Normalised boxes float [N, 4] -> the boxes their location tokens decode to, float64 [N, 4].

    ``clip(round(v * 1023), 0, 1023) / 1023`` (half to even, as NumPy and the token writer).
    """
    b = torch.as_tensor(np.asarray(boxes) if not isinstance(boxes, torch.Tensor) else boxes)
    return torch.clamp(torch.round(b.to(torch.float64) * 1023), 0, 1023) / 1023


def pixel_boxes(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, ...]:
    """Normalised boxes float64 [N, 4] -> big_vision's pixel box by truncation.

    Returns ``(y0, x0, y1, x1, ok)``: int64 [N] each (``floor(v * size)`` of the box
    clipped to [0, 1]) and bool [N], False where the box holds a NaN or collapses
    (``y1 <= y0`` or ``x1 <= x0``).
    """
    b = boxes.to(torch.float64).reshape(-1, 4)
    finite = torch.isfinite(b).all(1)
    bb = torch.where(finite[:, None], b, torch.zeros_like(b)).clamp(0.0, 1.0)
    y0 = torch.floor(bb[:, 0] * height).long()
    x0 = torch.floor(bb[:, 1] * width).long()
    y1 = torch.floor(bb[:, 2] * height).long()
    x1 = torch.floor(bb[:, 3] * width).long()
    return y0, x0, y1, x1, finite & (y1 > y0) & (x1 > x0)


ResizePolicy = Literal["bilinear_aa", "nearest"]


def resize_weights(starts: torch.Tensor, stops: torch.Tensor, full: int, out: int,
                   method: str = "bilinear_aa") -> torch.Tensor:
    """Weights that resize the span ``[start, stop)`` of a length-``full`` axis to ``out`` samples.

    starts, stops: int64 [N] with ``0 <= start < stop <= full``.
    Returns float32 [N, out, full]; row ``i`` holds the (normalised) weights of output
    sample ``i`` over the input samples; columns outside the span are zero.
    ``method``: ``"bilinear_aa"`` (triangle filter, support scaled when shrinking) or
    ``"nearest"`` (half-pixel centres, ``floor((i + 0.5) * scale)``).
    """
    device = starts.device
    length = (stops - starts).to(torch.float32)  # [N]
    scale = length / out  # input samples per output sample
    i = torch.arange(out, device=device, dtype=torch.float32)
    j = torch.arange(full, device=device, dtype=torch.float32)
    centre = (i[None, :] + 0.5) * scale[:, None]  # [N, out], in span coordinates
    pos = j[None, None, :] + 0.5 - starts[:, None, None].to(torch.float32)  # [N, 1, full]
    inside = (j[None, None, :] >= starts[:, None, None]) & (j[None, None, :] < stops[:, None, None])
    if method == "bilinear_aa":
        support = torch.clamp(scale, min=1.0)[:, None, None]
        w = torch.clamp(1.0 - (pos - centre[:, :, None]).abs() / support, min=0.0) * inside
        total = w.sum(-1, keepdim=True)
        return w / torch.where(total > 0, total, torch.ones_like(total))
    if method == "nearest":
        src = torch.minimum(torch.floor(centre), length[:, None] - 1) + starts[:, None].to(torch.float32)
        return (j[None, None, :] == src[:, :, None]).to(torch.float32)
    raise ValueError(f"unknown resize method {method!r}; use 'bilinear_aa' or 'nearest'")


def masks_to_crops(masks: np.ndarray | torch.Tensor, crop: CropPolicy = "tight", resize: ResizePolicy = "bilinear_aa",
                   pad_px: int = 10, batch_size: int = 256, device: str | torch.device = "cpu",
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The VQ-VAE's inputs without a VQ-VAE: masks bool [N, H, W] (non-empty) ->
    (boxes float32 [N, 4] normalised, crops float32 [N, 64, 64] in [0, 1]).

    Same crop and resize as :meth:`MaskCodec.encode`; used to build training data.
    """
    codec = MaskCodec(_NoModel(device), crop=crop, resize=resize, pad_px=pad_px, batch_size=batch_size)
    m = codec._as_masks(masks)
    boxes, crops = [], []
    for s in range(0, len(m), batch_size):
        b = codec.boxes_of(m[s:s + batch_size])
        crops.append(codec.crops_64(m[s:s + batch_size], b).cpu())
        boxes.append(b.cpu())
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
    return torch.cat(boxes).numpy(), torch.cat(crops).numpy()


class _NoModel:
    """Stands in for a VQ-VAE where only crops are needed."""

    def __init__(self, device: str | torch.device):
        self.device = torch.device(device)

    def eval(self) -> "_NoModel":
        return self


class MaskCodec:
    """One interface over a mask VQ-VAE (ours or the official one).

    crop: ``"tight"`` (the object's box, as big_vision), ``"aligned"`` (the same box
        and location tokens, the crop taken over the pixel box the decoder pastes
        into: see the module docstring) or ``"padded"`` (box grown by ``pad_px``
        pixels on each side, clipped to the image: the reference implementation's
        policy, kept for comparison).
    resize: ``"bilinear_aa"`` (soft crops, as big_vision) or ``"nearest"`` (nearest
        neighbour, binary crops: the reference implementation's policy).
    batch_size: masks per internal batch (bounds memory: ``batch * 64 * (H + W)`` floats).
    """

    def __init__(self, vqvae: MaskVQVAE, crop: CropPolicy = "tight", resize: ResizePolicy = "bilinear_aa",
                 pad_px: int = 10, batch_size: int = 256):
        if crop not in CROP_POLICIES:
            raise ValueError(f"crop must be one of {CROP_POLICIES}; got {crop!r}")
        if resize not in ("bilinear_aa", "nearest"):
            raise ValueError(f"resize must be 'bilinear_aa' or 'nearest'; got {resize!r}")
        self.vqvae = vqvae.eval()
        self.crop = crop
        self.resize = resize
        self.pad_px = int(pad_px)
        self.batch_size = int(batch_size)

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

    # ------------------------------------------------------------------ helpers
    def _as_masks(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        m = masks if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks))
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3:
            raise CodecError(f"masks must be bool [N, H, W]; got shape {tuple(m.shape)}")
        return m.to(self.device)

    def boxes_of(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Boxes used for encoding: float32 [N, 4] normalised ``(ymin, xmin, ymax, xmax)``.

        Tight pixel-edge boxes (padded by ``pad_px`` when ``crop="padded"``).
        Raises :class:`CodecError` naming the empty masks.
        """
        m = self._as_masks(masks).bool()
        n, h, w = m.shape
        rows, cols = m.any(2), m.any(1)  # [N, H], [N, W]
        empty = ~rows.any(1)
        if bool(empty.any()):
            bad = torch.nonzero(empty).flatten().tolist()
            raise CodecError(f"cannot encode empty mask(s) at index {bad[:10]}{'...' if len(bad) > 10 else ''}: "
                             "an empty mask has no box (skip absent structures before encoding)")
        ar_h = torch.arange(h, device=m.device)
        ar_w = torch.arange(w, device=m.device)
        y0 = torch.where(rows, ar_h, h).min(1).values
        y1 = torch.where(rows, ar_h, -1).max(1).values + 1
        x0 = torch.where(cols, ar_w, w).min(1).values
        x1 = torch.where(cols, ar_w, -1).max(1).values + 1
        if self.crop == "padded":
            p = self.pad_px
            y0, x0 = (y0 - p).clamp(min=0), (x0 - p).clamp(min=0)
            y1, x1 = (y1 + p).clamp(max=h), (x1 + p).clamp(max=w)
        return torch.stack([y0 / h, x0 / w, y1 / h, x1 / w], 1).to(torch.float32)

    def crops_64(self, masks: np.ndarray | torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Masks bool [N, H, W] -> the 64x64 VQ-VAE inputs float32 [N, 64, 64] in [0, 1].

        ``boxes`` (normalised float [N, 4]) default to :meth:`boxes_of`; the crop is
        ``mask[round(h*ymin):round(h*ymax), round(w*xmin):round(w*xmax)]``, or with
        ``crop="aligned"`` the pixel box that the boxes' location bins decode to
        (:func:`quantise_boxes`, :func:`pixel_boxes`; the rounded box where that collapses).
        """
        m = self._as_masks(masks)
        n, h, w = m.shape
        b = self.boxes_of(m) if boxes is None else torch.as_tensor(boxes, device=m.device, dtype=torch.float32)
        y0, x0, y1, x1 = self.crop_windows(b, h, w)
        # Work on the window of the largest box of the batch, not the whole image.
        hb = int((y1 - y0).max()) if n else 1
        wb = int((x1 - x0).max()) if n else 1
        rows = (y0[:, None] + torch.arange(hb, device=m.device)).clamp(max=h - 1)  # [N, hb]
        cols = (x0[:, None] + torch.arange(wb, device=m.device)).clamp(max=w - 1)  # [N, wb]
        win = m[torch.arange(n, device=m.device)[:, None], rows]  # [N, hb, W]
        win = torch.gather(win, 2, cols[:, None, :].expand(n, hb, wb)).to(torch.float32)  # [N, hb, wb]
        zero = torch.zeros_like(y0)
        ry = resize_weights(zero, y1 - y0, hb, MASK_SIZE, self.resize)  # [N, 64, hb]
        rx = resize_weights(zero, x1 - x0, wb, MASK_SIZE, self.resize)  # [N, 64, wb]
        crops = torch.bmm(torch.bmm(ry, win), rx.transpose(1, 2))
        return crops.clamp_(0.0, 1.0)

    def crop_windows(self, boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, ...]:
        """Pixel windows ``(y0, x0, y1, x1)`` int64 [N] each, non-empty, of the crops of ``boxes``
        (normalised float [N, 4]) in a ``height x width`` image, under this codec's crop policy."""
        b = boxes.double()
        # NOTE: the box is stored in float32; h * ymin is an exact integer for pixel-edge
        # boxes up to a rounding error far below 0.5, so torch.round recovers the edge.
        y0 = torch.round(b[:, 0] * height).long()
        x0 = torch.round(b[:, 1] * width).long()
        y1 = torch.maximum(torch.round(b[:, 2] * height).long(), y0 + 1)
        x1 = torch.maximum(torch.round(b[:, 3] * width).long(), x0 + 1)
        if self.crop == "aligned":
            dy0, dx0, dy1, dx1, ok = pixel_boxes(quantise_boxes(b), height, width)
            y0, x0 = torch.where(ok, dy0, y0), torch.where(ok, dx0, x0)
            y1, x1 = torch.where(ok, dy1, y1), torch.where(ok, dx1, x1)
        return y0, x0, y1, x1

    # ------------------------------------------------------------------ public API
    def encode(self, masks: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Masks bool [N, H, W] (or [H, W]) -> (boxes float32 [N, 4] normalised, codes int64 [N, 16] in range(128)).

        The boxes are the exact crop boxes; quantise them with :func:`box_to_loc_tokens`
        (as :meth:`instance_tokens` does). Raises :class:`CodecError` on an empty mask.
        """
        m = self._as_masks(masks)
        empty = ~m.reshape(len(m), -1).any(1)
        if bool(empty.any()):
            bad = torch.nonzero(empty).flatten().tolist()
            raise CodecError(f"cannot encode empty mask(s) at index {bad[:10]}{'...' if len(bad) > 10 else ''}: "
                             "an empty mask has no box (skip absent structures before encoding)")
        if len(m) == 0:
            return np.zeros((0, 4), np.float32), np.zeros((0, 16), np.int64)
        all_boxes = torch.cat([self.boxes_of(m[s:s + self.batch_size]) for s in range(0, len(m), self.batch_size)])
        # NOTE: batches of similar box size keep the crop windows small (same result).
        order = torch.argsort((all_boxes[:, 2] - all_boxes[:, 0]) * (all_boxes[:, 3] - all_boxes[:, 1]))
        codes = torch.zeros((len(m), 16), dtype=torch.int64)
        for s in range(0, len(m), self.batch_size):
            sel = order[s:s + self.batch_size]
            codes[sel.cpu()] = self.vqvae.encode(self.crops_64(m[sel], all_boxes[sel])).cpu()
        return all_boxes.cpu().numpy(), codes.numpy()

    def decode(self, boxes: np.ndarray | torch.Tensor, codes: np.ndarray | torch.Tensor,
               height: int, width: int) -> np.ndarray:
        """(boxes float [N, 4] normalised, codes int [N, 16]) -> masks bool [N, height, width].

        Pixel box by truncation (``int(ymin * height)`` ...); a box that collapses to
        zero rows or columns, or holds a NaN, decodes to an empty mask.
        """
        b = torch.as_tensor(np.asarray(boxes, dtype=np.float64) if not isinstance(boxes, torch.Tensor) else boxes)
        b = b.to(torch.float64).reshape(-1, 4)
        c = torch.as_tensor(np.asarray(codes) if not isinstance(codes, torch.Tensor) else codes).reshape(-1, 16)
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
        return self.decode(quantise_boxes(boxes).numpy(), codes, m.shape[1], m.shape[2])

    def instance_tokens(self, box: np.ndarray, codes: np.ndarray) -> str:
        """(box float [4] normalised, codes int [16]) -> ``"<loc×4><seg×16>"``."""
        return box_to_loc_tokens(box) + seg_tokens(np.asarray(codes).astype(np.int64))


def paste_maps(maps: np.ndarray | torch.Tensor | None, boxes: np.ndarray | torch.Tensor, height: int, width: int,
               produce=None, batch_size: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """Paste 64x64 maps into their boxes: -> bool [N, height, width], inside = ``map > 0``.

    maps: float [N, 64, 64] (decoder output in [-1, 1], or any map thresholded at 0);
    boxes: float [N, 4] normalised. ``produce(indices) -> [n, 64, 64]`` may replace
    ``maps`` to compute them lazily for the boxes that survive truncation.
    Pixel box by truncation (``int(ymin * height)`` ...); a box that collapses to
    zero rows or columns, or holds a NaN, gives an empty mask.
    """
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64) if not isinstance(boxes, torch.Tensor) else boxes)
    b = b.to(torch.float64).reshape(-1, 4)
    out = torch.zeros((len(b), height, width), dtype=torch.bool)
    y0, x0, y1, x1, ok = pixel_boxes(b, height, width)
    idx = torch.nonzero(ok).flatten()
    # NOTE: each mask is pasted into the window of its own box (not the whole image):
    # batches of similar box size keep the windows small; the result is the same.
    idx = idx[torch.argsort(((y1 - y0) * (x1 - x0))[idx], stable=True)]
    dev = torch.device(device)
    for s in range(0, len(idx), batch_size):
        sel = idx[s:s + batch_size]
        if produce is not None:
            m64 = produce(sel).to(dev, torch.float32)
        else:
            m64 = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps)[sel]
            m64 = m64.to(dev, torch.float32)
        ys, ye, xs, xe = (t[sel].to(dev) for t in (y0, y1, x0, x1))
        hb, wb = int((ye - ys).max()), int((xe - xs).max())
        zero = torch.zeros_like(ys)
        # Pasting resizes 64 samples onto the box span (PIL BILINEAR, as big_vision).
        py = _paste_weights(zero, ye - ys, hb)  # [n, hb, 64]
        px = _paste_weights(zero, xe - xs, wb)  # [n, wb, 64]
        win = torch.bmm(torch.bmm(py, m64), px.transpose(1, 2)) > 0  # [n, hb, wb]; zero outside the box
        win = win.cpu()
        for k, i in enumerate(sel.tolist()):
            h_i, w_i = int(ye[k] - ys[k]), int(xe[k] - xs[k])
            out[i, int(ys[k]):int(ye[k]), int(xs[k]):int(xe[k])] = win[k, :h_i, :w_i]
    return out.numpy()


def _paste_weights(starts: torch.Tensor, stops: torch.Tensor, full: int) -> torch.Tensor:
    """Weights float32 [N, full, 64] resizing 64 samples onto the span ``[start, stop)``; zero elsewhere."""
    length = (stops - starts).to(torch.float32)
    scale = MASK_SIZE / length  # source samples per output sample
    r = torch.arange(full, device=starts.device, dtype=torch.float32)
    centre = (r[None, :] - starts[:, None].to(torch.float32) + 0.5) * scale[:, None]  # [N, full]
    k = torch.arange(MASK_SIZE, device=starts.device, dtype=torch.float32)
    support = torch.clamp(scale, min=1.0)[:, None, None]
    w = torch.clamp(1.0 - (k[None, None, :] + 0.5 - centre[:, :, None]).abs() / support, min=0.0)
    w = w * _span_mask(starts, stops, full)[:, :, None]
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def _span_mask(starts: torch.Tensor, stops: torch.Tensor, full: int) -> torch.Tensor:
    r = torch.arange(full, device=starts.device)
    return (r[None, :] >= starts[:, None]) & (r[None, :] < stops[:, None])
