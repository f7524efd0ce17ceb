"""Synthetic lesions: a nodule projects where and as large as geometry says and shows in
the DRR, an effusion fills the base of its lung, draws respect their ranges and seeds,
the lesion dataset opens like any projected dataset, and a CT without lesions renders
exactly as before. On the phantom CT of ct_phantoms (lungs of lobe labels, heart, spine)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from chexanatomy_lib.ct.cohort import PoseRanges, SourceCT, make_working_volume
from chexanatomy_lib.ct.dataset import ProjectedDataset
from chexanatomy_lib.ct.detector import DetectorModel
from chexanatomy_lib.ct.errors import CTInputError
from chexanatomy_lib.ct.geometry import PatientPose, project_points
from chexanatomy_lib.ct.io import CTCase
from chexanatomy_lib.ct.lesions import (LESIONS, LesionRanges, add_effusion, add_nodule, insert_lesions, lung_sites,
                                        render_lesion_row, synthesize_lesion_dataset, with_lesion_labels)
from chexanatomy_lib.ct.registry import LESION_LABEL_BASE, load_registry
from chexanatomy_lib.ct.synthesis import CaseRenderer, RenderSettings, label_groups, render_views, structures_present
from ct_phantoms import make_phantom

SPACING = (2.0, 2.0, 2.5)
SHAPE = (64, 64, 48)  # lungs about 36 x 58 x 90 mm each, centred at x = -+24 mm
NOISELESS = RenderSettings(image_size=192, field_mm=220.0, detector=DetectorModel(photons_per_pixel=None))
SMALL = LesionRanges(nodules=(1, 3), nodule_diameter_mm=(6.0, 12.0), nodule_hu=(-50.0, 50.0))
POSES = PoseRanges(translation_mm=(8.0, 5.0, 8.0), rotation_deg=(3.0, 3.0, 3.0), sod_mm=(1600.0, 1700.0))


def _case(case_id: str = "phantom") -> CTCase:
    ph = make_phantom(SHAPE, SPACING)
    return CTCase(case_id=case_id, volume=ph.volume, labelmap=ph.labelmap.astype(np.int16), affine=ph.affine,
                  spacing=np.asarray(SPACING))


@pytest.fixture(scope="module")
def case():
    return _case()


@pytest.fixture(scope="module")
def volume(case):
    return make_working_volume(SourceCT.from_case(case), 2.0)


@pytest.fixture(scope="module")
def sites(volume):
    return lung_sites(volume)


def _render(volume, names, pose=PatientPose(sod=1650.0), settings=NOISELESS):
    images, masks, absent, truncated = render_views(volume, ["pa"], [pose], settings,
                                                    label_groups(names, volume.label_ids))
    return images[0], masks[0], absent[0], truncated[0]


def test_registry_names_the_lesions_apart_from_anatomy(case):
    reg = load_registry()
    assert reg.resolve("pulmonary nodule").name == reg.resolve("Nodule").name == "lung_nodule"
    assert reg.resolve("effusion").name == reg.resolve("Pleural Effusion").name == "pleural_effusion"
    for k, name in enumerate(LESIONS, start=1):
        s = reg.get(name)
        assert s.category == "lesion" and s.ids == {"lesion": k} and "total" not in s.ids
        assert s.label_value == LESION_LABEL_BASE + k and not s.excluded
    assert reg.get("heart").label_value == 51 and reg.get("lungs").label_value is None
    assert max(reg.label_table("total")) < LESION_LABEL_BASE  # lesion values never meet a `total` id
    ordinary = structures_present(case.label_ids())
    assert "lung_left" in ordinary and not set(LESIONS) & set(ordinary)
    assert structures_present([*case.label_ids(), LESION_LABEL_BASE + 1])[-1] == "lung_nodule"


@pytest.mark.parametrize("pose", [PatientPose(sod=1650.0),
                                  PatientPose(tx=6.0, tz=-5.0, rx=2.0, ry=-3.0, rz=4.0, sod=1600.0)])
def test_a_nodule_projects_to_its_disc_at_its_centre_and_shows_in_the_drr(volume, sites, pose):
    centre, diameter = np.array([24.0, 3.0, 10.0]), 16.0  # in the right lung (x > 0)
    with_nodule, nodule = add_nodule(volume, centre, diameter, hu=40.0, sites=sites)
    assert nodule["side"] == "right" and nodule["diameter_mm"] == diameter
    assert nodule["volume_ml"] == pytest.approx(np.pi / 6 * diameter ** 3 / 1000, rel=0.05)
    names = ["lung_nodule", "lung_right", "pleural_effusion"]
    image, masks, absent, truncated = _render(with_nodule, names, pose)
    plain, plain_masks, _, _ = _render(with_lesion_labels(volume), names, pose)
    mask = masks[0]
    assert list(absent) == [False, False, True] and not truncated.any()
    assert not plain_masks[0].any() and (plain_masks[1] == masks[1]).all()  # lungs still seen through it

    # place: the mask's centroid is where the ball's centre projects
    det = NOISELESS.detector_geometry()
    (row, col), = project_points(centre[None], "pa", det, pose, with_nodule.isocentre)
    rr, cc = np.nonzero(mask)
    assert abs(rr.mean() + 0.5 - row) < 1.0 and abs(cc.mean() + 0.5 - col) < 1.0
    # size: the disc where a ray crosses more than the mask threshold of the ball, magnified
    ends = project_points(np.array([centre - [diameter / 2, 0, 0], centre + [diameter / 2, 0, 0]]), "pa", det, pose,
                          with_nodule.isocentre)
    radius_px = np.linalg.norm(ends[1] - ends[0]) / 2
    inner = np.sqrt(1 - (NOISELESS.mask_threshold_mm / diameter) ** 2)  # chord longer than the threshold
    assert mask.sum() == pytest.approx(np.pi * (radius_px * inner) ** 2, rel=0.15)

    # the DRR shows it: denser inside its mask than in a ring around it, against the render without it
    ring = ndimage.binary_dilation(mask, iterations=8) & ~ndimage.binary_dilation(mask, iterations=3)
    gain = image - plain
    assert gain[mask].mean() > 0.03 and gain[mask].mean() > gain[ring].mean() + 0.03
    assert image[mask].mean() > image[ring].mean()


def test_an_effusion_fills_the_base_of_its_lung_and_the_lung_loses_it(volume, sites):
    names = ["pleural_effusion", "lung_left", "lung_right", "lung_nodule"]
    _, before, _, _ = _render(with_lesion_labels(volume), names)
    lo, hi = sites.sides["left"].z_range_mm
    fluid, effusion = add_effusion(volume, "left", 0.3, hu=10.0, sites=sites)
    assert effusion["side"] == "left" and effusion["height_mm"] == pytest.approx(0.3 * (hi - lo))
    assert effusion["top_z_mm"] == pytest.approx(lo + effusion["height_mm"])
    _, after, absent, _ = _render(fluid, names)
    eff, lung_before, lung_after = after[0], before[1], after[1]
    assert list(absent) == [False, False, False, True]
    n = 192
    rr, cc = np.nonzero(eff)
    rl, _ = np.nonzero(lung_before)
    # the patient's left lung: the right half of a PA image
    assert cc.min() >= n // 2 and cc.mean() > n / 2
    # at the bottom of that lung's field, up to the level's projection
    assert (eff & lung_before).sum() >= 0.95 * eff.sum()
    assert abs(rr.max() - rl.max()) <= 1
    (top_row, _), = project_points(np.array([[-24.0, 3.0, effusion["top_z_mm"]]]), "pa",
                                   NOISELESS.detector_geometry(), PatientPose(sod=1650.0), fluid.isocentre)
    assert abs(rr.min() - top_row) <= 2 and rr.min() > rl.mean()
    # the lung loses those pixels; the other lung is untouched
    assert not (lung_after & ~lung_before).any()
    assert (eff & lung_after).sum() < 0.05 * eff.sum()
    assert lung_before.sum() - lung_after.sum() > 0.9 * eff.sum()
    assert (after[2] == before[2]).all()
    # in the volume: no voxel of the left lung is left below the level, none above it became fluid
    fluid_index = int(np.flatnonzero(fluid.label_ids == LESION_LABEL_BASE + 2)[0])
    z = fluid.affine[2, 2] * np.arange(fluid.labels.shape[2]) + fluid.affine[2, 3]
    left = np.isin(fluid.labels, label_groups(["lung_left"], fluid.label_ids)[0].include)
    assert not (left & (z <= effusion["top_z_mm"])).any()
    assert not ((fluid.labels == fluid_index) & (z > effusion["top_z_mm"])).any()


def test_insert_lesions_respects_the_ranges_and_is_deterministic(volume, sites):
    lungs = label_groups(["lungs"], volume.label_ids)[0].include
    was_lung = np.isin(volume.labels, lungs)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in volume.labels.shape], indexing="ij"), axis=-1)
    world = grid * np.diag(volume.affine)[:3] + volume.affine[:3, 3]
    kinds = []
    for seed in range(6):
        out, lesions = insert_lesions(volume, np.random.default_rng(seed), SMALL, sites=sites)
        nodule = int(np.flatnonzero(out.label_ids == LESION_LABEL_BASE + 1)[0])
        nodules = [d for d in lesions if d["kind"] == "lung_nodule"]
        effusion = [d for d in lesions if d["kind"] == "pleural_effusion"]
        kinds.append(bool(effusion))
        assert 1 <= len(nodules) <= 3 and len(effusion) <= 1
        assert (out.labels == nodule).sum() == pytest.approx(sum(d["volume_ml"] for d in nodules) * 1000 / 8)
        assert not ((out.labels == nodule) & ~was_lung).any()  # only lung voxels became nodule
        for d in nodules:
            assert 6.0 <= d["diameter_mm"] <= 12.0 and -50.0 <= d["hu"] <= 50.0 and d["side"] in ("left", "right")
            ball = np.linalg.norm(world - np.asarray(d["centre_mm"]), axis=-1) <= d["diameter_mm"] / 2
            assert (out.labels[ball] == nodule).all()  # the whole ball, inside the lung
            # at least the margin inside the lung: the ball grown by it holds only lung
            grown = np.linalg.norm(world - np.asarray(d["centre_mm"]), axis=-1) <= d["diameter_mm"] / 2 + 2.0
            assert was_lung[grown].all()
            if effusion and effusion[0]["side"] == d["side"]:
                assert d["centre_mm"][2] - d["diameter_mm"] / 2 >= effusion[0]["top_z_mm"] + 2.0
        for e in effusion:
            lo, hi = sites.sides[e["side"]].z_range_mm
            assert 0.15 <= e["height_mm"] / (hi - lo) <= 0.4
        again, same = insert_lesions(volume, np.random.default_rng(seed), SMALL, sites=sites)
        assert same == lesions and np.array_equal(again.mu, out.mu) and np.array_equal(again.labels, out.labels)
    assert any(kinds) and not all(kinds)  # with probability 0.5 both happen in these seeds
    # the volume drawn from is left as it was
    assert volume.labels.max() < len(volume.label_ids) and len(volume.label_ids) + 2 == len(out.label_ids)


def test_impossible_or_inconsistent_lesions_are_refused(volume, sites):
    with pytest.raises(ValueError, match="fits a nodule"):
        insert_lesions(volume, np.random.default_rng(0), LesionRanges(nodule_diameter_mm=(40.0, 50.0)), sites=sites)
    for bad in (dict(nodules=(3, 1)), dict(nodule_diameter_mm=(20.0, 10.0)), dict(nodule_diameter_mm=(0.0, 5.0)),
                dict(effusion_height_fraction=(0.5, 1.5)), dict(effusion_probability=1.2),
                dict(nodule_sides=("middle",)), dict(nodule_hu=(60.0, -100.0))):
        with pytest.raises(ValueError):
            LesionRanges(**bad)
    with pytest.raises(ValueError, match="neither lung"):
        add_nodule(volume, [0.0, 0.0, 0.0], 10.0, sites=sites)  # the mediastinum


def _synth(case, path, n_images=6, **kw):
    args = dict(settings=replace(NOISELESS, image_size=48, detector=DetectorModel()), ranges=SMALL, n_copies=2,
                seed=3, pose_ranges=POSES, progress=False)
    args.update(kw)
    return ProjectedDataset(synthesize_lesion_dataset(case, path, n_images, **args))


@pytest.fixture(scope="module")
def dataset(case, tmp_path_factory):
    return _synth(case, tmp_path_factory.mktemp("lesions") / "ds")


def test_lesion_dataset_has_lesion_channels_columns_and_copy_splits(dataset):
    assert dataset.structures == ["lung_field_left", "lung_field_right", "lung_left", "lung_right", "heart",
                                  *LESIONS]
    idx = dataset.index
    assert len(dataset) == 6 and idx["image_id"].is_unique and set(idx["view"]) == {"pa"}
    for col in ("tx", "sod", "scale_x", "noise_seed", "lesion_seed", "n_nodules", "nodule_diameters_mm",
                "nodule_centres_mm", "has_effusion", "effusion_side", "effusion_height_mm", "effusion_volume_ml"):
        assert col in idx.columns
    nodule, fluid = dataset.channel("lung_nodule"), dataset.channel("pleural_effusion")
    for i, row in idx.iterrows():
        diameters = [float(v) for v in str(row["nodule_diameters_mm"]).split(";")]
        assert len(diameters) == row["n_nodules"] and all(6.0 <= d <= 12.0 for d in diameters)
        assert not dataset.absent[i, nodule] and dataset.mask(i, "lung_nodule").any()
        assert dataset.absent[i, fluid] == (not row["has_effusion"])  # an absent lesion: an empty target
        assert (row["effusion_side"] in ("left", "right")) == bool(row["has_effusion"])
    assert idx["has_effusion"].any() and not idx["has_effusion"].all()
    assert (idx.groupby("copy_id")["split"].nunique() == 1).all() and idx["copy_id"].nunique() == 2
    splits = json.loads((dataset.path / "splits.json").read_text())
    assert splits["unit"] == "copy"
    assert dataset.meta["lesions"]["seed"] == 3
    assert LesionRanges.from_dict(dataset.meta["lesions"]["ranges"]) == SMALL
    assert PoseRanges(**{k: tuple(v) for k, v in dataset.meta["cohort"]["pose_ranges"].items()}) == POSES


def test_same_seed_same_lesion_dataset_other_seed_differs(case, dataset, tmp_path):
    again = _synth(case, tmp_path / "again", threads=2)  # threads change the speed, not the images
    assert np.array_equal(again.images, dataset.images)
    assert np.array_equal(again.packed_masks, dataset.packed_masks)
    assert again.index.equals(dataset.index)
    other = _synth(case, tmp_path / "other", seed=4)
    assert not np.array_equal(other.images, dataset.images)


def test_a_volume_without_lesions_renders_exactly_as_before(case, dataset):
    row = dataset.index.iloc[0].to_dict()
    settings = dataset.meta["render_settings"]
    renderer = CaseRenderer(case, settings)
    anatomy = [s for s in dataset.structures if s not in LESIONS]
    image, masks, absent, truncated = renderer.render(row, 48, anatomy)  # the path without lesions
    volume, lesions = insert_lesions(renderer.volume, np.random.default_rng(0),
                                     LesionRanges(nodules=(0, 0), effusion_probability=0.0))
    assert lesions == []
    pose = PatientPose(**{k: row[k] for k in ("tx", "ty", "tz", "rx", "ry", "rz", "sod")})
    images2, masks2, absent2, truncated2 = render_views(volume, ["pa"], [pose], RenderSettings.from_dict(settings),
                                                        label_groups(dataset.structures, volume.label_ids),
                                                        [int(row["noise_seed"])])
    assert np.array_equal(images2[0], image)
    assert np.array_equal(masks2[0, :len(anatomy)], masks) and not masks2[0, len(anatomy):].any()
    assert list(absent2[0]) == [*absent, True, True] and list(truncated2[0]) == [*truncated, False, False]


def test_a_stored_lesion_row_renders_again(case, dataset):
    renderer = CaseRenderer(case, dataset.meta["render_settings"])
    ranges = LesionRanges.from_dict(dataset.meta["lesions"]["ranges"])
    for i in (0, 3):
        row = dataset.index.iloc[i].to_dict()
        image, masks, absent, truncated, lesions = render_lesion_row(renderer, row, ranges,
                                                                    structures=dataset.structures)
        assert np.array_equal(image, dataset.images[i]) and np.array_equal(masks, dataset.masks(i))
        assert np.array_equal(absent, dataset.absent[i]) and np.array_equal(truncated, dataset.truncated[i])
        assert sum(d["kind"] == "lung_nodule" for d in lesions) == row["n_nodules"]


def test_bad_input_fails_before_anything_is_written(case, tmp_path):
    with pytest.raises(ValueError, match="n_images"):
        synthesize_lesion_dataset(case, tmp_path / "a", 0, progress=False)
    with pytest.raises(ValueError, match="views"):
        synthesize_lesion_dataset(case, tmp_path / "b", 2, views=["ap"], progress=False)
    no_lungs = _case("nolungs")
    no_lungs.labelmap[np.isin(no_lungs.labelmap, [10, 11, 12, 13, 14])] = 0
    with pytest.raises(CTInputError, match="no lung labels"):
        synthesize_lesion_dataset(no_lungs, tmp_path / "c", 2, progress=False)
    assert not any(tmp_path.iterdir())
