"""How much a mask loses on its way through the tokens: data, round trips and baselines.

Chapter 2 uses these to train the codebook on projected anatomy masks and to
measure the round-trip Dice (mask -> 4 loc + 16 seg tokens -> mask): the ceiling
any VLM reaches through the codec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .mask_codec import MaskCodec, masks_to_crops, paste_maps, quantise_boxes

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
    """64x64 soft crops of every present mask of ``split``: (float32 [M, 64, 64] in [0, 1], table).

    ``crop`` and ``resize`` are :class:`MaskCodec` policies (train with the policy the codec encodes with).
    """
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


def rerendered_masks(dataset, manifest: str | Path, indices: Sequence[int], sizes: Sequence[int],
                     structures: Sequence[str] | None = None, exclude_truncated: bool = True,
                     threads: int | None = 1) -> tuple[dict[int, np.ndarray], pd.DataFrame]:
    """Re-render some dataset images from their CT at each of ``sizes`` and keep the usable masks.

    dataset: a :class:`~chexanatomy_lib.ct.dataset.ProjectedDataset`; manifest: the CT
    manifest it was made from (chapter 1's ``manifest`` parameter); indices: rows of
    its index. A structure of an image is kept when it is present (non-empty and not
    absent) at every size, and untruncated at every size when ``exclude_truncated``,
    so that every size scores the same masks.

    Returns ``({size: bool [M, size, size]}, table)`` with one table row per mask
    (``index, image_id, view, structure``), in the same order for every size.
    Raises ValueError naming the case when a row's CT is not in the manifest.
    """
    from ..ct.manifest import load_manifest
    from ..ct.synthesis import render_sample

    names = list(dataset.structures) if structures is None else list(structures)
    specs = {str(s.case_id): s for s in load_manifest(manifest)}
    cases: dict[str, object] = {}
    out: dict[int, list[np.ndarray]] = {int(z): [] for z in sizes}
    rows = []
    for i in indices:
        row = dataset.index.iloc[int(i)]
        cid = str(row["case_id"])
        if cid not in cases:
            if cid not in specs:
                raise ValueError(f"image {row['image_id']!r}: case {cid!r} is not in the manifest {manifest} "
                                 f"(cases there: {sorted(specs)})")
            cases[cid] = specs[cid].load()
        rendered = {}
        keep = np.ones(len(names), bool)
        for z in out:
            _, m, absent, truncated = render_sample(cases[cid], row, z, settings=dataset.meta["render_settings"],
                                                    structures=names, threads=threads)
            keep &= m.reshape(len(names), -1).any(1) & ~absent
            if exclude_truncated:
                keep &= ~truncated
            rendered[z] = m
        for z, m in rendered.items():
            out[z].append(m[keep])
        for k in np.flatnonzero(keep):
            rows.append({"index": int(i), "image_id": row["image_id"], "view": row["view"], "structure": names[k]})
    stacked = {z: np.concatenate(ms) if ms else np.zeros((0, z, z), bool) for z, ms in out.items()}
    return stacked, pd.DataFrame(rows, columns=["index", "image_id", "view", "structure"])


def box_only_masks(masks: np.ndarray) -> np.ndarray:
    """Baseline: each mask replaced by its filled location-token box (what ``detect`` gives)."""
    h, w = masks.shape[-2:]
    boxes = _quantised_boxes(masks)
    return paste_maps(np.ones((len(masks), 64, 64), np.float32), boxes, h, w)


def _quantised_boxes(masks: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Masks bool [N, H, W] (non-empty) -> the boxes their location tokens decode to, float64 [N, 4]."""
    from .mask_codec import _NoModel

    codec = MaskCodec(_NoModel("cpu"))  # type: ignore[arg-type]
    boxes = [codec.boxes_of(masks[s:s + batch_size]) for s in range(0, len(masks), batch_size)]
    return quantise_boxes(np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32)).numpy()


def resize_only_masks(masks: np.ndarray, crop: str = "aligned", resize: str = "bilinear_aa") -> np.ndarray:
    """Ceiling of a crop policy: masks bool [N, H, W] (non-empty) -> bool [N, H, W] after the
    64x64 crop alone (no VQ-VAE) is pasted back into the location-token box (inside = crop > 0.5)."""
    h, w = masks.shape[-2:]
    boxes, crops = masks_to_crops(masks, crop=crop, resize=resize)
    return paste_maps(2.0 * crops - 1.0, quantise_boxes(boxes).numpy(), h, w)


def resize_only_scores(masks: np.ndarray, table: pd.DataFrame, crop: str = "aligned",
                       resize: str = "bilinear_aa") -> pd.DataFrame:
    """Dice and IoU of :func:`resize_only_masks` per mask: ``table`` plus ``dice``, ``iou``."""
    return _score_frame(resize_only_masks(masks, crop, resize), masks, table)


def _score_frame(rec: np.ndarray, masks: np.ndarray, table: pd.DataFrame) -> pd.DataFrame:
    from ..evaluation.metrics import confusion_counts, dice_from_counts, iou_from_counts

    tp, fp, fn = confusion_counts(rec, masks)
    f = table.copy()
    f["dice"] = dice_from_counts(tp, fp, fn)
    f["iou"] = iou_from_counts(tp, fp, fn)
    return f


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
    routes: dict[str, np.ndarray] = {}
    for name, codec in codecs.items():
        if codec is not None:
            routes[name] = codec.roundtrip(masks)
    routes["box only"] = box_only_masks(masks)
    if templates is not None:
        routes["mean template"] = template_masks(masks, table["structure"].tolist(), templates)
    frames = [_score_frame(rec, masks, table.assign(route=route)) for route, rec in routes.items()]
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
