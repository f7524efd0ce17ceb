"""How much a mask loses on its way through the tokens: data, round trips and baselines.

Chapter 2 uses these to train the codebook on projected anatomy masks and to
measure the round-trip Dice (mask -> 4 loc + 16 seg tokens -> mask): the ceiling
any VLM reaches through the codec.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .mask_codec import MaskCodec, masks_to_crops, paste_maps

#: Structure groups shown in chapter 2, by registry category or name prefix.
GROUPS = {
    "lungs": lambda s: s.category == "lung",
    "heart": lambda s: s.category == "heart",
    "clavicles": lambda s: s.name.startswith("clavicula"),
    "ribs": lambda s: s.category == "rib" and s.name.startswith("rib_"),
    "spine": lambda s: s.category == "vertebra",
}


def structure_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """Split registry names into the groups lungs, heart, clavicles, ribs, spine (others dropped)."""
    from ..ct.registry import load_registry

    reg = load_registry()
    out: dict[str, list[str]] = {g: [] for g in GROUPS}
    for n in names:
        s = reg.get(n)
        for g, pred in GROUPS.items():
            if pred(s):
                out[g].append(n)
                break
    return out


def group_of(names: Sequence[str]) -> dict[str, str]:
    """Registry name -> its group in :data:`GROUPS` (``"other"`` when none)."""
    groups = structure_groups(names)
    lookup = {n: g for g, ns in groups.items() for n in ns}
    return {n: lookup.get(n, "other") for n in names}


def present_masks(dataset, indices: Sequence[int], structures: Sequence[str] | None = None,
                  exclude_truncated: bool = False) -> tuple[np.ndarray, pd.DataFrame]:
    """Non-empty masks of some images: (bool [M, H, W], table with ``index, image_id, view, structure``).

    Absent structures are skipped; truncated ones too when ``exclude_truncated``.
    """
    names = list(dataset.structures) if structures is None else list(structures)
    ch = [dataset.structures.index(n) for n in names]
    masks, rows = [], []
    for i in indices:
        m = dataset.masks_for([i], names)[0]
        keep = m.reshape(len(names), -1).any(1)
        if exclude_truncated:
            keep &= ~dataset.truncated[i, ch]
        for k in np.flatnonzero(keep):
            rows.append({"index": int(i), "image_id": dataset.index["image_id"].iloc[i],
                         "view": dataset.index["view"].iloc[i], "structure": names[k]})
        masks.append(m[keep])
    size = int(dataset.image_size)
    stacked = np.concatenate(masks) if masks else np.zeros((0, size, size), bool)
    return stacked, pd.DataFrame(rows, columns=["index", "image_id", "view", "structure"])


def training_crops(dataset, split: str = "train", structures: Sequence[str] | None = None,
                   crop: str = "tight", resize: str = "bilinear_aa") -> tuple[np.ndarray, pd.DataFrame]:
    """64x64 soft crops of every present mask of ``split``: (float32 [M, 64, 64] in [0, 1], table)."""
    masks, table = present_masks(dataset, dataset.split_indices(split), structures)
    _, crops = masks_to_crops(masks, crop=crop, resize=resize)
    return crops, table


def resize_masks(masks: np.ndarray, size: int, batch_size: int = 64) -> np.ndarray:
    """Resample bool masks [N, H, W] to [N, size, size]: antialiased bilinear, then ``>= 0.5``.

    NOTE: this is the fallback when samples cannot be re-rendered at ``size``; the
    result is smoother than a rendered mask (no new anatomical detail appears).
    """
    import torch
    import torch.nn.functional as F

    out = np.zeros((len(masks), size, size), bool)
    for s in range(0, len(masks), batch_size):
        m = torch.from_numpy(np.ascontiguousarray(masks[s:s + batch_size])).float()[:, None]
        r = F.interpolate(m, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s:s + batch_size] = (r[:, 0] >= 0.5).numpy()
    return out


def box_only_masks(masks: np.ndarray) -> np.ndarray:
    """Baseline: each mask replaced by its filled location-token box (what ``detect`` gives)."""
    h, w = masks.shape[-2:]
    boxes = _quantised_boxes(masks)
    return paste_maps(np.ones((len(masks), 64, 64), np.float32), boxes, h, w)


def _quantised_boxes(masks: np.ndarray) -> np.ndarray:
    boxes, _ = masks_to_crops(masks)
    return np.clip(np.round(boxes.astype(np.float64) * 1023), 0, 1023) / 1023


def template_masks(masks: np.ndarray, structures: Sequence[str], templates: dict[str, np.ndarray]) -> np.ndarray:
    """Baseline: each structure's mean training crop (``templates[name]`` float [64, 64] in [0, 1])
    pasted into the mask's own location-token box, inside where the mean is > 0.5."""
    h, w = masks.shape[-2:]
    boxes = _quantised_boxes(masks)
    maps = np.stack([templates[s] - 0.5 for s in structures]).astype(np.float32)
    return paste_maps(maps, boxes, h, w)


def mean_templates(crops: np.ndarray, table: pd.DataFrame) -> dict[str, np.ndarray]:
    """Mean 64x64 crop per structure: ``{name: float [64, 64] in [0, 1]}``."""
    return {name: crops[idx].mean(0) for name, idx in table.groupby("structure").indices.items()}


def roundtrip_scores(codecs: dict[str, MaskCodec | None], masks: np.ndarray, table: pd.DataFrame,
                     templates: dict[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Dice and IoU of each mask after each route: one row per (mask, route).

    codecs: ``{route name: MaskCodec}`` (``None`` entries are skipped); the route
    ``"box only"`` (and ``"mean template"`` when ``templates`` are given) is added as a baseline.
    masks: bool [M, H, W] non-empty; table: one row per mask (``structure`` column at least).
    """
    from ..evaluation.metrics import confusion_counts, dice_from_counts, iou_from_counts

    routes: dict[str, np.ndarray] = {}
    for name, codec in codecs.items():
        if codec is not None:
            routes[name] = codec.roundtrip(masks)
    routes["box only"] = box_only_masks(masks)
    if templates is not None:
        routes["mean template"] = template_masks(masks, table["structure"].tolist(), templates)
    frames = []
    for route, rec in routes.items():
        tp, fp, fn = confusion_counts(rec, masks)
        f = table.copy()
        f["route"] = route
        f["dice"] = dice_from_counts(tp, fp, fn)
        f["iou"] = iou_from_counts(tp, fp, fn)
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def summarize_roundtrip(scores: pd.DataFrame, by: Sequence[str] = ("route", "structure"), metric: str = "dice",
                        n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean, 95% bootstrap CI (over masks) and ``n`` of ``metric`` per group of ``by``."""
    from ..evaluation.metrics import bootstrap_ci

    rows = []
    for k, (key, g) in enumerate(scores.groupby(list(by), sort=False)):
        est, lo, hi = bootstrap_ci(g[metric].to_numpy(), n_boot=n_boot, seed=seed + k)
        key = key if isinstance(key, tuple) else (key,)
        rows.append({**dict(zip(by, key)), metric: est, f"{metric}_lo": lo, f"{metric}_hi": hi, "n": len(g)})
    return pd.DataFrame(rows)
