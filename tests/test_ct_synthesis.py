"""Dataset synthesis: splits by source CT, determinism, shards, re-rendering rows
and masks, and clear errors for bad input, on two phantom CTs made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from chexanatomy_lib.ct.cohort import PoseRanges, SourceCT, make_working_volume, sample_copies
from chexanatomy_lib.ct.dataset import ProjectedDataset, merge_shards
from chexanatomy_lib.ct.errors import CTInputError
from chexanatomy_lib.ct.io import CTCase
from chexanatomy_lib.ct.registry import load_registry
from chexanatomy_lib.ct.rerender import rerender_masks
from chexanatomy_lib.ct.synthesis import CaseRenderer, RenderSettings, structures_present, synthesize_dataset
from ct_phantoms import make_phantom, make_phantom_case

SPACING = (2.0, 2.0, 2.5)
SETTINGS = RenderSettings(field_mm=220.0, working_spacing_mm=2.0, step_mm=1.0)
RANGES = PoseRanges(translation_mm=(15.0, 10.0, 15.0), rotation_deg=(3.0, 5.0, 5.0), sod_mm=(1500.0, 1700.0))


SHAPES = {"alpha": (48, 48, 40), "beta": (52, 44, 40)}


def _case(case_id: str, shape=(48, 48, 40)) -> CTCase:
    ph = make_phantom(shape, SPACING)
    return CTCase(case_id=case_id, volume=ph.volume, labelmap=ph.labelmap.astype(np.int16),
                  affine=ph.affine, spacing=np.asarray(SPACING))


@pytest.fixture(scope="module")
def cases():
    return [_case(case_id, shape) for case_id, shape in SHAPES.items()]


def _synth(cases, path, **kw):
    args = dict(image_size=48, n_copies=2, poses_per_copy=2, seed=7, settings=SETTINGS,
                pose_ranges=RANGES, progress=False)
    args.update(kw)
    return ProjectedDataset(synthesize_dataset(cases, path, **args))


@pytest.fixture(scope="module")
def dataset(cases, tmp_path_factory):
    return _synth(cases, tmp_path_factory.mktemp("syn") / "ds")


def test_structures_are_registry_structures_in_registry_order(dataset):
    reg = load_registry()
    order = [s.name for s in reg]
    pos = [order.index(s) for s in dataset.structures]
    assert pos == sorted(pos)
    # the phantom's lobes, heart and vertebrae, plus the derived lungs and spine
    for name in ("lung_upper_lobe_left", "heart", "vertebrae_T3", "lung_left", "lung_right", "lungs", "spine"):
        assert name in dataset.structures
    assert "liver" not in dataset.structures  # not in the labelmaps


def test_no_source_ct_in_two_splits(dataset):
    idx = dataset.index
    per_case = idx.groupby("case_id")["split"].nunique()
    assert (per_case == 1).all()
    splits = json.loads((dataset.path / "splits.json").read_text())
    assert splits["unit"] == "case"
    seen = [c for ids in splits["assignment"].values() for c in ids]
    assert sorted(seen) == ["alpha", "beta"]


def test_single_ct_splits_by_deformed_copy(cases, tmp_path):
    ds = _synth(cases[:1], tmp_path / "one", n_copies=4, poses_per_copy=1, views=["pa"])
    assert json.loads((ds.path / "splits.json").read_text())["unit"] == "copy"
    assert (ds.index.groupby("copy_id")["split"].nunique() == 1).all()
    assert set(ds.index["split"]) == {"train", "val", "test"}


def test_rows_record_source_copy_and_pose(dataset):
    idx = dataset.index
    for col in ("case_id", "copy_id", "view", "tx", "ty", "tz", "rx", "ry", "rz", "sod", "noise_seed"):
        assert col in idx.columns
    assert len(dataset) == 2 * 2 * 2 * 2  # cases x copies x views x poses
    assert idx["image_id"].is_unique
    assert idx["copy_id"].nunique() == 4
    # poses vary within the requested ranges
    assert idx["tx"].abs().max() <= 15.0 and idx["sod"].between(1500.0, 1700.0).all()
    assert idx[["tx", "rz", "sod"]].drop_duplicates().shape[0] == len(dataset)


def test_images_and_masks_are_consistent(dataset):
    assert dataset.images.dtype == np.float32
    assert 0.0 <= float(dataset.images.min()) and float(dataset.images.max()) <= 1.0
    lungs = dataset.masks_for(range(len(dataset)), ["lungs"])[:, 0]
    heart = dataset.masks_for(range(len(dataset)), ["heart"])[:, 0]
    assert lungs.reshape(len(dataset), -1).any(1).all() and heart.reshape(len(dataset), -1).any(1).all()
    # a union's mask covers its members' masks (path lengths add up)
    left = dataset.masks_for(range(len(dataset)), ["lung_left"])[:, 0]
    assert not (left & ~lungs).any()
    # images are distinct (copies and poses differ)
    flat = dataset.images.reshape(len(dataset), -1)
    assert len({row.tobytes() for row in flat}) == len(dataset)


def test_same_seed_same_dataset_other_seed_differs(cases, dataset, tmp_path):
    again = _synth(cases, tmp_path / "again")
    assert np.array_equal(again.images, dataset.images)
    assert np.array_equal(again.packed_masks, dataset.packed_masks)
    assert np.array_equal(again.truncated, dataset.truncated)
    assert again.index.equals(dataset.index)
    other = _synth(cases, tmp_path / "other", seed=8)
    assert not np.array_equal(other.images, dataset.images)


def test_shards_merge_to_the_full_dataset(cases, dataset, tmp_path):
    shards = [_synth(cases, tmp_path / f"s{i}", shard=(i, 2)).path for i in range(2)]
    merged = ProjectedDataset(merge_shards(shards, tmp_path / "merged"))
    order = [list(merged.index["image_id"]).index(i) for i in dataset.index["image_id"]]
    assert sorted(merged.index["image_id"]) == sorted(dataset.index["image_id"])
    assert np.array_equal(merged.images[order], dataset.images)
    assert np.array_equal(merged.packed_masks[order], dataset.packed_masks)


def test_case_renderer_reproduces_a_row_and_rescales(cases, dataset):
    i = 5
    row = dataset.index.iloc[i].to_dict()
    case = next(c for c in cases if c.case_id == row["case_id"])
    renderer = CaseRenderer(case, dataset.meta["render_settings"])
    image, masks, absent, truncated = renderer.render(row, dataset.image_size, structures=dataset.structures)
    assert np.array_equal(image, dataset.images[i])
    assert np.array_equal(masks, dataset.masks(i))
    assert np.array_equal(absent, dataset.absent[i]) and np.array_equal(truncated, dataset.truncated[i])
    volume = renderer.volume
    # twice the resolution covers the same field: 2x2 pooled masks agree with the stored ones
    _, big, _, _ = renderer.render(row, 2 * dataset.image_size, structures=["lungs", "heart"])
    assert renderer.volume is volume  # the same row again: its deformed copy is not rebuilt
    for k, name in enumerate(["lungs", "heart"]):
        pooled = big[k].reshape(dataset.image_size, 2, dataset.image_size, 2).mean((1, 3)) >= 0.5
        ref = dataset.mask(i, name)
        assert 2 * (pooled & ref).sum() / (pooled.sum() + ref.sum()) > 0.9
    # a row of another copy, then of another case
    j = next(j for j in range(len(dataset)) if dataset.index.at[j, "case_id"] == row["case_id"]
             and dataset.index.at[j, "copy_id"] != row["copy_id"])
    image, masks, _, _ = renderer.render(dataset.index.iloc[j], dataset.image_size, structures=dataset.structures)
    assert np.array_equal(image, dataset.images[j]) and np.array_equal(masks, dataset.masks(j))
    other = next(r for _, r in dataset.index.iterrows() if r["case_id"] != row["case_id"])
    with pytest.raises(ValueError, match="row belongs to case"):
        renderer.render(other, dataset.image_size)


def test_rerendered_masks_at_two_sizes(cases, dataset, tmp_path):
    """Masks rendered again from the CTs named by a manifest: the same masks at every size,
    equal to the stored ones at the dataset's size."""
    entries = []
    for case_id, shape in SHAPES.items():
        ct, lab = make_phantom_case(tmp_path, shape, SPACING, name=case_id)
        entries.append({"case_id": case_id, "ct": str(ct), "labels": str(lab)})
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"name": "phantoms", "cases": entries}))
    names = ["lungs", "heart", "spine"]
    rows = [0, 9, 5, 12]  # both cases, interleaved
    size = dataset.image_size
    masks, table = rerender_masks(dataset, manifest, rows, [size, 2 * size], structures=names)
    assert list(masks) == [size, 2 * size]
    assert masks[size].shape == (len(table), size, size) and masks[2 * size].shape == (len(table), 2 * size, 2 * size)
    assert list(table.columns) == ["index", "image_id", "view", "structure"] and set(table["index"]) == set(rows)
    assert "spine" not in set(table["structure"])  # truncated (cut by the CT's top and bottom): left out
    for k, (i, name) in enumerate(zip(table["index"], table["structure"])):
        assert np.array_equal(masks[size][k], dataset.mask(i, name))
    kept, _ = rerender_masks(dataset, manifest, rows, [size], structures=names, exclude_truncated=False)
    assert len(kept[size]) == len(table) + len(rows)  # the spine of every image too
    manifest.write_text(yaml.safe_dump({"name": "phantoms", "cases": entries[:1]}))
    with pytest.raises(ValueError, match="case 'beta' is not in the manifest"):
        rerender_masks(dataset, manifest, rows, [size], structures=names)


def test_deformed_copies_change_the_anatomy(cases):
    src = SourceCT.from_case(cases[0])
    plain = make_working_volume(src, 2.0)
    copy = sample_copies("alpha", 1, seed=0, amplitude_mm=6.0, scale_range=0.1)[0]
    deformed = make_working_volume(src, 2.0, copy)
    again = make_working_volume(src, 2.0, copy)
    assert np.array_equal(deformed.labels, again.labels)  # seeded
    changed = (plain.labels != deformed.labels).mean()
    assert 0.005 < changed < 0.5
    # every labelled structure survives the deformation
    assert set(np.unique(deformed.labels)) == set(np.unique(plain.labels))


def test_bad_input_fails_before_anything_is_written(cases, tmp_path):
    ph = make_phantom((32, 32, 24), SPACING)
    bad_shape = CTCase(case_id="bad", volume=ph.volume, labelmap=ph.labelmap[:, :, :20].astype(np.int16),
                       affine=ph.affine, spacing=np.asarray(SPACING))
    with pytest.raises(CTInputError, match="bad.*labelmap shape"):
        synthesize_dataset([bad_shape], tmp_path / "x", image_size=32, progress=False)
    nan = CTCase(case_id="nan", volume=np.where(ph.labelmap > 0, np.nan, ph.volume).astype(np.float32),
                 labelmap=ph.labelmap.astype(np.int16), affine=ph.affine, spacing=np.asarray(SPACING))
    with pytest.raises(CTInputError, match="nan.*NaN"):
        synthesize_dataset([cases[0], nan], tmp_path / "x", image_size=32, progress=False)
    with pytest.raises(ValueError, match="views"):
        synthesize_dataset(cases, tmp_path / "x", image_size=32, views=["ap"], progress=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("x*"))


def test_structures_present_adds_derived_unions():
    reg = load_registry()
    ids = [reg.get("lung_upper_lobe_left").ids["total"], reg.get("heart").ids["total"]]
    names = structures_present(ids)
    assert names == [s.name for s in reg if s.name in {"lung_upper_lobe_left", "heart", "lung_left", "lungs",
                                                       "lung_field_left"}]


def test_shards_from_separate_processes_merge_to_the_full_dataset(cases, dataset, tmp_path):
    """Shards rendered by separate worker processes (as on several nodes) give the same dataset."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    kw = dict(image_size=48, n_copies=2, poses_per_copy=2, seed=7, settings=SETTINGS, pose_ranges=RANGES,
              progress=False)
    with ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(synthesize_dataset, cases, tmp_path / f"p{i}", shard=(i, 2), **kw) for i in range(2)]
        shards = [f.result() for f in futures]
    merged = ProjectedDataset(merge_shards(shards, tmp_path / "merged"))
    order = [list(merged.index["image_id"]).index(i) for i in dataset.index["image_id"]]
    assert np.array_equal(merged.images[order], dataset.images)
    assert np.array_equal(merged.packed_masks[order], dataset.packed_masks)
