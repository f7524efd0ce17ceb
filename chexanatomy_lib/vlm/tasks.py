"""Multi-task training samples (prompt, image, target) from the projected dataset.

Tasks (prompt -> target), as in the paper's training mix:

- ``segment``: ``"segment left lung ; heart"`` -> ``"<loc×4><seg×16> left lung ; <loc×4><seg×16> heart"``
- ``detect``: ``"detect heart"`` -> ``"<loc×4> heart"`` (several names joined with ``" ; "`` too)
- ``caption_box``: ``"caption <loc×4>"`` -> display name of the structure in that box
- ``caption_mask``: ``"caption <loc×4><seg×16>"`` -> display name
- ``highlight``: image with one structure's mask or box drawn on it,
  ``"which structure is highlighted"`` -> display name
- ``view``: ``"view orientation"`` -> ``"posteroanterior"`` or ``"lateral"``
- ``visible``: ``"visible heart"`` -> ``"yes"`` (present and untruncated) or ``"no"``: an
  image-level question with no box or mask in its answer (not in the default mix;
  the image-level control, ``train.train_image_level``, learns ``view`` and ``visible`` only)

Structure names in detect/segment prompts are drawn from the registry's display
name and synonyms; the target repeats the name used in the prompt. Absent and
truncated structures are never targets. With augmentation, the image and the
masks are transformed together (`chexanatomy_lib.augment`) and both the loc and
the seg tokens are recomputed from the transformed masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

TASKS = ("segment", "detect", "caption_box", "caption_mask", "highlight", "view", "visible")
DEFAULT_TASK_MIX: dict[str, float] = {
    "segment": 0.55, "detect": 0.15, "caption_box": 0.08, "caption_mask": 0.08, "highlight": 0.08, "view": 0.06,
}
VIEW_WORDS = {"pa": "posteroanterior", "lateral": "lateral"}
HIGHLIGHT_PROMPT = "which structure is highlighted"
VIEW_PROMPT = "view orientation"
VISIBLE_PROMPT = "visible"


@dataclass
class Sample:
    """One training or inference example.

    image: float32 [H, W, 3] in [0, 1] (grey radiograph replicated; overlays in colour).
    prompt: text after the image tokens (no `<image>`/`<bos>`).
    target: expected output text (None at inference).
    task: one of `TASKS`.
    """

    image: np.ndarray
    prompt: str
    target: str | None
    task: str


def grey_to_rgb(image: np.ndarray) -> np.ndarray:
    """float [H, W] in [0, 1] -> float32 [H, W, 3] (channels equal)."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a grey image [H, W], got shape {img.shape}")
    return np.repeat(np.clip(img, 0.0, 1.0)[..., None], 3, axis=-1)


def draw_highlight(image: np.ndarray, mask: np.ndarray, box: np.ndarray | None = None) -> np.ndarray:
    """Overlay for the `highlight` task: float [H, W] grey + bool [H, W] mask -> float32 [H, W, 3].

    With `box` (normalised float [4]) a red box outline is drawn; otherwise the
    mask is tinted red.
    """
    rgb = grey_to_rgb(image)
    h, w = mask.shape
    if box is None:
        rgb[mask] = 0.5 * rgb[mask] + 0.5 * np.array([1.0, 0.1, 0.1], np.float32)
    else:
        from ..codec.geometry import box_to_pixel_box

        y0, x0, y1, x1 = box_to_pixel_box(box, h, w)
        y1, x1 = max(y1 - 1, y0), max(x1 - 1, x0)  # the last row and column inside the box
        t = max(1, h // 128)
        red = np.array([1.0, 0.1, 0.1], np.float32)
        rgb[y0:y0 + t, x0:x1 + 1] = red
        rgb[max(y1 - t + 1, 0):y1 + 1, x0:x1 + 1] = red
        rgb[y0:y1 + 1, x0:x0 + t] = red
        rgb[y0:y1 + 1, max(x1 - t + 1, 0):x1 + 1] = red
    return rgb


def normalise_mix(mix: Mapping[str, float] | None) -> dict[str, float]:
    """Task weights -> probabilities summing to 1; unknown tasks or negative weights are errors."""
    mix = dict(DEFAULT_TASK_MIX if mix is None else mix)
    unknown = sorted(set(mix) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown} in task mix; known: {list(TASKS)}")
    if any(v < 0 for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"task weights must be >= 0 with a positive sum, got {mix}")
    total = float(sum(mix.values()))
    return {k: float(v) / total for k, v in mix.items() if v > 0}


class TaskSampler:
    """Draws multi-task samples for images of a `ProjectedDataset`.

    dataset: `chexanatomy_lib.ct.dataset.ProjectedDataset` (or anything with
        `.images`, `.masks_for`, `.structures`, `.absent`, `.truncated`, `.index`).
    codec: mask codec with `.encode(masks bool [N, H, W]) -> (boxes [N, 4], codes [N, 16])`.
    structures: registry names the model learns (a subset of `dataset.structures`).
    task_mix: task -> weight (normalised here); default `DEFAULT_TASK_MIX`.
    synonyms: draw prompt names from synonyms too (else display names only).
    augment: probability of a random affine transform per sample (0 disables).
    augment_params: keyword arguments of `chexanatomy_lib.augment.random_affine`.
    full_list_prob: probability that a segment/detect prompt lists all available
        structures in `structures` order (the inference prompt); else a random
        subset in random order.
    registry: structure registry (default: the bundled one).
    """

    def __init__(self, dataset, codec, structures: Sequence[str], task_mix: Mapping[str, float] | None = None,
                 synonyms: bool = True, augment: float = 0.0, augment_params: Mapping[str, float] | None = None,
                 full_list_prob: float = 0.5, registry=None):
        if registry is None:
            from ..ct.registry import load_registry

            registry = load_registry()
        missing = [s for s in structures if s not in dataset.structures]
        if missing:
            raise ValueError(f"structures {missing} are not in the dataset (it has {list(dataset.structures)})")
        self.dataset = dataset
        self.codec = codec
        self.structures = list(structures)
        self.channels = [list(dataset.structures).index(s) for s in self.structures]
        self.mix = normalise_mix(task_mix)
        self.synonyms = synonyms
        self.augment = float(augment)
        self.augment_params = dict(augment_params or {"max_rotation_deg": 8.0, "max_scale": 0.08,
                                                       "max_shift": 0.04})
        self.full_list_prob = float(full_list_prob)
        self.display = {s: registry.get(s).display for s in self.structures}
        self.names = {s: (registry.get(s).display, *registry.get(s).synonyms) for s in self.structures}
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._pool: dict[int, list[tuple[np.ndarray, tuple]]] = {}

    def prepare(self, indices: Sequence[int], augment_copies: int = 0, seed: int = 0,
                progress: bool = False) -> "TaskSampler":
        """Precompute labels for dataset rows `indices` with batched codec calls.

        With `augment_copies` = K > 0, also K augmented copies per image (image,
        masks, boxes, codes), drawn with `default_rng([seed, row, k])`; augmented
        samples are then drawn from this pool instead of being made (and encoded)
        on the fly. Returns self.
        """
        from tqdm.auto import tqdm

        todo = [int(i) for i in indices if int(i) not in self._cache]
        jobs: list[tuple[int, int | None, np.ndarray, np.ndarray, np.ndarray]] = []
        for i in tqdm(todo, desc="labels", disable=not progress):
            masks = self.dataset.masks_for([i], self.structures)[0]
            ok = self.usable(i) & masks.reshape(len(masks), -1).any(1)
            jobs.append((i, None, np.asarray(self.dataset.images[i], np.float32), masks, ok))
        for i in tqdm([int(i) for i in indices] if augment_copies else [], desc="augmented copies",
                      disable=not progress):
            masks0 = self.dataset.masks_for([i], self.structures)[0]
            ok0 = self.usable(i) & masks0.reshape(len(masks0), -1).any(1)
            for k in range(augment_copies):
                rng = np.random.default_rng([seed, i, k])
                image, masks, whole = self._transform(i, masks0, ok0, rng)
                jobs.append((i, k, image, masks, whole))
        if not jobs:
            return self
        flat = [m for (_, _, _, masks, ok) in jobs for m in masks[ok]]
        boxes_all, codes_all = self.codec.encode(np.stack(flat)) if flat else (None, None)
        pos = 0
        s = len(self.structures)
        for i, k, image, masks, ok in jobs:
            boxes = np.zeros((s, 4), np.float32)
            codes = np.zeros((s, 16), np.int64)
            n = int(ok.sum())
            boxes[ok], codes[ok] = boxes_all[pos:pos + n], codes_all[pos:pos + n]
            pos += n
            if k is None:
                self._cache[i] = (ok, boxes, codes, masks)
            else:
                self._pool.setdefault(i, []).append((image, (ok, boxes, codes, masks)))
        return self

    def _transform(self, i: int, masks0: np.ndarray, ok0: np.ndarray, rng: np.random.Generator):
        """Random affine of image `i` and its masks; returns (image, masks, still-whole flags)."""
        from ..augment import apply_affine, sample_affine

        params = sample_affine(rng, **self.augment_params)
        image, masks = apply_affine(np.asarray(self.dataset.images[i]), masks0, params)
        area0 = masks0.reshape(len(masks0), -1).sum(1)
        area = masks.reshape(len(masks), -1).sum(1)
        # NOTE: a structure pushed partly out of the frame is truncated now and is
        # no target: >= 90% of its (zoomed) area must stay inside the image.
        whole = ok0 & (area > 0) & (area >= 0.9 * area0 * params.scale ** 2)
        return np.clip(image, 0, 1), masks, whole

    # ------------------------------------------------------------------ labels
    def usable(self, i: int) -> np.ndarray:
        """bool [len(structures)]: present and not truncated in image `i`."""
        ch = self.channels
        return ~np.asarray(self.dataset.absent[i, ch]) & ~np.asarray(self.dataset.truncated[i, ch])

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Un-augmented labels of image `i` (cached).

        Returns (ok bool [S'], boxes float32 [S', 4], codes int64 [S', 16], masks bool [S', H, W])
        over `structures`; rows where `ok` is False hold zeros.
        """
        if i not in self._cache:
            masks = self.dataset.masks_for([i], self.structures)[0]
            self._cache[i] = self._encode(self.usable(i) & masks.reshape(len(masks), -1).any(1), masks)
        return self._cache[i]

    def _encode(self, ok: np.ndarray, masks: np.ndarray):
        s = len(self.structures)
        boxes = np.zeros((s, 4), np.float32)
        codes = np.zeros((s, 16), np.int64)
        if ok.any():
            b, c = self.codec.encode(masks[ok])
            boxes[ok], codes[ok] = b, c
        return ok, boxes, codes, masks

    def _augmented(self, i: int, rng: np.random.Generator):
        if i in self._pool:
            pool = self._pool[i]
            return pool[int(rng.integers(len(pool)))]
        ok0, _, _, masks0 = self.labels(i)
        image, masks, whole = self._transform(i, masks0, ok0, rng)
        return image, self._encode(whole, masks)

    # ------------------------------------------------------------------ samples
    def _name(self, s: int, rng: np.random.Generator) -> str:
        options = self.names[self.structures[s]]
        if not self.synonyms or len(options) == 1 or rng.random() < 0.5:
            return options[0]
        return options[int(rng.integers(1, len(options)))]

    def _pick_list(self, ok: np.ndarray, rng: np.random.Generator) -> list[int]:
        avail = np.flatnonzero(ok)
        if rng.random() < self.full_list_prob:
            return avail.tolist()
        k = int(rng.integers(1, len(avail) + 1))
        return rng.permutation(avail)[:k].tolist()

    def sample(self, i: int, rng: np.random.Generator, task: str | None = None) -> Sample:
        """A sample of image `i` (dataset row) of a task drawn from the mix (or `task`)."""
        from ..codec.tokens import box_to_loc_tokens, format_prompt, format_target, seg_tokens

        if task is None:
            keys = list(self.mix)
            task = keys[int(rng.choice(len(keys), p=[self.mix[k] for k in keys]))]
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {list(TASKS)}")
        if task == "view" and self.augment == 0:  # image-level: nothing to encode
            view = str(self.dataset.index["view"].iloc[i])
            return Sample(grey_to_rgb(np.asarray(self.dataset.images[i], dtype=np.float32)), VIEW_PROMPT,
                          VIEW_WORDS[view], task)
        if task == "visible":  # image-level: no labels to encode; a visible and a hidden structure equally often
            ok = self.usable(i)
            pool = np.flatnonzero(ok if (rng.random() < 0.5 and ok.any()) or ok.all() else ~ok)
            s = int(rng.choice(pool))
            image = np.asarray(self.dataset.images[i], dtype=np.float32)
            return Sample(grey_to_rgb(image), f"{VISIBLE_PROMPT} {self._name(s, rng)}", "yes" if ok[s] else "no",
                          task)
        if self.augment > 0 and rng.random() < self.augment:
            image, (ok, boxes, codes, masks) = self._augmented(i, rng)
        else:
            image = np.asarray(self.dataset.images[i], dtype=np.float32)
            ok, boxes, codes, masks = self.labels(i)
        if task != "view" and not ok.any():
            task = "view"  # nothing usable to ask about in this image
        if task == "view":
            view = str(self.dataset.index["view"].iloc[i])
            return Sample(grey_to_rgb(image), VIEW_PROMPT, VIEW_WORDS[view], task)
        if task in ("segment", "detect"):
            picks = self._pick_list(ok, rng)
            names = [self._name(s, rng) for s in picks]
            inst = [(n, boxes[s], codes[s]) for n, s in zip(names, picks)]
            return Sample(grey_to_rgb(image), format_prompt(task, names), format_target(task, inst), task)
        s = int(rng.choice(np.flatnonzero(ok)))
        answer = self.display[self.structures[s]]
        if task == "caption_box":
            return Sample(grey_to_rgb(image), "caption " + box_to_loc_tokens(boxes[s]), answer, task)
        if task == "caption_mask":
            prompt = "caption " + box_to_loc_tokens(boxes[s]) + seg_tokens(codes[s])
            return Sample(grey_to_rgb(image), prompt, answer, task)
        # highlight: mask tint or box outline, half and half
        use_box = rng.random() < 0.5
        rgb = draw_highlight(image, masks[s], boxes[s] if use_box else None)
        return Sample(rgb, HIGHLIGHT_PROMPT, answer, task)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [H, W, 3] in [0, 1] -> uint8 [H, W, 3] (what image processors expect)."""
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_batch(processor, samples: Sequence[Sample], train: bool = True) -> dict[str, Any]:
    """Samples -> model inputs via `PaliGemmaProcessor` (tensors).

    Training (`train=True`): passes the targets as `suffix`, so the processor
    appends `<eos>`, sets `token_type_ids` (0 prefix, 1 suffix) and `labels`
    (-100 on image, `<bos>`, prompt and `"\\n"`). Inference: prefix only, no labels.
    Sequences are left-padded to the longest.
    """
    n_img = "<image>"
    text = [n_img + s.prompt for s in samples]
    images = [to_uint8(s.image) for s in samples]
    kw: dict[str, Any] = {}
    if train:
        if any(s.target is None for s in samples):
            raise ValueError("training samples need targets")
        kw["suffix"] = [s.target for s in samples]
    batch = processor(text=text, images=images, padding="longest", return_tensors="pt", **kw)
    out = dict(batch)
    if not train:
        out.pop("labels", None)
    return out
