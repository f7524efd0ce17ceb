"""Trivial baselines every model is shown beside."""

from __future__ import annotations

import numpy as np

from ..codec.geometry import masks_to_boxes
from .predictions import Predictions


def mean_masks(dataset, structures: list[str] | None = None, view: str | None = None,
               threshold: float = 0.5) -> np.ndarray:
    """Each structure's mean TRAINING mask, thresholded: bool [S, H, W].

    dataset: a ``ProjectedDataset``; view: average the training images of this view only
    (None, or a view without training images: all). An absent structure counts as an
    empty mask; a pixel is kept where the mean is ``>= threshold``.
    """
    names = list(dataset.structures) if structures is None else list(structures)
    train = dataset.split_indices("train")
    if len(train) == 0:
        raise ValueError(f"{getattr(dataset, 'path', 'dataset')}: no training images to average")
    if view is not None and len(dataset.split_indices("train", view=view)):
        train = dataset.split_indices("train", view=view)
    size = int(dataset.image_size)
    acc = np.zeros((len(names), size, size), np.float64)
    for s in range(0, len(train), 16):
        acc += dataset.masks_for(train[s:s + 16], names).sum(0)
    return (acc / len(train)) >= threshold


def mean_mask_predictions(dataset, split: str = "test", per_view: bool = True,
                          structures: list[str] | None = None, threshold: float = 0.5) -> Predictions:
    """Predict, for every image of ``split``, each structure's mean TRAINING mask.

    dataset: a ``ProjectedDataset``. The mean is over the training images (of the same
    view when ``per_view``; :func:`mean_masks`), counting an absent structure as an empty
    mask, and is thresholded at ``>= threshold``. The image itself is never looked at, so
    this is the score of knowing only where a structure usually lies.
    Returns :class:`Predictions` at the dataset's image size; ``valid`` is True where
    the predicted mask is non-empty; boxes are the masks' tight boxes (NaN if empty).
    """
    names = list(dataset.structures) if structures is None else list(structures)
    target = dataset.split_indices(split)
    views = sorted(set(dataset.index["view"].iloc[target])) if per_view else [None]
    size = int(dataset.image_size)
    templates = {view: mean_masks(dataset, names, view, threshold) for view in views}
    n, s = len(target), len(names)
    masks = np.zeros((n, s, size, size), bool)
    boxes = np.full((n, s, 4), np.nan, np.float32)
    box_cache = {v: masks_to_boxes(t).astype(np.float32) for v, t in templates.items()}
    for k, i in enumerate(target):
        view = dataset.index["view"].iloc[i] if per_view else None
        masks[k] = templates[view]
        boxes[k] = box_cache[view]
    valid = masks.reshape(n, s, -1).any(-1)
    return Predictions(dataset.index["image_id"].iloc[target].to_numpy(), np.array(names), masks, boxes, valid)
