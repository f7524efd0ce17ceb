"""Multi-task samples; also the small fakes (dataset, codec) the other VLM tests use."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

STRUCTURES = ["lung_left", "lung_right", "heart", "clavicula_left"]


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_fake_dataset(path: Path, n: int = 12, size: int = 64, seed: int = 0):
    """A projected dataset of `n` synthetic 'radiographs' (ellipse anatomy), PA and lateral.

    The image's right half holds the patient's left lung (radiological view).
    Image 1 has an absent heart, image 2 a truncated left clavicle.
    """
    from chexanatomy_lib.ct.dataset import DatasetWriter, ProjectedDataset

    rng = np.random.default_rng(seed)
    meta = {"pixel_spacing_mm": 1.0, "view_geometry": {}, "mask_threshold_mm": 1.0}
    with DatasetWriter(path, STRUCTURES, size, meta) as w:
        for i in range(n):
            s = size
            dy, dx = rng.uniform(-0.06, 0.06, 2) * s
            view = "pa" if i % 3 else "lateral"
            if view == "pa":
                masks = np.stack([
                    _ellipse(s, s, 0.5 * s + dy, 0.68 * s + dx, 0.28 * s, 0.14 * s),
                    _ellipse(s, s, 0.5 * s + dy, 0.32 * s + dx, 0.28 * s, 0.14 * s),
                    _ellipse(s, s, 0.62 * s + dy, 0.55 * s + dx, 0.13 * s, 0.12 * s),
                    _ellipse(s, s, 0.18 * s + dy, 0.66 * s + dx, 0.03 * s, 0.13 * s),
                ])
            else:
                masks = np.stack([
                    _ellipse(s, s, 0.5 * s + dy, 0.52 * s + dx, 0.3 * s, 0.2 * s),
                    _ellipse(s, s, 0.5 * s + dy, 0.48 * s + dx, 0.3 * s, 0.21 * s),
                    _ellipse(s, s, 0.6 * s + dy, 0.4 * s + dx, 0.15 * s, 0.12 * s),
                    _ellipse(s, s, 0.16 * s + dy, 0.5 * s + dx, 0.03 * s, 0.1 * s),
                ])
            absent = np.zeros(4, bool)
            truncated = np.zeros(4, bool)
            if i == 1:
                masks[2] = False
                absent[2] = True
            if i == 2:
                truncated[3] = True
            image = 0.15 + 0.1 * rng.random((s, s))
            image = image + 0.5 * (masks[0] | masks[1]) * 0.3 + 0.5 * masks[2] + 0.3 * masks[3]
            split = "test" if i >= n - 3 else "train"
            w.add(np.clip(image, 0, 1).astype(np.float32), masks, absent, truncated,
                  {"image_id": f"img{i:03d}", "case_id": "c0", "copy_id": f"k{i}", "view": view, "split": split})
    return ProjectedDataset(path)


class GridCodec:
    """A transparent stand-in for the mask VQ-VAE: code k of 16 = fill fraction of the
    k-th cell of a 4x4 grid over the tight box, scaled to range(128).

    Same interface as `chexanatomy_lib.codec.MaskCodec` (encode/decode); codes vary
    with the shape, and decoding fills the cells more than half full.
    """

    def encode(self, masks):
        from chexanatomy_lib.codec import mask_to_box

        masks = np.asarray(masks, bool)
        boxes = np.zeros((len(masks), 4), np.float32)
        codes = np.zeros((len(masks), 16), np.int64)
        for i, m in enumerate(masks):
            if not m.any():
                raise ValueError(f"empty mask at index {i}")
            b = mask_to_box(m)
            h, w = m.shape
            crop = m[round(b[0] * h):round(b[2] * h), round(b[1] * w):round(b[3] * w)].astype(float)
            ys = np.array_split(np.arange(crop.shape[0]), 4)
            xs = np.array_split(np.arange(crop.shape[1]), 4)
            frac = [crop[np.ix_(y, x)].mean() if len(y) and len(x) else 0.0 for y in ys for x in xs]
            boxes[i], codes[i] = b, np.round(np.asarray(frac) * 127)
        return boxes, codes

    def decode(self, boxes, codes, height, width):
        out = np.zeros((len(boxes), height, width), bool)
        for i, (b, c) in enumerate(zip(np.asarray(boxes, float), np.asarray(codes))):
            if not np.isfinite(b).all():
                continue
            y0, x0, y1, x1 = int(b[0] * height), int(b[1] * width), int(b[2] * height), int(b[3] * width)
            if y1 <= y0 or x1 <= x0:
                continue
            ys = np.array_split(np.arange(y0, y1), 4)
            xs = np.array_split(np.arange(x0, x1), 4)
            for k, (y, x) in enumerate((y, x) for y in ys for x in xs):
                if c[k] > 63 and len(y) and len(x):
                    out[i][np.ix_(y, x)] = True
        return out


def make_codec():
    return GridCodec()


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_dataset(tmp_path_factory.mktemp("ds") / "dataset")


def test_targets_exclude_absent_and_truncated(fake):
    from chexanatomy_lib.vlm.tasks import TaskSampler

    sampler = TaskSampler(fake, make_codec(), STRUCTURES, task_mix={"segment": 1.0}, synonyms=False,
                          full_list_prob=1.0)
    s1 = sampler.sample(1, np.random.default_rng(0))
    assert s1.prompt == "segment left lung ; right lung ; left clavicle"  # heart absent
    s2 = sampler.sample(2, np.random.default_rng(0))
    assert "left clavicle" not in s2.prompt and "heart" in s2.prompt  # clavicle truncated
    assert s2.target.count("<loc") == 4 * 3 and s2.target.count("<seg") == 16 * 3
    assert s2.target.endswith(" heart")


def test_targets_match_the_codec_of_the_mask(fake):
    """loc tokens are the quantised tight box of the mask; seg tokens the codec's codes."""
    from chexanatomy_lib.codec import box_to_loc_tokens, mask_to_box, seg_tokens
    from chexanatomy_lib.vlm.tasks import TaskSampler

    codec = make_codec()
    sampler = TaskSampler(fake, codec, STRUCTURES, task_mix={"segment": 1.0}, synonyms=False, full_list_prob=1.0)
    s = sampler.sample(0, np.random.default_rng(0))
    heart = fake.mask(0, "heart")
    _, codes = codec.encode(heart[None])
    assert box_to_loc_tokens(mask_to_box(heart)) + seg_tokens(codes[0]) + " heart" in s.target


def test_augmentation_recomputes_loc_and_seg_tokens(fake):
    """An augmented sample's tokens equal the codec applied to the transformed mask."""
    from chexanatomy_lib.augment import random_affine
    from chexanatomy_lib.codec import box_to_loc_tokens, seg_tokens
    from chexanatomy_lib.vlm.tasks import TaskSampler

    codec = make_codec()
    params = {"max_rotation_deg": 15.0, "max_scale": 0.1, "max_shift": 0.05}
    sampler = TaskSampler(fake, codec, STRUCTURES, task_mix={"segment": 1.0}, synonyms=False,
                          augment=1.0, augment_params=params, full_list_prob=1.0)
    plain = TaskSampler(fake, codec, STRUCTURES, task_mix={"segment": 1.0}, synonyms=False, full_list_prob=1.0)
    rng_seed = 3
    aug = sampler.sample(0, np.random.default_rng(rng_seed))
    # replay the same draws: the sampler draws "augment?" then the affine
    rng = np.random.default_rng(rng_seed)
    rng.choice(1, p=[1.0])  # the task draw
    rng.random()  # the 'augment?' draw
    _, masks = random_affine(np.asarray(fake.images[0]), fake.masks_for([0], STRUCTURES)[0], rng, **params)
    boxes, codes = codec.encode(masks[2][None])
    assert box_to_loc_tokens(boxes[0]) + seg_tokens(codes[0]) + " heart" in aug.target
    assert aug.target != plain.sample(0, np.random.default_rng(rng_seed)).target


def test_every_task_makes_well_formed_samples(fake):
    from chexanatomy_lib.vlm.tasks import TASKS, TaskSampler

    sampler = TaskSampler(fake, make_codec(), STRUCTURES)
    rng = np.random.default_rng(0)
    displays = {"left lung", "right lung", "heart", "left clavicle"}
    for task in TASKS:
        s = sampler.sample(0, rng, task=task)
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.float32
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        if task == "view":
            assert s.target == "lateral"  # image 0 is lateral
        elif task in ("caption_box", "caption_mask", "highlight"):
            assert s.target in displays
        if task == "highlight":
            assert (s.image[..., 0] != s.image[..., 1]).any()  # a coloured overlay is drawn
    with pytest.raises(ValueError, match="unknown task"):
        TaskSampler(fake, make_codec(), STRUCTURES, task_mix={"segmnt": 1.0})


def test_synonyms_appear_in_prompts_and_targets(fake):
    from chexanatomy_lib.vlm.tasks import TaskSampler

    sampler = TaskSampler(fake, make_codec(), ["heart"], task_mix={"detect": 1.0})
    seen = set()
    for k in range(40):
        s = sampler.sample(3, np.random.default_rng(k))
        name = s.prompt[len("detect "):]
        assert s.target.endswith(" " + name)
        seen.add(name)
    assert seen == {"heart", "cor", "cardiac silhouette"}


def test_prepared_labels_and_augmented_pool_match_the_codec(fake):
    """Batched precomputation gives the same targets as encoding one image at a time."""
    from chexanatomy_lib.codec import box_to_loc_tokens, seg_tokens
    from chexanatomy_lib.vlm.tasks import TaskSampler

    codec = make_codec()
    kw = dict(task_mix={"segment": 1.0}, synonyms=False, full_list_prob=1.0)
    lazy = TaskSampler(fake, codec, STRUCTURES, **kw)
    eager = TaskSampler(fake, codec, STRUCTURES, augment=1.0, **kw).prepare([0, 3, 4], augment_copies=2, seed=5)
    plain = TaskSampler(fake, codec, STRUCTURES, **kw).prepare([0, 3, 4])
    for i in (0, 3, 4):
        assert plain.sample(i, np.random.default_rng(0)).target == lazy.sample(i, np.random.default_rng(0)).target
        s = eager.sample(i, np.random.default_rng(1))
        copies = eager._pool[i]
        assert len(copies) == 2
        hits = 0
        for image, (ok, _, _, masks) in copies:
            boxes, codes = codec.encode(masks[ok])
            want = " ; ".join(box_to_loc_tokens(b) + seg_tokens(c) + " " + n for b, c, n in
                              zip(boxes, codes, np.array(["left lung", "right lung", "heart", "left clavicle"])[ok]))
            if not ok.any():  # everything pushed out of frame: the sample falls back to the view task
                want = {"pa": "posteroanterior", "lateral": "lateral"}[fake.index["view"].iloc[i]]
            hits += s.target == want and np.allclose(s.image[..., 0], image)
        assert hits == 1, (i, s.target[:80], want[:80])  # one of the pooled copies, tokens recomputed
