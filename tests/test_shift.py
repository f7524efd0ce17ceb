"""Shift axes: rendered ones move the phantom's anatomy where plain geometry says it
must go, image-space ones change what they claim and nothing else, and the shift sets
are scored on the same pairs at every magnitude."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from chexanatomy_lib.augment import AffineParams, apply_affine
from chexanatomy_lib.ct.dataset import ProjectedDataset
from chexanatomy_lib.ct.geometry import PatientPose, project_points
from chexanatomy_lib.ct.manifest import load_manifest
from chexanatomy_lib.ct.cohort import PoseRanges
from chexanatomy_lib.ct.shift import RENDERED_SHIFTS, render_shifted, rendered_shift
from chexanatomy_lib.ct.synthesis import POSE_COLUMNS, RenderSettings, synthesize_dataset
from chexanatomy_lib.evaluation.metrics import bootstrap_ratio, dice
from chexanatomy_lib.evaluation.perturbations import IMAGE_SHIFTS, perturb
from chexanatomy_lib.evaluation.shift import (
    SHIFT_AXES, ShiftSets, drop_difference, pooled_drop_difference, relative_robustness, score_shifted, shift_axis,
)
from ct_phantoms import HEART, LOBES_LEFT, make_phantom, make_phantom_case

SHAPE, SPACING = (64, 64, 48), (2.0, 2.0, 2.5)
SIZE = 96
STRUCTURES = ["lungs", "lung_left", "heart"]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A dataset of the phantom, undeformed and in the nominal pose, with its manifest."""
    tmp = tmp_path_factory.mktemp("shift")
    ct, lab = make_phantom_case(tmp, SHAPE, SPACING, name="ph")
    manifest = tmp / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"name": "ph", "cases": [{"case_id": "ph", "ct": str(ct), "labels": str(lab)}]}))
    settings = RenderSettings(field_mm=300.0, working_spacing_mm=2.0, step_mm=1.0)
    path = synthesize_dataset(load_manifest(manifest), tmp / "ds", image_size=SIZE, n_copies=3, poses_per_copy=1,
                              settings=settings, amplitude_mm=0.0, scale_range=0.0, structures=STRUCTURES,
                              pose_ranges=PoseRanges((0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1700.0, 1700.0)),
                              progress=False)
    ds = ProjectedDataset(path)
    ph = make_phantom(SHAPE, SPACING)
    centres = {}  # world (mm, RAS+) centre of each structure's labels
    for name, ids in (("heart", [HEART]), ("lung_left", list(LOBES_LEFT.values()))):
        voxel = np.argwhere(np.isin(ph.labelmap, ids)).mean(0)
        centres[name] = ph.affine[:3, :3] @ voxel + ph.affine[:3, 3]
    return {"dataset": ds, "manifest": manifest, "centres": centres}


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(0) + 0.5  # pixel centres at i + 0.5, as project_points


GEOMETRIC = [("oblique", 45.0), ("lordotic", 20.0), ("in_plane", 30.0), ("magnification", 1.3),
             ("off_centre_si", 30.0), ("off_centre_lr", 30.0)]


@pytest.mark.parametrize("view", ["pa", "lateral"])
@pytest.mark.parametrize("axis,magnitude", GEOMETRIC)
def test_rendered_axis_moves_the_heart_where_geometry_puts_it(phantom, view, axis, magnitude):
    ds = phantom["dataset"]
    i = int(np.flatnonzero(ds.index["view"] == view)[0])
    row = ds.index.iloc[i].to_dict()
    sets = ShiftSets(ds, STRUCTURES, manifest=phantom["manifest"])
    renderer = sets._renderer("ph")
    shifted = render_shifted(renderer, row, axis, magnitude, SIZE, STRUCTURES)
    new_row, settings = rendered_shift(axis).change(dict(row), renderer.settings, magnitude)
    detector = settings.detector_geometry().resized(SIZE)
    iso = renderer.volume.isocentre

    def expected(name, r):
        return project_points(phantom["centres"][name][None], r["view"], detector,
                              PatientPose(**{c: float(r[c]) for c in POSE_COLUMNS}), iso)[0]

    moved = 0.0
    for name in ("heart", "lung_left"):
        k = STRUCTURES.index(name)
        before, after = _centroid(ds.mask(i, name)), _centroid(shifted.masks[k])
        assert np.abs(before - expected(name, row)).max() < 1.0, name  # the frame itself is right
        assert np.abs(after - expected(name, new_row)).max() < 1.0, (name, after, expected(name, new_row))
        moved = max(moved, np.abs(after - before).max())
        if axis == "magnification":  # an ellipsoid's shadow grows with the square of the magnification
            ratio = shifted.masks[k].sum() / ds.mask(i, name).sum()
            assert ratio == pytest.approx(magnitude ** 2, rel=0.1), name
    if (axis, view) == ("off_centre_lr", "lateral"):  # along the beam: nothing moves across the film
        assert moved < 1.0
    else:  # the anatomy did move (pixels; the phantom is small and its heart near the isocentre)
        assert moved > 1.2


def test_in_plane_rendering_agrees_with_rotating_the_image(phantom):
    """A rotation about the beam is what a 2D rotation of the film shows, in the same sense."""
    ds = phantom["dataset"]
    renderer = ShiftSets(ds, STRUCTURES, manifest=phantom["manifest"])._renderer("ph")
    for view in ("pa", "lateral"):
        i = int(np.flatnonzero(ds.index["view"] == view)[0])
        shifted = render_shifted(renderer, ds.index.iloc[i], "in_plane", 20.0, SIZE, STRUCTURES)
        _, rotated = apply_affine(ds.images[i], ds.masks_for([i], STRUCTURES)[0], AffineParams(rotation_deg=20.0))
        _, wrong_way = apply_affine(ds.images[i], ds.masks_for([i], STRUCTURES)[0], AffineParams(rotation_deg=-20.0))
        lungs = STRUCTURES.index("lung_left")
        assert dice(shifted.masks[lungs], rotated[lungs]) > 0.9
        assert dice(shifted.masks[lungs], rotated[lungs]) > dice(shifted.masks[lungs], wrong_way[lungs]) + 0.05


def test_collimation_blanks_the_closed_field_and_cuts_the_references(phantom):
    ds = phantom["dataset"]
    renderer = ShiftSets(ds, STRUCTURES, manifest=phantom["manifest"])._renderer("ph")
    i = int(np.flatnonzero(ds.index["view"] == "pa")[0])
    shifted = render_shifted(renderer, ds.index.iloc[i], "collimation", 0.5, SIZE, STRUCTURES)
    lo, hi = 24, SIZE - 24
    closed = np.ones((SIZE, SIZE), bool)
    closed[lo:hi, lo:hi] = False
    assert (shifted.image[closed] == 1.0).all() and shifted.image[~closed].min() < 0.5
    assert not shifted.masks[:, closed].any()
    full = ds.masks_for([i], STRUCTURES)[0]
    assert np.array_equal(shifted.masks, full & ~closed)  # cut, otherwise unchanged
    with pytest.raises(ValueError, match="collimation"):
        RenderSettings(collimation=1.0)


def test_lower_dose_adds_quantum_noise(phantom):
    from scipy.ndimage import gaussian_filter

    ds = phantom["dataset"]
    renderer = ShiftSets(ds, STRUCTURES, manifest=phantom["manifest"])._renderer("ph")
    row = ds.index.iloc[0]
    noise = []
    for m in (1.0, 16.0, 256.0):
        image = render_shifted(renderer, row, "dose", m, SIZE, STRUCTURES).image
        noise.append(np.std(image - gaussian_filter(image, 1.0)))
    assert noise[0] < noise[1] < noise[2]
    assert np.array_equal(render_shifted(renderer, row, "dose", 1.0, SIZE, STRUCTURES).image, ds.images[0])
    with pytest.raises(ValueError, match="dose reduction"):
        render_shifted(renderer, row, "dose", 0.5, SIZE, STRUCTURES)


def test_every_axis_at_none_changes_nothing_and_unknown_axes_are_named():
    rng = np.random.default_rng(0)
    images = rng.random((2, 32, 32)).astype(np.float32)
    masks = rng.random((2, 3, 32, 32)) > 0.5
    for name, axis in IMAGE_SHIFTS.items():
        im, mk = perturb(images, masks, name, axis.none)
        assert np.array_equal(im, images) and np.array_equal(mk, masks), name
    assert set(SHIFT_AXES) == set(RENDERED_SHIFTS) | set(IMAGE_SHIFTS)
    assert all(a.magnitudes[0] == a.none and a.family in ("geometric", "appearance") for a in SHIFT_AXES.values())
    with pytest.raises(ValueError, match="unknown shift axis 'tilt'.*oblique"):
        shift_axis("tilt")


def test_image_axes_change_what_they_say():
    rng = np.random.default_rng(1)
    image = rng.random((1, 64, 64)).astype(np.float32)
    masks = np.zeros((1, 1, 64, 64), bool)
    masks[0, 0, 10:30, 40:50] = True
    # geometric: the mask moves with the image; appearance: the mask stays
    _, up = perturb(image, masks, "shift_2d", 0.125)
    assert np.array_equal(up[0, 0], np.roll(masks[0, 0], -8, axis=0))
    for name in ("blur", "contrast", "gamma", "scatter", "invert", "markers"):
        im, mk = perturb(image, masks, name, IMAGE_SHIFTS[name].magnitudes[-1])
        assert np.array_equal(mk, masks) and not np.array_equal(im, image), name
        assert im.min() >= 0 and im.max() <= 1, name
    inv, _ = perturb(image, masks, "invert", 1)
    np.testing.assert_allclose(inv, 1 - image, atol=1e-6)
    low, _ = perturb(image, masks, "contrast", 0.5)
    assert low.std() == pytest.approx(0.5 * image.std(), rel=1e-4)
    a, _ = perturb(image, masks, "markers", 2, seeds=[5])
    b, _ = perturb(image, masks, "markers", 2, seeds=[5])
    c, _ = perturb(image, masks, "markers", 2, seeds=[6])
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert (a == 1.0).sum() > (image == 1.0).sum() + 100  # white plates
    with pytest.raises(ValueError, match="invert takes 0"):
        perturb(image, masks, "invert", 0.5)
    with pytest.raises(ValueError, match=r"images \[N, H, W\] and masks"):
        perturb(image[0], masks, "blur", 1)


def test_shift_sets_score_the_same_pairs_at_every_magnitude(phantom):
    ds = phantom["dataset"]
    sets = ShiftSets(ds, STRUCTURES, manifest=phantom["manifest"])
    idx = np.flatnonzero(ds.index["view"] == "pa")
    perfect, frozen = [], []
    for axis, mags in (("off_centre_lr", [25.0, 50.0]), ("rotation_2d", [0.0, 15.0])):
        s = sets.shifted_set(axis, idx, mags, progress=False)
        assert list(dict.fromkeys(s.table["magnitude"])) == [0.0, *(m for m in mags if m)]  # none added first
        assert len(s) == len(idx) * len({0.0, *mags})
        base = s.scored[np.arange(len(s)) % len(idx)]  # each image's pairs scored unshifted
        assert not (s.scored & ~base).any()  # never more pairs than in distribution
        if axis == "rotation_2d":
            assert np.array_equal(s.scored, base)
        n, k = len(s), len(STRUCTURES)
        boxes = np.full((n, k, 4), np.nan, np.float32)
        perfect.append(score_shifted(s, s.masks, boxes, np.ones((n, k), bool)).assign(model="perfect"))
        still = s.masks[np.arange(n) % len(idx)]  # the unshifted references, whatever the image
        frozen.append(score_shifted(s, still, boxes, np.ones((n, k), bool)).assign(model="frozen"))
    import pandas as pd

    perfect, frozen = pd.concat(perfect), pd.concat(frozen)
    assert (perfect["dice"] == 1).all()
    ratios = relative_robustness(perfect, n_boot=50)
    np.testing.assert_allclose(ratios["ratio"], 1.0)
    diff = drop_difference(perfect, frozen, ["heart"], n_boot=200, together={"lungs": ["lung_left"]})
    shifted_rows = diff.xs("heart", level="structure")
    assert (shifted_rows["difference"] > 0).all() and (shifted_rows["verdict"] == "A better").all()
    pooled = pooled_drop_difference(perfect, frozen, {"off_centre_lr": 50.0, "rotation_2d": 15.0}, "heart",
                                    name="both", n_boot=200)
    assert list(pooled.index) == ["off_centre_lr", "rotation_2d", "both"]
    assert pooled.at["both", "verdict"] == "A better"
    assert pooled.at["both", "difference"] == pytest.approx(pooled.loc[["off_centre_lr", "rotation_2d"],
                                                                       "difference"].mean())


def test_bootstrap_ratio():
    est, lo, hi = bootstrap_ratio([1.0, 2.0, 3.0, np.nan], [2.0, 4.0, 6.0, 1.0], n_boot=200)
    assert est == pytest.approx(0.5) and lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    assert np.isnan(bootstrap_ratio([], [])[0])
    with pytest.raises(ValueError, match="pair up"):
        bootstrap_ratio([1.0], [1.0, 2.0])


def test_image_axes_apply_to_any_images_but_rendered_ones_need_the_ct():
    from chexanatomy_lib.evaluation.shift import image_shifted_set

    rng = np.random.default_rng(2)
    images = rng.random((3, 32, 32)).astype(np.float32)
    masks = np.zeros((3, 1, 32, 32), bool)
    masks[:, 0, 8:20, 8:20] = True
    scored = np.array([[True], [False], [True]])
    s = image_shifted_set(images, masks, scored, ["a", "b", "c"], ["real"] * 3, ["heart"], "rotation_2d", [20.0])
    assert list(s.table["magnitude"]) == [0.0] * 3 + [20.0] * 3 and list(s.table["image_id"][:3]) == ["a", "b", "c"]
    assert np.array_equal(s.images[:3], images) and not np.array_equal(s.masks[3:], masks)
    assert np.array_equal(s.scored, np.concatenate([scored, scored]))
    with pytest.raises(ValueError, match="rendered from the CT"):
        image_shifted_set(images, masks, scored, ["a", "b", "c"], ["real"] * 3, ["heart"], "oblique", [10.0])
