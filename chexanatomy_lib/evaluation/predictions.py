"""Model predictions on disk: ``<stage>/predictions/<split>.npz``, the same for every model.

==============  =================================================================
``image_ids``   ``str [N]``, rows of the dataset's ``index.csv``
``structures``  ``str [S]`` registry names
``masks``       ``uint8 [N, S, H, W/8]`` packed bool at the dataset's image size
``boxes``       ``float32 [N, S, 4]`` ``(ymin, xmin, ymax, xmax)`` in [0, 1], NaN when none
``valid``       ``bool [N, S]`` whether the model produced a valid output for it
==============  =================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

KEYS = ("image_ids", "structures", "masks", "boxes", "valid")


class PredictionsError(ValueError):
    """A predictions file or object that does not fit the format (the message names the file)."""


@dataclass
class Predictions:
    """Predictions of one model on one split.

    image_ids: str [N]; structures: str [S] (registry names);
    masks: bool [N, S, H, W] (H = W = the dataset's image size, W a multiple of 8);
    boxes: float32 [N, S, 4] normalised, NaN when none; valid: bool [N, S].
    """

    image_ids: np.ndarray
    structures: np.ndarray
    masks: np.ndarray
    boxes: np.ndarray
    valid: np.ndarray

    def __post_init__(self) -> None:
        self.image_ids = np.asarray(self.image_ids).astype(str)
        self.structures = np.asarray(self.structures).astype(str)
        self.masks = np.asarray(self.masks).astype(bool, copy=False)
        self.boxes = np.asarray(self.boxes, dtype=np.float32)
        self.valid = np.asarray(self.valid).astype(bool, copy=False)
        self.validate()

    def validate(self, where: str = "Predictions") -> None:
        n, s = len(self.image_ids), len(self.structures)
        if self.image_ids.ndim != 1 or self.structures.ndim != 1:
            raise PredictionsError(f"{where}: image_ids and structures must be 1-D")
        if self.masks.ndim != 4 or self.masks.shape[:2] != (n, s):
            raise PredictionsError(f"{where}: masks have shape {self.masks.shape}, expected [{n}, {s}, H, W]")
        if self.boxes.shape != (n, s, 4):
            raise PredictionsError(f"{where}: boxes have shape {self.boxes.shape}, expected {(n, s, 4)}")
        if self.valid.shape != (n, s):
            raise PredictionsError(f"{where}: valid has shape {self.valid.shape}, expected {(n, s)}")
        finite = self.boxes[np.isfinite(self.boxes)]
        if finite.size and (finite.min() < 0 or finite.max() > 1):
            raise PredictionsError(f"{where}: boxes must be normalised to [0, 1] (or NaN)")
        if len(set(self.image_ids.tolist())) != n:
            raise PredictionsError(f"{where}: duplicate image_ids")
        if len(set(self.structures.tolist())) != s:
            raise PredictionsError(f"{where}: duplicate structures")

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.masks.shape[-2:])  # type: ignore[return-value]

    def rows_of(self, image_ids) -> np.ndarray:
        """Row indices int64 [n] of ``image_ids`` (str [n]); a ``KeyError`` names an id not predicted."""
        row = {k: r for r, k in enumerate(self.image_ids.tolist())}
        missing = [str(i) for i in image_ids if str(i) not in row]
        if missing:
            raise KeyError(f"image(s) {missing[:5]} not in predictions ({len(self.image_ids)} images)")
        return np.array([row[str(i)] for i in image_ids], dtype=np.int64)

    def channel(self, name: str) -> int:
        hits = np.flatnonzero(self.structures == name)
        if not hits.size:
            raise KeyError(f"structure {name!r} not in predictions ({len(self.structures)} structures)")
        return int(hits[0])


def save_predictions(pred: Predictions, path: str | Path) -> Path:
    """Write ``pred`` as a compressed ``.npz`` (masks packed along the width)."""
    path = Path(path)
    pred.validate(str(path))
    if pred.masks.shape[-1] % 8:
        raise PredictionsError(f"{path}: mask width {pred.masks.shape[-1]} is not a multiple of 8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial.npz")
    np.savez_compressed(tmp, image_ids=pred.image_ids, structures=pred.structures,
                        masks=np.packbits(pred.masks, axis=-1), boxes=pred.boxes, valid=pred.valid)
    tmp.replace(path)
    return path


def load_predictions(path: str | Path) -> Predictions:
    """Read a predictions ``.npz``; errors name the file and the missing key or wrong shape."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: no predictions file here")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise PredictionsError(f"{path}: missing arrays {missing} (expected {list(KEYS)})")
            arrays = {k: z[k] for k in KEYS}
    except PredictionsError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise PredictionsError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    packed = arrays["masks"]
    if packed.dtype != np.uint8 or packed.ndim != 4:
        raise PredictionsError(f"{path}: masks must be uint8 [N, S, H, W/8]; got {packed.dtype} {packed.shape}")
    masks = np.unpackbits(packed, axis=-1).astype(bool)
    try:
        return Predictions(arrays["image_ids"], arrays["structures"], masks, arrays["boxes"], arrays["valid"])
    except PredictionsError as exc:
        raise PredictionsError(str(exc).replace("Predictions", str(path), 1)) from None


def predict_split(segmenter, dataset, split: str = "test", structures=None, batch_size: int = 16,
                  progress: bool = True, chunk: int = 256) -> Predictions:
    """Any model's :class:`Predictions` for every image of one split of a projected dataset.

    segmenter: anything with ``.structures`` and ``.predict(images float [n, H, W],
    structures, batch_size, progress) -> (masks bool [n, S, H, W], boxes float [n, S, 4],
    valid bool [n, S])`` (the VLM's and the U-Net's segmenters); structures: registry names
    (default: the segmenter's). Images are read and predicted ``chunk`` at a time (rounded
    up to whole batches, so the model sees the same batches as in one call).
    """
    from tqdm.auto import tqdm

    names = list(segmenter.structures if structures is None else structures)
    idx = np.asarray(dataset.split_indices(split), dtype=np.int64)
    step = batch_size * max(1, -(-chunk // batch_size))
    parts = []
    for s in tqdm(range(0, len(idx), step), desc=f"predicting {split}", disable=not progress or len(idx) <= step):
        images = np.asarray(dataset.images[idx[s:s + step]], dtype=np.float32)
        parts.append(segmenter.predict(images, names, batch_size=batch_size, progress=progress and len(idx) <= step))
    size = int(dataset.image_size)
    masks = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, len(names), size, size), bool)
    boxes = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, len(names), 4), np.float32)
    valid = np.concatenate([p[2] for p in parts]) if parts else np.zeros((0, len(names)), bool)
    return Predictions(dataset.index["image_id"].to_numpy()[idx], np.array(names), masks, boxes, valid)
