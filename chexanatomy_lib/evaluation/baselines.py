"""Trivial baselines every model is shown beside."""

from __future__ import annotations

import numpy as np

from ..codec.geometry import masks_to_boxes
from .predictions import Predictions


def mean_mask_predictions(dataset, split: str = "test", per_view: bool = True,
                          structures: list[str] | None = None, threshold: float = 0.5) -> Predictions:
    """Predict, for every image of ``split``, each structure's mean TRAINING mask.

    dataset: a ``ProjectedDataset``. The mean is over the training images (of the same
    view when ``per_view``), counting an absent structure as an empty mask, and is
    thresholded at ``>= threshold``. The image itself is never looked at, so this is
    the score of knowing only where a structure usually lies.
    Returns :class:`Predictions` at the dataset's image size; ``valid`` is True where
    the predicted mask is non-empty; boxes are the masks' tight boxes (NaN if empty).
    """
    names = list(dataset.structures) if structures is None else list(structures)
    target = dataset.split_indices(split)
    if len(dataset.split_indices("train")) == 0:
        raise ValueError(f"{getattr(dataset, 'path', 'dataset')}: no training images to average")
    views = sorted(set(dataset.index["view"].iloc[target])) if per_view else [None]
    size = int(dataset.image_size)
    templates: dict = {}
    for view in views:
        train = dataset.split_indices("train", view=view)
        if len(train) == 0:  # no training image of this view: fall back to all views
            train = dataset.split_indices("train")
        acc = np.zeros((len(names), size, size), np.float64)
        for s in range(0, len(train), 16):
            acc += dataset.masks_for(train[s:s + 16], names).sum(0)
        templates[view] = (acc / len(train)) >= threshold
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
