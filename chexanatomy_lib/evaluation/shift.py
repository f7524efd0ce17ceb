"""Robustness under shift: held-out images shifted one axis at a time, scored, compared.

Every axis is a :class:`~chexanatomy_lib.ct.shift.ShiftAxis`: rendered from the CT
(:data:`~chexanatomy_lib.ct.shift.RENDERED_SHIFTS`: pose, distances, collimator,
dose) or made on the image (:data:`~chexanatomy_lib.evaluation.perturbations.IMAGE_SHIFTS`:
in-plane geometry, appearance). :class:`ShiftSets` turns rows of a projected
dataset into a :class:`ShiftedSet` per axis (the images at each magnitude with
their reference masks); :func:`score_shifted` scores any model's masks on it with
the same per-image scoring as every other chapter
(:func:`~chexanatomy_lib.evaluation.evaluate.score_images`).

Which pairs are scored: an (image, structure) pair is scored at every magnitude
when it is scored in distribution (present and untruncated in the stored image),
so every magnitude scores the same pairs and a drop is a paired difference. Under
shift the reference is what the detector still sees: a structure moved partly out
of the field is scored on its visible part; one moved wholly out scores 1 for an
empty prediction and 0 otherwise. A pair whose reference the CT volume's own edge
cuts under the shift (an oblique view reaching past the scanned volume) is left out
at that magnitude: its reference would be incomplete.

Summaries: :func:`relative_robustness` (mean score under shift over mean score in
distribution, on the same pairs) and :func:`drop_difference` (model A's drop minus
model B's, paired over images, with a verdict read from its interval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..ct.shift import RENDERED_SHIFTS, ShiftAxis, render_shifted
from .evaluate import SCORE_COLUMNS, paired_difference, score_images
from .metrics import bootstrap_ratio
from .perturbations import IMAGE_SHIFTS, perturb

#: Every axis, rendered and image-space, by name.
SHIFT_AXES: dict[str, ShiftAxis] = {**RENDERED_SHIFTS, **IMAGE_SHIFTS}


def shift_axis(name: str) -> ShiftAxis:
    """The axis called ``name``; a ValueError lists every axis."""
    if name not in SHIFT_AXES:
        raise ValueError(f"unknown shift axis {name!r}; axes: {', '.join(SHIFT_AXES)}")
    return SHIFT_AXES[name]


def axes_table(axes: Sequence[str] | None = None) -> pd.DataFrame:
    """The axes (default: all) with their kind, unit, description and default magnitudes."""
    names = list(SHIFT_AXES) if axes is None else list(axes)
    return pd.DataFrame([{"axis": a.name, "family": a.family, "made": "rendered from the CT" if a.kind == "rendered"
                          else "on the image", "unit": a.unit, "what changes": a.description,
                          "default magnitudes": ", ".join(f"{m:g}" for m in a.magnitudes)}
                         for a in map(shift_axis, names)]).set_index("axis")


@dataclass
class ShiftedSet:
    """Images of one axis at several magnitudes, with their references.

    table: one row per image, ``index`` (row of the dataset), ``image_id`` (of the
    unshifted image), ``view``, ``axis``, ``magnitude``; images: float32 [N, H, W] in
    [0, 1]; masks: bool [N, S, H, W] references; scored: bool [N, S], the pairs to score;
    absent: bool [N, S], the reference is empty under the shift.
    """

    axis: str
    structures: list[str]
    table: pd.DataFrame
    images: np.ndarray
    masks: np.ndarray
    scored: np.ndarray
    absent: np.ndarray

    def __len__(self) -> int:
        return len(self.table)

    def at(self, magnitude: float) -> np.ndarray:
        """Positions (int64) of the images at ``magnitude``."""
        return np.flatnonzero(np.isclose(self.table["magnitude"].to_numpy(dtype=float), float(magnitude)))


class ShiftSets:
    """Makes the shifted sets of some rows of a projected dataset.

    dataset: a :class:`~chexanatomy_lib.ct.dataset.ProjectedDataset`; manifest: the CT
    manifest it was rendered from (chapter 1's ``manifest``; needed for rendered axes
    only); structures: the masks to keep (registry names of the dataset); threads:
    torch threads while rendering. Each source CT is prepared once, when its first row
    is rendered, and kept for every later axis.
    """

    def __init__(self, dataset, structures: Sequence[str], manifest: Any = None, threads: int | None = 1):
        unknown = [s for s in structures if s not in dataset.structures]
        if unknown:
            raise ValueError(f"{getattr(dataset, 'path', 'dataset')}: no masks of {unknown}")
        self.dataset = dataset
        self.structures = list(structures)
        self.manifest = manifest
        self.threads = threads
        self._channels = np.array([dataset.structures.index(s) for s in self.structures])
        self._renderers: dict[str, Any] = {}

    def _renderer(self, case_id: str):
        from ..ct.manifest import load_manifest
        from ..ct.synthesis import CaseRenderer

        if case_id not in self._renderers:
            if self.manifest is None:
                raise ValueError("rendered shift axes need the CT manifest the dataset was made from")
            specs = {str(s.case_id): s for s in load_manifest(self.manifest)}
            if case_id not in specs:
                raise ValueError(f"case {case_id!r} is not in the manifest {self.manifest} (cases: {sorted(specs)})")
            self._renderers[case_id] = CaseRenderer(specs[case_id].load(), self.dataset.meta["render_settings"])
        return self._renderers[case_id]

    def shifted_set(self, axis: str, indices: Sequence[int], magnitudes: Sequence[float] | None = None,
                    seed: int = 0, progress: bool = True) -> ShiftedSet:
        """Rows ``indices`` of the dataset at each of ``magnitudes`` of ``axis`` (default: the
        axis's own; its "none" magnitude is added first when missing). ``seed`` seeds what
        an image-space axis draws (marker positions), per image."""
        from tqdm.auto import tqdm

        shift = shift_axis(axis)
        mags = _with_none(shift, magnitudes)
        ds, idx = self.dataset, np.asarray(indices, dtype=np.int64)
        base_images = np.asarray(ds.images[idx], dtype=np.float32)
        base_masks = ds.masks_for(idx, self.structures)
        base_scored = ~ds.absent[np.ix_(idx, self._channels)] & ~ds.truncated[np.ix_(idx, self._channels)]
        ids = ds.index["image_id"].to_numpy()[idx].astype(str)
        views = ds.index["view"].to_numpy()[idx]
        if shift.kind == "image":
            return image_shifted_set(base_images, base_masks, base_scored, ids, views, self.structures, axis, mags,
                                     seed=seed, index=idx)
        rendered: dict[tuple[float, int], Any] = {}
        bar = tqdm(total=(len(mags) - 1) * len(idx), desc=f"shift {axis}", disable=not progress)
        order = sorted(range(len(idx)), key=lambda k: str(ds.index["copy_id"].iloc[int(idx[k])]))
        for k in order:  # row by row, so that each deformed copy is built once
            row = ds.index.iloc[int(idx[k])]
            for m in mags:
                if not shift.is_none(m):
                    rendered[m, k] = render_shifted(self._renderer(str(row["case_id"])), row, axis, m,
                                                    int(ds.image_size), self.structures, threads=self.threads)
                    bar.update(1)
        bar.close()
        images, masks, scored = [], [], []
        for m in mags:
            if shift.is_none(m):  # the stored image: what rendering it again gives
                images.append(base_images)
                masks.append(base_masks)
                scored.append(base_scored)
            else:
                out = [rendered[m, k] for k in range(len(idx))]
                images.append(np.stack([o.image for o in out]))
                masks.append(np.stack([o.masks for o in out]))
                scored.append(base_scored & ~np.stack([o.cut_by_ct for o in out]))
        return _shifted_set(axis, self.structures, mags, idx, ids, views, images, masks, scored)


def _with_none(shift: ShiftAxis, magnitudes: Sequence[float] | None) -> list[float]:
    """The magnitudes to use (default: the axis's own), its none magnitude first when missing."""
    mags = [float(m) for m in (shift.magnitudes if magnitudes is None else magnitudes)]
    return mags if any(shift.is_none(m) for m in mags) else [float(shift.none), *mags]


def _shifted_set(axis, structures, mags, index, ids, views, images, masks, scored) -> ShiftedSet:
    """A :class:`ShiftedSet` from per-magnitude lists of image, mask and scored arrays."""
    rows = [pd.DataFrame({"index": index, "image_id": ids, "view": views, "axis": axis, "magnitude": m})
            for m in mags]
    masks = np.concatenate(masks)
    return ShiftedSet(axis, list(structures), pd.concat(rows, ignore_index=True), np.concatenate(images), masks,
                      np.concatenate(scored), ~masks.any(axis=(2, 3)))


def image_shifted_set(images: np.ndarray, masks: np.ndarray, scored: np.ndarray, image_ids: Sequence[str],
                      views: Sequence[str], structures: Sequence[str], axis: str,
                      magnitudes: Sequence[float] | None = None, seed: int = 0,
                      index: Sequence[int] | None = None) -> ShiftedSet:
    """Any images (real films too) at each magnitude of an image-space ``axis``.

    images: float [N, H, W] in [0, 1]; masks: bool [N, S, H, W] references; scored: bool
    [N, S], the pairs to score at every magnitude; image_ids, views: [N]; structures: [S]
    names; magnitudes: default the axis's own, its none first when missing; seed: image
    ``k`` draws with ``seed + index[k]`` (``index`` default 0..N-1).
    """
    shift = shift_axis(axis)
    if shift.kind != "image":
        raise ValueError(f"{axis!r} is rendered from the CT; only image-space axes apply to any image "
                         f"({', '.join(IMAGE_SHIFTS)})")
    mags = _with_none(shift, magnitudes)
    index = np.arange(len(images)) if index is None else np.asarray(index, dtype=np.int64)
    shifted = [perturb(images, masks, axis, m, seeds=[seed + int(i) for i in index]) for m in mags]
    return _shifted_set(axis, structures, mags, index, np.asarray(image_ids).astype(str), np.asarray(views),
                        [im for im, _ in shifted], [mk for _, mk in shifted], [np.asarray(scored, bool)] * len(mags))


def predict_shifted(segmenter, shifted: ShiftedSet, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``segmenter.predict`` (the VLM's or the U-Net's) on every image of the set, for its
    structures: ``(masks bool [N, S, H, W], boxes float [N, S, 4], valid bool [N, S])``."""
    return segmenter.predict(shifted.images, shifted.structures, batch_size=batch_size, progress=False)


def score_shifted(shifted: ShiftedSet, masks: np.ndarray, boxes: np.ndarray, valid: np.ndarray,
                  hd95: bool = False) -> pd.DataFrame:
    """Per (image, magnitude, structure) scores of a model's outputs on a shifted set.

    masks bool [N, S, H, W], boxes float [N, S, 4], valid bool [N, S] in the set's order
    and structures. hd95: compute HD95 too (slow). Returns :data:`SCORE_COLUMNS` plus
    ``axis`` and ``magnitude``.
    """
    n = len(shifted)
    if masks.shape[:2] != (n, len(shifted.structures)):
        raise ValueError(f"{masks.shape[:2]} outputs for a set of {n} images and {len(shifted.structures)} structures")
    t = shifted.table
    scores = score_images(masks, boxes, valid, shifted.masks, shifted.structures, t["image_id"].tolist(),
                          t["view"].tolist(), shifted.scored, shifted.absent,
                          np.full(len(shifted.structures), bool(hd95)))
    where = np.repeat(np.arange(n), shifted.scored.sum(1))
    scores.insert(0, "magnitude", t["magnitude"].to_numpy()[where])
    scores.insert(0, "axis", shifted.axis)
    return scores


def add_group_means(scores: pd.DataFrame, together: dict[str, Sequence[str]],
                    keys: Sequence[str] = ("model", "axis", "magnitude")) -> pd.DataFrame:
    """``scores`` with, per entry ``{name: structures}`` of ``together``, rows whose
    ``structure`` is ``name`` and whose metrics are the per-image means over those
    structures (within each group of ``keys`` present in ``scores``)."""
    keys = [k for k in keys if k in scores.columns]
    metrics = [c for c in scores.columns if c in SCORE_COLUMNS[3:] and c not in ("valid", "absent")]
    parts = [scores]
    for name, members in together.items():
        part = scores[scores["structure"].isin(list(members))]
        if len(part):
            g = part.groupby([*keys, "image_id", "view"], sort=False)[metrics].mean().reset_index()
            parts.append(g.assign(structure=name))
    return pd.concat(parts, ignore_index=True)


def _none_of(axis: str) -> float:
    return float(shift_axis(axis).none)


def relative_robustness(scores: pd.DataFrame, metric: str = "dice", n_boot: int = 1000, seed: int = 0,
                        by: Sequence[str] = ("model", "axis", "structure")) -> pd.DataFrame:
    """Mean ``metric`` under shift over its mean in distribution (magnitude none), on the
    same (image, structure) pairs, per group of ``by`` and magnitude, with a 95%
    bootstrap interval over pairs (resampled jointly). 1 means no loss.

    scores: :func:`score_shifted` tables (with ``model`` where several). Returns a
    DataFrame indexed by ``(*by, magnitude)``: ``n``, ``shifted``, ``none``,
    ``ratio``, ``ratio_lo``, ``ratio_hi``.
    """
    by = [k for k in by if k in scores.columns]
    rows = []
    for k, (key, g) in enumerate(scores.groupby(by, sort=False)):
        key = key if isinstance(key, tuple) else (key,)
        none = _none_of(str(g["axis"].iloc[0]))
        base = g[np.isclose(g["magnitude"].astype(float), none)].set_index(["image_id", "structure"])[metric]
        for j, (m, gm) in enumerate(g.groupby("magnitude", sort=True)):
            pair = gm.set_index(["image_id", "structure"])[metric].to_frame("shifted").join(
                base.rename("none"), how="inner").dropna()
            est, lo, hi = bootstrap_ratio(pair["shifted"].to_numpy(), pair["none"].to_numpy(), n_boot=n_boot,
                                          seed=seed + 100 * k + j)
            rows.append({**dict(zip(by, key)), "magnitude": float(m), "n": len(pair),
                         "shifted": pair["shifted"].mean(), "none": pair["none"].mean(),
                         "ratio": est, "ratio_lo": lo, "ratio_hi": hi})
    return pd.DataFrame(rows).set_index([*by, "magnitude"])


def drops(scores: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Per (axis, magnitude, image, structure) of one model: ``metric`` under shift minus
    the same pair's ``metric`` at the axis's none magnitude (column ``drop``, <= 0 for
    a loss), beside both values. Pairs not scored at both magnitudes are left out."""
    parts = []
    for axis, g in scores.groupby("axis", sort=False):
        none = _none_of(str(axis))
        base = g[np.isclose(g["magnitude"].astype(float), none)].set_index(["image_id", "structure"])[metric]
        d = g.join(base.rename("in_distribution"), on=["image_id", "structure"], how="inner")
        d = d.dropna(subset=[metric, "in_distribution"])
        parts.append(d.assign(drop=d[metric] - d["in_distribution"]))
    cols = ["axis", "magnitude", "image_id", "view", "structure", metric, "in_distribution", "drop"]
    return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


def drop_difference(a: pd.DataFrame, b: pd.DataFrame, structures: Sequence[str], metric: str = "dice",
                    together: dict[str, Sequence[str]] | None = None, n_boot: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
    """Model A's drop minus model B's, per axis and magnitude: the paired test of "A keeps
    its accuracy better than B under this shift".

    a, b: :func:`score_shifted` tables of the two models on the same shifted sets. For
    each (axis, magnitude) other than none, :func:`~chexanatomy_lib.evaluation.evaluate.paired_difference`
    of the per-image drops (:func:`drops`) over the pairs both models score, per
    structure and per ``together`` group. ``verdict`` "A better" means A dropped less
    (the interval lies above zero). Returns a DataFrame indexed by ``(axis, magnitude,
    structure)``; columns ``a`` and ``b`` are the mean drops.
    """
    da, db = drops(a, metric).rename(columns={"drop": "d"}), drops(b, metric).rename(columns={"drop": "d"})
    frames = {}
    for k, ((axis, m), ga) in enumerate(da.groupby(["axis", "magnitude"], sort=False)):
        if shift_axis(str(axis)).is_none(m):
            continue
        gb = db[(db["axis"] == axis) & np.isclose(db["magnitude"].astype(float), float(m))]
        frames[(axis, float(m))] = paired_difference(ga, gb, structures, metric="d", n_boot=n_boot,
                                                     seed=seed + 100 * k, together=together)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, names=["axis", "magnitude"])


def pooled_drop_difference(a: pd.DataFrame, b: pd.DataFrame, at: dict[str, float], structure: str,
                           name: str = "pooled", metric: str = "dice", n_boot: int = 1000,
                           seed: int = 0) -> pd.DataFrame:
    """Model A's drop minus model B's for one structure (or group row of
    :func:`add_group_means`) at one magnitude of each of several axes, per axis and pooled.

    at: ``{axis: magnitude}``, e.g. each geometric axis at its most severe magnitude.
    The pooled row averages each image's drops over the axes first, so the bootstrap
    resamples images (the unit the axes share). Returns the table of
    :func:`~chexanatomy_lib.evaluation.evaluate.paired_difference`, one row per axis and
    one called ``name``.
    """
    def per_axis(scores):
        d = drops(scores[scores["structure"] == structure], metric)
        keep = np.zeros(len(d), bool)
        for axis, m in at.items():
            keep |= (d["axis"] == axis).to_numpy() & np.isclose(d["magnitude"].astype(float), float(m))
        # one row per (image, axis): the axis plays the part of the structure in paired_difference
        return d[keep].drop(columns="structure").rename(columns={"axis": "structure", "drop": "d"})

    return paired_difference(per_axis(a), per_axis(b), list(at), metric="d", n_boot=n_boot, seed=seed,
                             together={name: list(at)})
