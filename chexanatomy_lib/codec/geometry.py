"""The geometry of boxes and masks: every conversion between masks, boxes, location
bins, pixel boxes and 64x64 crops, in one place.

Conventions (big_vision's PaliGemma segmentation format where it has one):

* *box*: ``(ymin, xmin, ymax, xmax)`` normalised to [0, 1] on pixel edges: rows
  ``r0..r1`` of an ``H``-row image give ``ymin = r0 / H`` and ``ymax = (r1 + 1) / H``,
  so a one-pixel object has a one-pixel box (:func:`masks_to_boxes`).
* *location bin*: ``round(v * 1023)`` clipped to ``0..1023`` (half to even, as
  ``tf.round``); a bin decodes to ``bin / 1023`` (:func:`box_to_bins`,
  :func:`quantise_boxes`).
* *pixel box*: big_vision's evaluator truncates, ``int(v * size)``, with ``y1`` and
  ``x1`` exclusive; it may collapse (``y1 <= y0``), which makes the instance invalid
  (:func:`pixel_boxes`).
* *crop*: the pixels of a mask that are resampled to the 64x64 grid the mask VQ-VAE
  reads, under a crop policy (:data:`CROP_POLICIES`, :func:`crop_windows`,
  :func:`crop_masks`); *paste*: a 64x64 map resampled into its pixel box
  (:func:`paste_maps`).
* *resampling*: a triangle filter whose support grows with the zoom factor when
  shrinking (PIL's ``BILINEAR`` and ``torch.nn.functional.interpolate(...,
  antialias=True)``, which TensorFlow's antialiased bilinear resize also uses), as
  one ``[dst, src]`` weight matrix per row of a batch (:func:`resample_weights`), so
  a batch of masks with different boxes is one pair of matrix products on the CPU
  or the GPU.

Functions take NumPy arrays or torch tensors and return the kind they were given
(torch is the one implementation underneath).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .errors import CodecError

NUM_LOC_BINS = 1024  # <loc0000> .. <loc1023>
MASK_SIZE = 64  # side of the crop the mask VQ-VAE encodes
CropPolicy = Literal["tight", "padded", "aligned"]
CROP_POLICIES = ("tight", "padded", "aligned")
ResizeMethod = Literal["bilinear_aa", "nearest"]
RESIZE_METHODS = ("bilinear_aa", "nearest")


def _tensor(x) -> tuple[torch.Tensor, bool]:
    """(tensor, whether ``x`` was not a tensor) without copying NumPy data."""
    if isinstance(x, torch.Tensor):
        return x, False
    return torch.from_numpy(np.ascontiguousarray(x)), True


# --------------------------------------------------------------------------- boxes
def pixel_edges(masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Tight pixel edges of masks bool [..., H, W]: ``(y0, x0, y1, x1, present)``.

    ``y0, x0, y1, x1``: int64 [...] (``y1``, ``x1`` exclusive; ``(H, W, 0, 0)`` for an
    empty mask); ``present``: bool [...], False for an empty mask.
    """
    m = masks.bool()
    h, w = m.shape[-2:]
    # NOTE: a max over the bytes of a bool tensor is 3-4x faster on the CPU than
    # torch's bool any() (the reductions over whole masks are most of encoding's time)
    u = m.view(torch.uint8)
    rows, cols = u.amax(-1) > 0, u.amax(-2) > 0
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    y0 = torch.where(rows, ar_h, h).amin(-1)
    y1 = torch.where(rows, ar_h, -1).amax(-1) + 1
    x0 = torch.where(cols, ar_w, w).amin(-1)
    x1 = torch.where(cols, ar_w, -1).amax(-1) + 1
    return y0, x0, y1, x1, rows.any(-1)


def masks_to_boxes(masks):
    """Tight boxes of masks bool [..., H, W] -> float64 [..., 4] normalised ``(ymin, xmin, ymax, xmax)``.

    Pixel-edge convention (see the module docstring); NaN rows for empty masks.
    NumPy in, NumPy out; a tensor in, a tensor (on its device) out.
    """
    m, numpy_in = _tensor(masks)
    if m.ndim < 2:
        raise ValueError(f"masks must be [..., H, W]; got shape {tuple(m.shape)}")
    h, w = m.shape[-2:]
    y0, x0, y1, x1, present = pixel_edges(m)
    boxes = torch.stack([y0.double() / h, x0.double() / w, y1.double() / h, x1.double() / w], -1)
    boxes[~present] = float("nan")
    return boxes.numpy() if numpy_in else boxes


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """Tight box of one mask bool [H, W] -> float64 [4] (see :func:`masks_to_boxes`).

    Raises ``ValueError`` on an empty mask.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W]; got shape {m.shape}")
    box = masks_to_boxes(m)
    if np.isnan(box).any():
        raise ValueError("mask is empty: an empty mask has no box")
    return box


def _bin_values(boxes: torch.Tensor) -> torch.Tensor:
    # NOTE: torch.round, like np.round and tf.round, rounds half to even.
    return torch.clamp(torch.round(boxes.double() * (NUM_LOC_BINS - 1)), 0, NUM_LOC_BINS - 1)


def box_to_bins(boxes):
    """Normalised boxes float [..., 4] -> location bins int64 [..., 4] in range(1024).

    ``round(v * 1023)`` clipped to 0..1023: values outside [0, 1] go to the end bins.
    Raises ``ValueError`` on a non-finite value (a NaN box has no bins).
    """
    b, numpy_in = _tensor(boxes)
    if b.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape [..., 4] (ymin, xmin, ymax, xmax); got {tuple(b.shape)}")
    if not bool(torch.isfinite(b).all()):
        raise ValueError(f"box has non-finite values: {b.tolist()}")
    bins = _bin_values(b).long()
    return bins.numpy() if numpy_in else bins


def bins_to_boxes(bins):
    """Location bins int [..., 4] in range(1024) -> normalised boxes float64 [..., 4] (``bin / 1023``)."""
    b, numpy_in = _tensor(bins)
    boxes = b.double() / (NUM_LOC_BINS - 1)
    return boxes.numpy() if numpy_in else boxes


def quantise_boxes(boxes):
    """Normalised boxes float [..., 4] -> the boxes their location tokens decode to, float64 [..., 4].

    ``clip(round(v * 1023), 0, 1023) / 1023``; NaN stays NaN.
    """
    b, numpy_in = _tensor(boxes)
    q = bins_to_boxes(_bin_values(b))
    return q.numpy() if numpy_in else q


def pixel_boxes(boxes, height: int, width: int) -> tuple:
    """Normalised boxes float [..., 4] -> big_vision's pixel boxes by truncation.

    Returns ``(y0, x0, y1, x1, ok)``: int64 [...] each, ``floor(v * size)`` of the box
    clipped to [0, 1] and computed in the boxes' own float precision (float32 boxes
    are multiplied in float32, as ``int(box[0] * h)`` of a float32 box is), and bool
    [...], False where the box holds a NaN or collapses (``y1 <= y0`` or ``x1 <= x0``).
    """
    b, numpy_in = _tensor(boxes)
    if not b.is_floating_point():
        b = b.double()
    finite = torch.isfinite(b).all(-1)
    bb = torch.where(finite[..., None], b, torch.zeros_like(b)).clamp(0.0, 1.0)
    y0 = torch.floor(bb[..., 0] * height).long()
    x0 = torch.floor(bb[..., 1] * width).long()
    y1 = torch.floor(bb[..., 2] * height).long()
    x1 = torch.floor(bb[..., 3] * width).long()
    out = (y0, x0, y1, x1, finite & (y1 > y0) & (x1 > x0))
    return tuple(t.numpy() for t in out) if numpy_in else out


def box_to_pixel_box(box, height: int, width: int) -> tuple[int, int, int, int]:
    """One normalised box float [4] -> pixel box ``(y0, x0, y1, x1)`` as ints (see :func:`pixel_boxes`).

    The result may collapse (``y1 <= y0``), which callers must treat as invalid.
    Raises ``ValueError`` on a wrong shape or a non-finite value.
    """
    b = box if isinstance(box, torch.Tensor) else np.asarray(box)
    if tuple(b.shape) != (4,):
        raise ValueError(f"box must have shape [4] (ymin, xmin, ymax, xmax); got {tuple(b.shape)}")
    if not np.all(np.isfinite(np.asarray(b, dtype=np.float64))):
        raise ValueError(f"box has non-finite values: {list(np.asarray(b, dtype=np.float64))}")
    y0, x0, y1, x1, _ = pixel_boxes(b, height, width)
    return int(y0), int(x0), int(y1), int(x1)


# --------------------------------------------------------------------------- crops
def require_present(present: torch.Tensor) -> None:
    """Raise :class:`CodecError` naming the empty masks, given ``present`` bool [N] (one flag per mask)."""
    if not bool(present.all()):
        bad = torch.nonzero(~present).flatten().tolist()
        raise CodecError(f"cannot encode empty mask(s) at index {bad[:10]}{'...' if len(bad) > 10 else ''}: "
                         "an empty mask has no box (skip absent structures before encoding)")


def crop_boxes(masks: torch.Tensor, crop: CropPolicy = "tight", pad_px: int = 10) -> torch.Tensor:
    """The box each mask is encoded with: masks bool [N, H, W] -> float32 [N, 4] normalised.

    The tight pixel-edge box (grown by ``pad_px`` pixels on each side and clipped to
    the image when ``crop="padded"``). Raises :class:`CodecError` naming the empty masks.
    """
    m = masks.bool()
    h, w = m.shape[-2:]
    y0, x0, y1, x1, present = pixel_edges(m)
    require_present(present)
    if crop == "padded":
        y0, x0 = (y0 - pad_px).clamp(min=0), (x0 - pad_px).clamp(min=0)
        y1, x1 = (y1 + pad_px).clamp(max=h), (x1 + pad_px).clamp(max=w)
    return torch.stack([y0.double() / h, x0.double() / w, y1.double() / h, x1.double() / w], 1).to(torch.float32)


def crop_windows(boxes: torch.Tensor, height: int, width: int, crop: CropPolicy = "tight") -> tuple[torch.Tensor, ...]:
    """Pixel windows ``(y0, x0, y1, x1)`` int64 [N] each, non-empty, that the crops of ``boxes``
    (normalised float [N, 4]) cover in a ``height x width`` image.

    ``"tight"`` and ``"padded"``: ``round(size * v)`` of the box itself (big_vision's
    ``mask[round(h*ymin):round(h*ymax), ...]``). ``"aligned"``: the pixel box the
    boxes' location bins decode to (:func:`quantise_boxes`, :func:`pixel_boxes`), the
    rounded box where that collapses. NOTE: rounding a pixel edge ``k / h`` to a bin
    and truncating ``bin / 1023 * h`` gives ``k`` or ``k - 1``, so about half of the
    decoded edges sit one pixel up or left of a tight crop's; a thin structure (a rib
    a few pixels thick) pasted one pixel off loses a large part of its Dice, and
    cropping over the decoded box puts every pixel back where it came from.
    """
    b = boxes.double()
    # NOTE: the box is stored in float32; h * ymin is an exact integer for pixel-edge
    # boxes up to a rounding error far below 0.5, so torch.round recovers the edge.
    y0 = torch.round(b[:, 0] * height).long()
    x0 = torch.round(b[:, 1] * width).long()
    y1 = torch.maximum(torch.round(b[:, 2] * height).long(), y0 + 1)
    x1 = torch.maximum(torch.round(b[:, 3] * width).long(), x0 + 1)
    if crop == "aligned":
        dy0, dx0, dy1, dx1, ok = pixel_boxes(quantise_boxes(b), height, width)
        y0, x0 = torch.where(ok, dy0, y0), torch.where(ok, dx0, x0)
        y1, x1 = torch.where(ok, dy1, y1), torch.where(ok, dx1, x1)
    return y0, x0, y1, x1


def resample_weights(src_start: torch.Tensor, src_stop: torch.Tensor, src_size: int,
                     dst_start: torch.Tensor, dst_stop: torch.Tensor, dst_size: int,
                     method: ResizeMethod = "bilinear_aa") -> torch.Tensor:
    """Weights that resample the span ``[src_start, src_stop)`` of a length-``src_size`` axis
    onto the span ``[dst_start, dst_stop)`` of a length-``dst_size`` axis.

    Starts and stops: int64 [N] (or broadcastable), spans non-empty and inside their axes.
    Returns float32 [N, dst_size, src_size]: row ``d`` holds the normalised weights of
    destination sample ``d`` over the source samples; rows outside the destination span
    and columns outside the source span are zero. ``method``: ``"bilinear_aa"``
    (triangle filter, support scaled when shrinking) or ``"nearest"`` (half-pixel
    centres, ``floor((d + 0.5) * scale)``).
    Cropping is a source span onto all 64 samples; pasting is all 64 samples onto a
    destination span.
    """
    device = src_start.device if isinstance(src_start, torch.Tensor) else dst_start.device
    src_start, src_stop, dst_start, dst_stop = (torch.as_tensor(t, device=device).long()
                                                for t in (src_start, src_stop, dst_start, dst_stop))
    src_start, src_stop, dst_start, dst_stop = torch.broadcast_tensors(src_start, src_stop, dst_start, dst_stop)
    src_len = (src_stop - src_start).to(torch.float32)
    dst_len = (dst_stop - dst_start).to(torch.float32)
    scale = src_len / dst_len  # source samples per destination sample, [N]
    d = torch.arange(dst_size, device=device, dtype=torch.float32)
    s = torch.arange(src_size, device=device, dtype=torch.float32)
    src_inside = (s[None, :] >= src_start[:, None]) & (s[None, :] < src_stop[:, None])  # [N, src]
    dst_inside = (d[None, :] >= dst_start[:, None]) & (d[None, :] < dst_stop[:, None])  # [N, dst]
    # centre of each destination sample, in source samples from the source span's start
    centre = (d[None, :] - dst_start[:, None].to(torch.float32) + 0.5) * scale[:, None]  # [N, dst]
    if method == "bilinear_aa":
        enlarging = scale <= 1.0
        if bool(enlarging.all()):
            return _two_tap_weights(centre, src_start, src_len.long(), dst_inside, src_size)
        if not bool(enlarging.any()):
            return _triangle_weights(centre, scale, src_start, src_inside, dst_inside, s)
        # NOTE: rows that enlarge (support 1) take the two-tap form, the others the general one
        out = torch.empty((len(scale), dst_size, src_size), dtype=torch.float32, device=device)
        up = enlarging
        out[up] = _two_tap_weights(centre[up], src_start[up], src_len[up].long(), dst_inside[up], src_size)
        out[~up] = _triangle_weights(centre[~up], scale[~up], src_start[~up], src_inside[~up], dst_inside[~up], s)
        return out
    if method == "nearest":
        src = torch.minimum(torch.floor(centre), src_len[:, None] - 1) + src_start[:, None].to(torch.float32)
        return ((s[None, None, :] == src[:, :, None]) & dst_inside[:, :, None]).to(torch.float32)
    raise ValueError(f"unknown resize method {method!r}; use one of {RESIZE_METHODS}")


def _triangle_weights(centre: torch.Tensor, scale: torch.Tensor, src_start: torch.Tensor, src_inside: torch.Tensor,
                      dst_inside: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """:func:`resample_weights`' triangle filter, support ``max(scale, 1)``, as one
    ``[N, dst, src]`` array (``s``: the source sample indices, float [src])."""
    pos = s[None, None, :] + 0.5 - src_start[:, None, None].to(torch.float32)  # [N, 1, src]
    support = torch.clamp(scale, min=1.0)[:, None, None]
    w = torch.clamp(1.0 - (pos - centre[:, :, None]).abs() / support, min=0.0)
    w = w * src_inside[:, None, :] * dst_inside[:, :, None]
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def _two_tap_weights(centre: torch.Tensor, src_start: torch.Tensor, src_len: torch.Tensor,
                     dst_inside: torch.Tensor, src_size: int) -> torch.Tensor:
    """:func:`resample_weights`' triangle filter when no row shrinks (support 1): each
    destination sample weighs the two source samples either side of its centre
    (``centre`` float [N, dst], in source samples from the span's start), renormalised
    where one of them lies outside the span. The same weights as the general formula
    (``tests/test_codec_mask.py``) without its ``[N, dst, src]`` arithmetic: pasting
    64x64 maps into boxes larger than 64 pixels, the decoder's common case, is two
    scatters instead of a dozen passes over that array."""
    c = centre - 0.5
    i0 = torch.floor(c)
    f = c - i0
    i0 = i0.long()
    length = src_len[:, None]
    w0 = torch.where(i0 >= 0, 1.0 - f, torch.zeros_like(f))
    w1 = torch.where(i0 + 1 < length, f, torch.zeros_like(f))
    total = w0 + w1
    total = torch.where(total > 0, total, torch.ones_like(total))
    keep = dst_inside.to(torch.float32)
    start = src_start[:, None]
    out = torch.zeros((*centre.shape, src_size), dtype=torch.float32, device=centre.device)
    out.scatter_add_(2, (start + i0.clamp(0, None).minimum(length - 1))[..., None], (w0 / total * keep)[..., None])
    out.scatter_add_(2, (start + (i0 + 1).clamp(0, None).minimum(length - 1))[..., None],
                     (w1 / total * keep)[..., None])
    return out


def crop_masks(masks: torch.Tensor, boxes: torch.Tensor, crop: CropPolicy = "tight",
               resize: ResizeMethod = "bilinear_aa", index: torch.Tensor | None = None) -> torch.Tensor:
    """Masks bool [N, H, W] and their encoding boxes (normalised float [N, 4]) -> the 64x64
    VQ-VAE inputs float32 [N, 64, 64] in [0, 1], on the masks' device.

    Each mask's window (:func:`crop_windows`) is resampled to 64x64; the work is done
    on the window of the batch's largest box, not on the whole image. ``index`` (int64
    [n]): crop only these masks (``boxes`` then holds their n boxes), without copying
    them out first.
    """
    _, h, w = masks.shape
    rows_of = torch.arange(len(masks), device=masks.device) if index is None else index.to(masks.device)
    n = len(rows_of)
    b = torch.as_tensor(boxes, device=masks.device, dtype=torch.float32)
    y0, x0, y1, x1 = crop_windows(b, h, w, crop)
    hb = int((y1 - y0).max()) if n else 1
    wb = int((x1 - x0).max()) if n else 1
    rows = (y0[:, None] + torch.arange(hb, device=masks.device)).clamp(max=h - 1)  # [N, hb]
    cols = (x0[:, None] + torch.arange(wb, device=masks.device)).clamp(max=w - 1)  # [N, wb]
    win = masks[rows_of[:, None], rows]  # [N, hb, W]
    win = torch.gather(win, 2, cols[:, None, :].expand(n, hb, wb)).to(torch.float32)  # [N, hb, wb]
    zero = torch.zeros_like(y0)
    full = torch.full_like(y0, MASK_SIZE)
    ry = resample_weights(zero, y1 - y0, hb, zero, full, MASK_SIZE, resize)  # [N, 64, hb]
    rx = resample_weights(zero, x1 - x0, wb, zero, full, MASK_SIZE, resize)  # [N, 64, wb]
    crops = torch.bmm(torch.bmm(ry, win), rx.transpose(1, 2))
    return crops.clamp_(0.0, 1.0)


def masks_to_crops(masks, crop: CropPolicy = "tight", resize: ResizeMethod = "bilinear_aa", pad_px: int = 10,
                   batch_size: int = 256, device: str | torch.device = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Masks bool [N, H, W] (non-empty) -> (boxes float32 [N, 4] normalised, crops float32 [N, 64, 64] in [0, 1]).

    What the mask VQ-VAE reads (the codec encodes exactly these), in batches of
    ``batch_size`` on ``device``. Raises :class:`CodecError` on an empty mask.
    """
    m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks).to(device)
    if m.ndim != 3:
        raise CodecError(f"masks must be bool [N, H, W]; got shape {tuple(m.shape)}")
    boxes, crops = [], []
    for s in range(0, len(m), batch_size):
        b = crop_boxes(m[s:s + batch_size], crop, pad_px)
        crops.append(crop_masks(m[s:s + batch_size], b, crop, resize).cpu())
        boxes.append(b.cpu())
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
    return torch.cat(boxes).numpy(), torch.cat(crops).numpy()


# --------------------------------------------------------------------------- paste
def paste_maps(maps, boxes, height: int, width: int, produce=None, batch_size: int = 256,
               device: str | torch.device = "cpu") -> np.ndarray:
    """Paste 64x64 maps into their boxes: -> bool [N, height, width], inside = ``map > 0``.

    maps: float [N, 64, 64] (decoder output in [-1, 1], or any map thresholded at 0);
    boxes: float [N, 4] normalised. ``produce(indices) -> [n, 64, 64]`` may replace
    ``maps`` to compute them lazily for the boxes that survive truncation.
    Pixel box by truncation (:func:`pixel_boxes`); a box that collapses to zero rows or
    columns, or holds a NaN, gives an empty mask. Each map is resampled into its own
    box's window (batches of similar box size keep the windows small).
    """
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64) if not isinstance(boxes, torch.Tensor) else boxes)
    b = b.to(torch.float64).reshape(-1, 4)
    # NOTE: np.zeros takes zeroed pages from the OS lazily; only the boxes' pages are written
    out = np.zeros((len(b), height, width), dtype=bool)
    y0, x0, y1, x1, ok = pixel_boxes(b, height, width)
    idx = torch.nonzero(ok).flatten()
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
        full = torch.full_like(ys, MASK_SIZE)
        py = resample_weights(zero, full, MASK_SIZE, zero, ye - ys, hb)  # [n, hb, 64]
        px = resample_weights(zero, full, MASK_SIZE, zero, xe - xs, wb)  # [n, wb, 64]
        win = (torch.bmm(torch.bmm(py, m64), px.transpose(1, 2)) > 0).cpu().numpy()  # [n, hb, wb]
        for k, (i, r0, r1, c0, c1) in enumerate(zip(sel.tolist(), ys.tolist(), ye.tolist(), xs.tolist(),
                                                    xe.tolist())):
            out[i, r0:r1, c0:c1] = win[k, :r1 - r0, :c1 - c0]
    return out


# --------------------------------------------------------------------------- whole masks
MaskResampling = Literal["area", "bilinear"]


def resample_masks(masks, size: int | tuple[int, int], method: MaskResampling, batch_size: int = 64):
    """Masks bool [..., H, W] -> bool [..., h, w] at another image size; NumPy in, NumPy out.

    ``"area"``: a pixel is set where at least half of its footprint was set (the
    U-Net's targets at its input size); ``"bilinear"``: antialiased bilinear, then
    ``>= 0.5`` (smooth outlines when enlarging). NOTE: neither adds the detail that
    rendering at the new size draws (``chexanatomy_lib.ct`` can re-render a dataset row).
    """
    if method not in ("area", "bilinear"):
        raise ValueError(f"method must be 'area' or 'bilinear', got {method!r}")
    m, numpy_in = _tensor(masks)
    if m.ndim < 2:
        raise ValueError(f"masks must be [..., H, W]; got shape {tuple(m.shape)}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    lead, (h, w) = m.shape[:-2], m.shape[-2:]
    if (h, w) == hw:
        out = m.bool()
    else:
        flat = m.reshape(-1, 1, h, w)
        parts = []
        for s in range(0, len(flat), batch_size):
            x = flat[s:s + batch_size].float()
            if method == "area":
                r = F.interpolate(x, size=hw, mode="area")
            else:
                r = F.interpolate(x, size=hw, mode="bilinear", antialias=True, align_corners=False)
            parts.append(r >= 0.5)
        out = (torch.cat(parts) if parts else torch.zeros((0, 1, *hw), dtype=torch.bool)).reshape(*lead, *hw)
    return out.numpy() if numpy_in else out
