"""The projected dataset format: write/read round trip, splits, shards, exports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis.extra.numpy import array_shapes, arrays

from chexanatomy_lib.ct.dataset import (
    DatasetWriter,
    ProjectedDataset,
    choose_split_unit,
    make_splits,
    merge_shards,
    packed_width,
)
from chexanatomy_lib.ct.errors import DatasetError
from chexanatomy_lib.ct.export import export_coco_rle, export_png, mask_bbox_xywh, mask_to_rle, rle_to_mask

STRUCTURES = ["heart", "lung_left", "clavicula_right"]
SIZE = 20  # not a multiple of 8: exercises the packed-bit padding
META = {"pixel_spacing_mm": 1.5, "view_geometry": {"sdd": 1800.0}, "mask_threshold_mm": 1.0,
        "creation": {"seed": 0}}


def _sample(rng, k: int, split: str = "train", case: str = "case0", copy: str | None = None):
    image = rng.random((SIZE, SIZE), dtype=np.float32)
    masks = rng.random((len(STRUCTURES), SIZE, SIZE)) > 0.6
    masks[2] = False
    absent = np.array([False, False, True])
    truncated = np.array([False, True, False])
    row = {"image_id": f"img{k:03d}", "case_id": case, "copy_id": copy or f"{case}-c{k}",
           "view": "pa" if k % 2 == 0 else "lateral", "split": split, "yaw_deg": float(k), "tx_mm": 0.5 * k}
    return image, masks, absent, truncated, row


def _write(path, n=5, seed=0, start=0, meta=META, splits=None):
    rng = np.random.default_rng(seed)
    samples = [_sample(rng, start + k) for k in range(n)]
    with DatasetWriter(path, STRUCTURES, SIZE, meta, splits=splits) as w:
        for s in samples:
            w.add(*s)
    return samples


def test_round_trip_preserves_every_array_and_row(tmp_path):
    path = tmp_path / "dataset"
    samples = _write(path)
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["dataset.json", "index.csv", "images.npy", "masks.npy", "absent.npy", "truncated.npy", "splits.json"])
    ds = ProjectedDataset(path)
    assert len(ds) == 5 and ds.structures == STRUCTURES and ds.image_size == SIZE
    assert ds.meta == META
    assert isinstance(ds.images, np.memmap) and ds.images.dtype == np.float32
    raw = np.load(path / "masks.npy")
    assert raw.dtype == np.uint8 and raw.shape == (5, 3, SIZE, 3)
    for i, (image, masks, absent, truncated, row) in enumerate(samples):
        np.testing.assert_array_equal(ds.images[i], image)
        np.testing.assert_array_equal(ds.masks(i), masks)
        np.testing.assert_array_equal(ds.mask(i, "lung_left"), masks[1])
        np.testing.assert_array_equal(ds.absent[i], absent)
        np.testing.assert_array_equal(ds.truncated[i], truncated)
        assert ds.index.iloc[i]["image_id"] == row["image_id"]
        assert ds.index.iloc[i]["yaw_deg"] == row["yaw_deg"]
    both = ds.masks_for([3, 1], ["clavicula_right", "heart"])
    assert both.shape == (2, 2, SIZE, SIZE) and both.dtype == bool
    np.testing.assert_array_equal(both[0, 1], samples[3][1][0])
    assert ds.split_indices("train").tolist() == [0, 1, 2, 3, 4]
    assert ds.split_indices("train", view="lateral").tolist() == [1, 3]
    assert ds.split_indices("test").size == 0
    with pytest.raises(DatasetError, match="liver"):
        ds.mask(0, "liver")


def test_ids_that_look_like_numbers_stay_strings(tmp_path):
    path = tmp_path / "d"
    rng = np.random.default_rng(0)
    image, masks, absent, truncated, row = _sample(rng, 0)
    row.update(image_id="007", case_id="NA", copy_id="1")
    with DatasetWriter(path, STRUCTURES, SIZE, META) as w:
        w.add(image, masks, absent, truncated, row)
    first = ProjectedDataset(path).index.iloc[0]
    assert (first["image_id"], first["case_id"], first["copy_id"]) == ("007", "NA", "1")


def test_a_failing_writer_leaves_no_dataset(tmp_path):
    path = tmp_path / "dataset"
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError):
        with DatasetWriter(path, STRUCTURES, SIZE, META) as w:
            w.add(*_sample(rng, 0))
            raise RuntimeError("projector crashed")
    assert not path.exists() and not (tmp_path / "dataset.partial").exists()
    with pytest.raises(DatasetError, match="folder missing"):
        ProjectedDataset(path)


@pytest.mark.parametrize("change, problem", [
    (lambda s: (s[0] * 2, *s[1:]), "in \\[0, 1\\]"),
    (lambda s: (s[0][:10], *s[1:]), "image shape"),
    (lambda s: (s[0], s[1].astype(np.uint8), *s[2:]), "masks"),
    (lambda s: (s[0], s[1], np.array([True, False, True]), *s[3:]), "absent have non-empty"),
    (lambda s: (*s[:4], {**s[4], "view": "ap"}), "view"),
    (lambda s: (*s[:4], {**s[4], "split": "dev"}), "split"),
    (lambda s: (*s[:4], {k: v for k, v in s[4].items() if k != "case_id"}), "case_id"),
])
def test_writer_rejects_bad_samples_with_clear_errors(tmp_path, change, problem):
    rng = np.random.default_rng(0)
    w = DatasetWriter(tmp_path / "d", STRUCTURES, SIZE, META)
    with pytest.raises(DatasetError, match=problem):
        w.add(*change(_sample(rng, 0)))
    w.abort()
    assert not (tmp_path / "d").exists()


def test_writer_rejects_unknown_structures_and_missing_meta(tmp_path):
    with pytest.raises(DatasetError, match="cardiac silhouette.*'heart'"):
        DatasetWriter(tmp_path / "d", ["cardiac silhouette"], SIZE, META)
    with pytest.raises(DatasetError, match="mask_threshold_mm"):
        DatasetWriter(tmp_path / "d", STRUCTURES, SIZE, {"pixel_spacing_mm": 1, "view_geometry": {}})
    _write(tmp_path / "d", n=1)
    with pytest.raises(DatasetError, match="already exists"):
        DatasetWriter(tmp_path / "d", STRUCTURES, SIZE, META)


def test_reader_names_the_broken_file(tmp_path):
    path = tmp_path / "d"
    _write(path, n=3)
    np.save(path / "absent.npy", np.zeros((2, 3), bool))
    with pytest.raises(DatasetError, match="absent.npy.*expected bool \\(3, 3\\)"):
        ProjectedDataset(path)
    (path / "splits.json").unlink()
    with pytest.raises(DatasetError, match="splits.json"):
        ProjectedDataset(path)


def test_splits_are_seeded_and_disjoint():
    cases = [f"case{i:02d}" for i in range(20)]
    s = make_splits(cases, unit="case", seed=3)
    a = s["assignment"]
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(cases)
    assert not (set(a["train"]) & set(a["val"])) and not (set(a["train"]) & set(a["test"]))
    assert [len(a[k]) for k in ("train", "val", "test")] == [14, 3, 3]
    assert make_splits(list(reversed(cases)), unit="case", seed=3) == s
    assert make_splits(cases, unit="case", seed=4)["assignment"] != a
    small = make_splits(["c0", "c1", "c2"], unit="copy", seed=0)["assignment"]
    assert [len(small[k]) for k in ("train", "val", "test")] == [1, 1, 1]
    assert choose_split_unit(["ct1", "ct1"]) == "copy" and choose_split_unit(["ct1", "ct2"]) == "case"


def test_writer_enforces_the_split_assignment(tmp_path):
    splits = make_splits(["case0", "case1", "case2"], unit="case", seed=0)
    where = {c: k for k, ids in splits["assignment"].items() for c in ids}
    rng = np.random.default_rng(0)
    path = tmp_path / "d"
    with DatasetWriter(path, STRUCTURES, SIZE, META, splits=splits) as w:
        for k in range(6):
            case = f"case{k % 3}"
            w.add(*_sample(rng, k, split=where[case], case=case))
        wrong = "train" if where["case0"] != "train" else "val"
        with pytest.raises(DatasetError, match="case0"):
            w.add(*_sample(rng, 9, split=wrong, case="case0"))
    ds = ProjectedDataset(path)
    assert ds.splits == json.loads(json.dumps(splits))
    for split in ("train", "val", "test"):
        cases = set(ds.index.iloc[ds.split_indices(split)]["case_id"])
        assert cases <= set(splits["assignment"][split])


def test_splits_recorded_from_rows_refuse_a_leak(tmp_path):
    rng = np.random.default_rng(0)
    w = DatasetWriter(tmp_path / "d", STRUCTURES, SIZE, META)
    w.add(*_sample(rng, 0, split="train", case="A", copy="A-1"))
    w.add(*_sample(rng, 1, split="test", case="A", copy="A-1"))
    with pytest.raises(DatasetError, match="leak"):
        w.close()
    assert not (tmp_path / "d").exists()


def test_merge_shards_concatenates_and_checks(tmp_path):
    a = _write(tmp_path / "s0", n=3, seed=1, start=0, meta=META | {"shard": "0/2"})
    b = _write(tmp_path / "s1", n=2, seed=2, start=3, meta=META | {"shard": "1/2"})
    out = merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    ds = ProjectedDataset(out)
    assert len(ds) == 5 and ds.index["image_id"].tolist() == [f"img{k:03d}" for k in range(5)]
    for i, sample in enumerate(a + b):
        np.testing.assert_array_equal(ds.images[i], sample[0])
        np.testing.assert_array_equal(ds.masks(i), sample[1])
    assert "shard" not in ds.meta
    _write(tmp_path / "dup", n=1, seed=3, start=0)
    with pytest.raises(DatasetError, match="img000"):
        merge_shards([tmp_path / "s0", tmp_path / "dup"], tmp_path / "m2")
    _write(tmp_path / "other", n=1, seed=3, start=7, meta=META | {"mask_threshold_mm": 2.0})
    with pytest.raises(DatasetError, match="meta"):
        merge_shards([tmp_path / "s0", tmp_path / "other"], tmp_path / "m3")
    assert not (tmp_path / "m2").exists() and not (tmp_path / "m3").exists()


def test_merge_shards_requires_one_split_draw(tmp_path):
    cases = ["case0", "case1", "case2", "case3"]
    for k, seed in enumerate((0, 1)):
        splits = make_splits(cases, unit="case", seed=seed)
        where = {c: name for name, ids in splits["assignment"].items() for c in ids}
        rng = np.random.default_rng(k)
        with DatasetWriter(tmp_path / f"s{k}", STRUCTURES, SIZE, META, splits=splits) as w:
            w.add(*_sample(rng, k, split=where[cases[k]], case=cases[k]))
    with pytest.raises(DatasetError, match="different splits"):
        merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "m")


# --- exports ----------------------------------------------------------------------

def test_rle_round_trip_and_column_major_order():
    rng = np.random.default_rng(0)
    for shape in [(7, 5), (20, 20), (1, 9)]:
        for density in (0.0, 0.3, 1.0):
            m = rng.random(shape) < density
            rle = mask_to_rle(m)
            assert rle["size"] == list(shape) and sum(rle["counts"]) == m.size
            np.testing.assert_array_equal(rle_to_mask(rle), m)
    m = np.zeros((3, 4), bool)
    m[0, 1] = m[1, 1] = True  # column 1, rows 0-1: column-major runs 3 zeros, 2 ones, 7 zeros
    assert mask_to_rle(m)["counts"] == [3, 2, 7]
    m[0, 0] = True  # first pixel set: counts start with an empty zero run
    assert mask_to_rle(m)["counts"][:2] == [0, 1]
    assert mask_bbox_xywh(np.pad(np.ones((2, 3), bool), ((4, 1), (5, 2)))) == [5.0, 4.0, 3.0, 2.0]


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=17)))
def test_rle_and_packed_bits_round_trip_any_mask(mask):
    np.testing.assert_array_equal(rle_to_mask(mask_to_rle(mask)), mask)
    packed = np.packbits(mask, axis=-1)
    assert packed.shape[-1] == packed_width(mask.shape[-1])
    np.testing.assert_array_equal(np.unpackbits(packed, axis=-1, count=mask.shape[-1]).astype(bool), mask)


def test_coco_export_decodes_back_to_the_dataset_masks(tmp_path):
    _write(tmp_path / "d", n=3)
    ds = ProjectedDataset(tmp_path / "d")
    doc = json.loads(export_coco_rle(ds, tmp_path / "coco.json").read_text())
    assert [c["name"] for c in doc["categories"]] == STRUCTURES
    assert doc["categories"][0]["supercategory"] == "heart" and doc["categories"][2]["display"] == "right clavicle"
    assert len(doc["images"]) == 3 and doc["images"][1]["image_id"] == "img001"
    assert doc["images"][0]["absent_category_ids"] == [3] and doc["images"][0]["truncated_category_ids"] == [2]
    seen = set()
    for ann in doc["annotations"]:
        i, k = ann["image_id"] - 1, ann["category_id"] - 1
        mask = rle_to_mask(ann["segmentation"])
        np.testing.assert_array_equal(mask, ds.masks(i)[k])
        assert ann["area"] == int(mask.sum()) and ann["iscrowd"] == 0
        assert ann["bbox"] == mask_bbox_xywh(mask)
        assert ann["attributes"] == {"absent": False, "truncated": k == 1}
        seen.add((i, k))
    assert seen == {(i, k) for i in range(3) for k in range(2)}  # the absent clavicle has no annotation


def test_png_export_round_trip(tmp_path):
    from PIL import Image

    _write(tmp_path / "d", n=2)
    ds = ProjectedDataset(tmp_path / "d")
    out = export_png(ds, tmp_path / "png", bit_depth=16)
    image = np.asarray(Image.open(out / "images" / "img001.png"))
    np.testing.assert_allclose(image / 65535.0, ds.images[1], atol=1 / 65535)
    mask = np.asarray(Image.open(out / "masks" / "img001" / "lung_left.png"))
    np.testing.assert_array_equal(mask == 255, ds.mask(1, "lung_left"))
    assert sorted(p.stem for p in (out / "masks" / "img000").iterdir()) == sorted(STRUCTURES)


def test_pack_masks_matches_numpy_packbits():
    import torch

    from chexanatomy_lib.ct.dataset import pack_masks

    rng = np.random.default_rng(0)
    for w in (16, 13, 1):
        m = rng.random((2, 3, 5, w)) > 0.5
        assert np.array_equal(pack_masks(torch.from_numpy(m)).numpy(), np.packbits(m, axis=-1))
