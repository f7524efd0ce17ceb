"""Reading any chest radiograph, and letterboxing it to a square model input.

`read_radiograph(path)` returns float32 [H, W] in [0, 1] with white = dense (bone
bright, air dark), from:

- PNG / JPEG / TIFF / BMP (8- or 16-bit grey, RGB, palette): integer images are
  divided by ``2**bits - 1`` where ``bits`` is the smallest of 8, 10, 12, 14, 16
  that holds the largest value (12-bit data in a 16-bit PNG is not left dark);
- DICOM: modality LUT (rescale slope/intercept), then the VOI transform (the first
  window centre/width, LINEAR / LINEAR_EXACT / SIGMOID, or a VOI LUT sequence; with
  neither, the image's own min..max), then MONOCHROME1 is inverted (after the VOI
  transform, as the standard requires).

`letterbox` pads a non-square image to a square and resizes it; `Letterbox`
maps masks and boxes predicted on the square back to the original pixels, and
an original image's masks onto the square (a real set's annotations).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["RadiographError", "read_radiograph", "Letterbox", "letterbox", "letterbox_geometry"]


class RadiographError(ValueError):
    """A radiograph file cannot be read; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def is_dicom(path: Path) -> bool:
    """Whether ``path`` is a DICOM file (by its suffix, or its ``DICM`` preamble)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
        return len(head) == 132 and head[128:132] == b"DICM"
    except OSError:
        return False


def _scale_integer(arr: np.ndarray) -> np.ndarray:
    top = float(arr.max()) if arr.size else 0.0
    for bits in (8, 10, 12, 14, 16, 32):
        if top <= 2**bits - 1:
            break
    return arr.astype(np.float64) / float(2**bits - 1)


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("P", "PA"):
                im = im.convert("RGBA" if "transparency" in im.info or mode == "PA" else "RGB")
                mode = im.mode
            if mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
                rgb = np.asarray(im.convert("RGB"), dtype=np.float64)
                return rgb.mean(axis=-1) / 255.0
            if mode in ("LA",):
                im = im.convert("L")
                mode = "L"
            arr = np.asarray(im)
    except FileNotFoundError:
        raise RadiographError(path, "file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise RadiographError(path, f"not a readable PNG/JPEG/TIFF or DICOM image ({err})") from None
    if arr.ndim != 2:
        raise RadiographError(path, f"unsupported image layout {arr.shape} (mode {mode})")
    if mode == "1":
        return arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.floating):
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr, dtype=np.float64)
    if arr.min() < 0:
        arr = arr.astype(np.int64) - int(arr.min())
    return _scale_integer(arr)


def _first(value) -> float:
    try:
        return float(value[0])
    except TypeError:
        return float(value)


def _window(x: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM VOI windowing (PS3.3 C.11.2.1.2) to [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - (center - width / 2.0)) / width, 0.0, 1.0)
    if width < 1:
        raise ValueError(f"window width {width} < 1")
    return np.clip(((x - (center - 0.5)) / (width - 1.0)) + 0.5, 0.0, 1.0)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except FileNotFoundError:
        raise RadiographError(path, "file not found") from None
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise RadiographError(path, f"not a readable DICOM file ({err})") from None
    if "PixelData" not in ds:
        raise RadiographError(path, "DICOM file has no pixel data (is it a report or a structured document?)")
    try:
        arr = ds.pixel_array
    except Exception as err:  # noqa: BLE001  NOTE: pydicom raises many types for unsupported syntaxes
        raise RadiographError(path, f"cannot decode the DICOM pixel data "
                                    f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', '?')}): {err}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise RadiographError(path, f"multi-frame DICOM ({frames} frames) is not a single radiograph")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        if arr.ndim == 3 and arr.shape[-1] == 3:
            if photometric.startswith("YBR"):
                from pydicom.pixels import convert_color_space

                arr = convert_color_space(arr, photometric, "RGB")
            return _scale_integer(np.asarray(arr)).mean(axis=-1)
        raise RadiographError(path, f"unsupported PhotometricInterpretation {photometric!r}")
    if arr.ndim != 2:
        raise RadiographError(path, f"unexpected pixel array shape {arr.shape}")
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    x = apply_modality_lut(arr, ds).astype(np.float64)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        y = apply_voi_lut(arr if "ModalityLUTSequence" not in ds else x.astype(np.int64), ds).astype(np.float64)
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2]) if "LUTDescriptor" in item else 16
        out = y / float(2**bits - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        func = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        try:
            out = _window(x, _first(ds.WindowCenter), _first(ds.WindowWidth), func)
        except ValueError as err:
            raise RadiographError(path, f"invalid VOI window: {err}") from None
    else:
        lo, hi = float(x.min()), float(x.max())
        out = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
    out = np.clip(out, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        out = 1.0 - out  # NOTE: after the VOI transform, as PS3.3 C.7.6.3.1.2 requires
    return out


def read_radiograph(path: str | Path) -> np.ndarray:
    """Read a chest radiograph: PNG, JPEG, TIFF or DICOM -> float32 [H, W] in [0, 1] (white = dense).

    Raises `RadiographError` naming the file when it is missing, unreadable, empty
    or not a single grey (or colour) image.
    """
    p = Path(path)
    if not p.exists():
        raise RadiographError(p, "file not found")
    if p.is_dir():
        raise RadiographError(p, "is a directory, expected an image file")
    img = _read_dicom(p) if is_dicom(p) else _read_pil(p)
    if img.size == 0 or min(img.shape) < 2:
        raise RadiographError(p, f"image is empty or degenerate (shape {img.shape})")
    if not np.isfinite(img).all():
        raise RadiographError(p, "image holds non-finite values")
    return np.clip(img, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class Letterbox:
    """How an original [height, width] image sits inside the square [size, size] input.

    scale: size / max(height, width); the resized image occupies rows
    `pad_y .. pad_y + inner_h` and columns `pad_x .. pad_x + inner_w`.
    """

    height: int
    width: int
    size: int
    inner_h: int
    inner_w: int
    pad_y: int
    pad_x: int

    def mask_to_original(self, mask: np.ndarray) -> np.ndarray:
        """bool [size, size] (or [S, size, size]) on the square -> bool [.., height, width]."""
        import torch
        import torch.nn.functional as F

        m = np.asarray(mask, dtype=bool)
        lead = m.shape[:-2]
        if m.shape[-2:] != (self.size, self.size):
            raise ValueError(f"mask shape {m.shape} does not match the letterbox size {self.size}")
        inner = m.reshape(-1, self.size, self.size)[:, self.pad_y:self.pad_y + self.inner_h,
                                                    self.pad_x:self.pad_x + self.inner_w]
        t = torch.from_numpy(inner.astype(np.float32))[:, None]
        # NOTE: bilinear + threshold 0.5 keeps the area (nearest would shift edges by up to a pixel)
        up = F.interpolate(t, size=(self.height, self.width), mode="bilinear", align_corners=False)
        return (up[:, 0] >= 0.5).numpy().reshape(*lead, self.height, self.width)

    def mask_to_square(self, mask: np.ndarray) -> np.ndarray:
        """A mask of the original image -> bool [..., size, size], placed as the image is.

        ``mask``: [..., h, w], any value > 0 inside, covering the original image's field: its
        shape, or its aspect at another resolution (JSRT's 1024 x 1024 SCR masks of 2048 x
        2048 films). Resampled onto the inner box by the area rule (a pixel is set where at
        least half of its footprint is, :func:`~chexanatomy_lib.codec.geometry.resample_masks`);
        the padding is False. At ``size == max(height, width)`` the mask is only padded.
        """
        from .codec.geometry import resample_masks

        m = np.asarray(mask) > 0
        h, w = m.shape[-2:]
        if h * self.width != w * self.height:
            raise ValueError(f"mask shape {m.shape[-2:]} does not have the aspect of the "
                             f"{self.height} x {self.width} image")
        out = np.zeros((*m.shape[:-2], self.size, self.size), bool)
        out[..., self.pad_y:self.pad_y + self.inner_h, self.pad_x:self.pad_x + self.inner_w] = resample_masks(
            m, (self.inner_h, self.inner_w), "area")
        return out

    def content_mask(self) -> np.ndarray:
        """bool [size, size]: the pixels of the square that show the image (not padding)."""
        out = np.zeros((self.size, self.size), bool)
        out[self.pad_y:self.pad_y + self.inner_h, self.pad_x:self.pad_x + self.inner_w] = True
        return out

    def box_to_original(self, box: np.ndarray | None) -> np.ndarray | None:
        """Normalised box float [4] (ymin, xmin, ymax, xmax) on the square -> normalised on the original."""
        if box is None:
            return None
        b = np.asarray(box, dtype=np.float64) * self.size
        y = (b[[0, 2]] - self.pad_y) / self.inner_h
        x = (b[[1, 3]] - self.pad_x) / self.inner_w
        return np.clip(np.array([y[0], x[0], y[1], x[1]]), 0.0, 1.0).astype(np.float32)


def letterbox(image: np.ndarray, size: int) -> tuple[np.ndarray, Letterbox]:
    """Pad and resize float [H, W] to float32 [size, size] (aspect kept, centred, padding 0).

    Returns (square image, `Letterbox` to map outputs back).
    """
    import torch
    import torch.nn.functional as F

    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"image must be [H, W], got shape {img.shape}")
    lb = letterbox_geometry(*img.shape, size)
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None]
    resized = F.interpolate(t, size=(lb.inner_h, lb.inner_w), mode="bilinear", align_corners=False,
                            antialias=True)[0, 0]
    out = np.zeros((size, size), np.float32)
    out[lb.pad_y:lb.pad_y + lb.inner_h, lb.pad_x:lb.pad_x + lb.inner_w] = np.clip(resized.numpy(), 0.0, 1.0)
    return out, lb


def letterbox_geometry(height: int, width: int, size: int) -> Letterbox:
    """The :class:`Letterbox` :func:`letterbox` makes for a [height, width] image (no pixels read):
    scaled by ``size / max(height, width)``, centred."""
    scale = size / max(height, width)
    ih, iw = max(1, round(height * scale)), max(1, round(width * scale))
    return Letterbox(int(height), int(width), int(size), ih, iw, (size - ih) // 2, (size - iw) // 2)
