"""DRR and mask projection: geometry, orientation, magnification, detector model,
truncation flags, and agreement with DiffDRR, on phantom CTs made here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chexanatomy_lib.ct.cohort import SourceCT, compact_lookup, make_working_volume
from chexanatomy_lib.ct.detector import DetectorModel, hu_to_mu
from chexanatomy_lib.ct.geometry import PatientPose, magnification, patient_rays, project_points
from chexanatomy_lib.ct.io import CTCase, load_case
from chexanatomy_lib.ct.projector import RayMarcher, masks_from_path_lengths
from chexanatomy_lib.ct.synthesis import RenderSettings, label_groups, render_view
from ct_phantoms import make_phantom, make_phantom_case

SHAPE, SPACING = (96, 96, 64), (2.0, 2.0, 2.5)
HALF = np.asarray(SHAPE) * np.asarray(SPACING) / 2  # phantom half field of view (mm)
# heart sphere of the phantom (tests/ct_phantoms.py): centre and radius in mm, patient frame
HEART_CENTRE = np.array([-0.12 * HALF[0], 0.2 * HALF[1], -0.2 * HALF[2]])
HEART_RADIUS = 0.22 * HALF.min()
NAMES = ["lung_left", "lung_right", "lungs", "heart", "spine"]
SETTINGS = RenderSettings(image_size=128, field_mm=320.0, working_spacing_mm=1.0, step_mm=1.0,
                          detector=DetectorModel(photons_per_pixel=None))


def _case(ph, case_id="phantom") -> CTCase:
    return CTCase(case_id=case_id, volume=ph.volume.astype(np.float32), labelmap=ph.labelmap.astype(np.int16),
                  affine=ph.affine, spacing=np.asarray(SPACING))


@pytest.fixture(scope="module")
def volume():
    source = SourceCT.from_case(_case(make_phantom(SHAPE, SPACING)))
    return make_working_volume(source, SETTINGS.working_spacing_mm), label_groups(NAMES, source.label_ids)


def _render(volume, view, pose=PatientPose(), settings=SETTINGS):
    vol, groups = volume
    return render_view(vol, view, pose, settings, groups)


def _centroid(mask):
    r, c = np.nonzero(mask)
    return np.array([r.mean(), c.mean()])


def test_pa_orientation_radiological(volume):
    image, masks, absent, _ = _render(volume, "pa")
    m = dict(zip(NAMES, masks))
    mid = SETTINGS.image_size / 2
    assert not absent.any()
    # patient's right lung on the image's left, left lung on the right
    assert _centroid(m["lung_right"])[1] < mid < _centroid(m["lung_left"])[1]
    # the heart sits left of the midline (image right) and below the centre (head up)
    heart = _centroid(m["heart"])
    assert heart[1] > mid and heart[0] > mid
    # the spine (bone) is the brightest column of the image, near the midline
    assert abs(np.argmax(image.mean(axis=0)) - mid) < 0.1 * SETTINGS.image_size


def test_lateral_orientation_left_lateral(volume):
    _, masks, absent, _ = _render(volume, "lateral")
    m = dict(zip(NAMES, masks))
    mid = SETTINGS.image_size / 2
    assert not absent.any()
    # anterior (heart) on the image's left, posterior (spine) on the right, heart below centre
    heart, spine = _centroid(m["heart"]), _centroid(m["spine"])
    assert heart[1] < mid < spine[1]
    assert heart[0] > mid
    # both lungs project onto the same place in a lateral view
    lungs_l, lungs_r = _centroid(m["lung_left"]), _centroid(m["lung_right"])
    assert np.abs(lungs_l - lungs_r).max() < 0.05 * SETTINGS.image_size


@pytest.mark.parametrize("view", ["pa", "lateral"])
@pytest.mark.parametrize("sod", [1300.0, 1650.0])
def test_position_and_magnification_match_geometry(volume, view, sod):
    pose = PatientPose(tx=10.0, tz=-15.0, sod=sod)
    _, masks, _, _ = _render(volume, view, pose)
    heart = masks[NAMES.index("heart")]
    iso = volume[0].isocentre
    expected = project_points((iso + HEART_CENTRE)[None], view, SETTINGS.detector_geometry(), pose, iso)[0]
    # pixel centres sit at i + 0.5 in project_points' continuous coordinates
    assert np.allclose(_centroid(heart) + 0.5, expected, atol=0.75)
    # a sphere at depth d from the source projects to a disc of radius r * SID / d
    beam = {"pa": np.array([0.0, 1.0, 0.0]), "lateral": np.array([-1.0, 0.0, 0.0])}[view]
    depth = sod + HEART_CENTRE @ beam + np.array([10.0, 0.0, -15.0]) @ beam
    radius_px = np.sqrt(heart.sum() / np.pi)
    expected_px = HEART_RADIUS * SETTINGS.sid_mm / depth / SETTINGS.pixel_spacing_mm
    assert radius_px == pytest.approx(expected_px, rel=0.04)


def test_magnification_ratio_between_source_distances(volume):
    areas = {}
    for sod in (1300.0, 1700.0):
        _, masks, _, _ = _render(volume, "pa", PatientPose(sod=sod))
        areas[sod] = masks[NAMES.index("lungs")].sum()
    det = SETTINGS.detector_geometry()
    ratio = magnification(det, PatientPose(sod=1300.0)) / magnification(det, PatientPose(sod=1700.0))
    assert np.sqrt(areas[1300.0] / areas[1700.0]) == pytest.approx(ratio, rel=0.03)


def test_in_plane_rotation_turns_the_image(volume):
    # rotating the patient about the beam axis (y in PA) turns the projection in the image plane
    _, m0, _, _ = _render(volume, "pa")
    _, m90, _, _ = _render(volume, "pa", PatientPose(ry=90.0))
    heart0 = _centroid(m0[NAMES.index("heart")]) + 0.5 - SETTINGS.image_size / 2  # pixel centres at i + 0.5
    heart90 = _centroid(m90[NAMES.index("heart")]) + 0.5 - SETTINGS.image_size / 2
    # a quarter turn: same distance from the centre, perpendicular direction
    assert np.linalg.norm(heart0) == pytest.approx(np.linalg.norm(heart90), rel=0.05)
    assert abs(heart0 @ heart90) < 0.1 * np.linalg.norm(heart0) ** 2


def test_same_masks_whatever_the_voxel_order(tmp_path):
    """A CT stored R-A-S or L-A-S (as the bundled one) gives the same image and masks."""
    shape = (48, 48, 40)
    ras = load_case(*make_phantom_case(tmp_path, shape, SPACING, name="ras", flip_x=False))
    las = load_case(*make_phantom_case(tmp_path, shape, SPACING, name="las", flip_x=True))
    settings = RenderSettings(image_size=64, field_mm=200.0, detector=DetectorModel(photons_per_pixel=None))
    out = []
    for case in (ras, las):
        src = SourceCT.from_case(case)
        vol = make_working_volume(src, 2.0)
        out.append(render_view(vol, "pa", PatientPose(), settings, label_groups(NAMES, src.label_ids)))
    assert np.array_equal(out[0][1], out[1][1])
    assert np.allclose(out[0][0], out[1][0], atol=1e-4)


def test_path_length_through_a_block_is_its_thickness():
    mu = np.zeros((40, 40, 40), np.float32)
    lab = np.zeros((40, 40, 40), np.int64)
    lab[10:30, 15:25, 12:28] = 1  # 20 x 10 x 16 voxels of 1 mm
    mu[lab == 1] = 0.02
    affine = np.eye(4)
    affine[:3, 3] = -19.5
    marcher = RayMarcher(mu, lab, affine, n_labels=2, step_mm=0.25)
    source = np.array([0.0, -1000.0, 0.0])  # rays along +y
    pixels = np.array([[0.0, 1000.0, 0.0], [40.0, 1000.0, 0.0], [0.0, 1000.0, 60.0]])  # beside: x 20, z 30 at y 0
    line, path = marcher.project(source, pixels)
    assert path[0, 1] == pytest.approx(10.0, abs=0.3)  # through the block: its y thickness
    assert line[0] == pytest.approx(0.2, abs=0.01)  # 10 mm of 0.02 / mm
    assert path[1, 1] == 0 and path[2, 1] == 0  # rays beside the block miss it
    assert path[:, 0].max() < 40.5  # never more than the volume's depth


def test_masks_from_path_lengths_threshold_and_union():
    path = torch.tensor([[0.0, 2.0, 2.0], [0.0, 4.0, 0.0], [0.0, 0.5, 0.0]])
    m = masks_from_path_lengths(path, [[1], [2], [1, 2], []], threshold_mm=3.0)
    assert m.tolist() == [[False, True, False], [False, False, False], [True, True, False],
                          [False, False, False]]
    # a batch of images ([B, N, L] -> [B, S, N]) gives each image's masks
    batch = masks_from_path_lengths(torch.stack([path, path.flip(0)]), [[1], [2], [1, 2], []], threshold_mm=3.0)
    assert batch.shape == (2, 4, 3) and torch.equal(batch[0], m) and torch.equal(batch[1], m.flip(1))
    with pytest.raises(ValueError, match="threshold_mm"):
        masks_from_path_lengths(path, [[1]], threshold_mm=-1.0)


def test_compact_lookup_round_trip():
    lab = np.array([[[0, 5], [51, 5]]])
    compact, ids = compact_lookup(lab)
    assert ids.tolist() == [0, 5, 51]
    assert np.array_equal(ids[compact], lab)
    # no background voxel: index 0 is still "unlabelled"
    compact, ids = compact_lookup(np.array([[[7, 3]]]))
    assert ids.tolist() == [0, 3, 7] and compact.tolist() == [[[2, 1]]]


def test_detector_model_beer_lambert_noise_and_contrast():
    p = np.linspace(0.0, 6.0, 64 * 64).reshape(64, 64).astype(np.float32)
    det = DetectorModel(photons_per_pixel=1e4, window=(0.0, 6.0), gamma=1.0)
    a = det(p, np.random.default_rng(3))
    b = det(p, np.random.default_rng(3))
    assert a.dtype == np.float32 and a.shape == p.shape and 0 <= a.min() and a.max() <= 1
    assert np.array_equal(a, b)  # seeded
    assert not np.array_equal(a, det(p, np.random.default_rng(4)))
    clean = det(p)  # no rng: noiseless, the line integral itself through the window
    assert np.allclose(clean, p / 6.0, atol=1e-6)
    # denser is whiter on average, and noise grows with attenuation (fewer photons)
    assert a[-8:].mean() > a[:8].mean()
    assert np.std(a[-8:] - clean[-8:]) > np.std(a[:8] - clean[:8])
    assert hu_to_mu(np.array([-1000.0, 0.0, -2048.0]), 0.02).tolist() == pytest.approx([0.0, 0.02, 0.0])


def test_truncation_and_absence_flags(volume):
    # the spine runs through the top and bottom slices: truncated in both views;
    # the heart is inside the volume: not truncated
    for view in ("pa", "lateral"):
        _, _, absent, truncated = _render(volume, view)
        assert truncated[NAMES.index("spine")] and not truncated[NAMES.index("heart")]
    # a patient shifted out of the field: every structure absent (empty, not truncated)
    _, masks, absent, truncated = _render(volume, "pa", PatientPose(tx=600.0))
    assert absent.all() and not masks.any() and not truncated.any()
    # shifted half out: the lung cut by the image border is truncated
    _, masks, absent, truncated = _render(volume, "pa", PatientPose(tx=120.0))  # towards his right: image content moves left
    k = NAMES.index("lung_right")
    assert not absent[k] and truncated[k] and masks[k][:, 0].any()


def test_agreement_with_diffdrr_on_a_phantom():
    from diffdrr.drr import DRR
    from torchio import LabelMap, ScalarImage, Subject

    ph = make_phantom((64, 64, 48), SPACING)
    case = _case(ph)
    settings = RenderSettings(image_size=96, field_mm=240.0, working_spacing_mm=1.0, step_mm=0.5,
                              detector=DetectorModel(photons_per_pixel=None))
    src = SourceCT.from_case(case)
    vol = make_working_volume(src, settings.working_spacing_mm)
    groups = label_groups(NAMES, src.label_ids)
    mu = torch.from_numpy(hu_to_mu(ph.volume))
    lab = torch.from_numpy(ph.labelmap.astype(np.int64))
    subject = Subject(volume=ScalarImage(tensor=mu[None], affine=ph.affine),
                      density=ScalarImage(tensor=mu[None], affine=ph.affine),
                      mask=LabelMap(tensor=lab[None], affine=ph.affine), reorient=torch.eye(4))
    det = settings.detector_geometry()
    drr = DRR(subject, sdd=det.sid, height=det.height, delx=det.pixel_spacing)
    for view in ("pa", "lateral"):
        pose = PatientPose(rz=10.0, tx=5.0)
        _, masks, _, _ = render_view(vol, view, pose, settings, groups)
        s, p = patient_rays(view, det, pose, vol.isocentre)
        s = torch.tensor(s, dtype=torch.float32)[None, None]
        p = torch.tensor(p, dtype=torch.float32)[None]
        with torch.no_grad():
            line_ref = drr.render(mu, s, p)[0, 0].numpy()
            path_ref = drr.render(torch.ones_like(mu), s, p, mask_to_channels=True)[0]  # [C, N] mm
        path_ref = path_ref[torch.as_tensor(src.label_ids)].T
        marcher = RayMarcher(vol.mu, vol.labels, vol.affine, len(vol.label_ids), settings.step_mm)
        line, _ = marcher.project(*patient_rays(view, det, pose, vol.isocentre))
        # trilinear resampling to 1 mm vs exact voxel crossings: close, not identical
        assert np.corrcoef(line.numpy(), line_ref)[0, 1] > 0.99
        assert np.abs(line.numpy() - line_ref).mean() < 0.03 * line_ref.mean(), (view, np.abs(line.numpy() - line_ref).mean(), line_ref.mean())
        for name in ("lungs", "heart", "lung_left"):
            g = groups[NAMES.index(name)].include
            ref = (path_ref[:, g].sum(1) > settings.mask_threshold_mm).numpy().reshape(det.height, det.width)
            ours = masks[NAMES.index(name)]
            dice = 2 * (ours & ref).sum() / (ours.sum() + ref.sum())
            assert dice > 0.95, (view, name, dice)


def test_gpu_layout_traces_the_same_rays(volume):
    """The GPU path (rays of several images together, longest first, step-major
    samples, counts by index_add_) gives what the CPU path gives, here on the CPU."""
    from chexanatomy_lib.ct.synthesis import render_views

    vol, groups = volume
    views, poses = ["pa", "lateral", "pa"], [PatientPose(), PatientPose(rz=20.0, tx=15.0), PatientPose(sod=1300.0)]
    cpu = RayMarcher(vol.mu, vol.labels, vol.affine, len(vol.label_ids), SETTINGS.step_mm)
    gpu_like = RayMarcher(vol.mu, vol.labels, vol.affine, len(vol.label_ids), SETTINGS.step_mm,
                          layout="steps", chunk_rays=5000)
    a = render_views(vol, views, poses, SETTINGS, groups, marcher=cpu)
    b = render_views(vol, views, poses, SETTINGS, groups, marcher=gpu_like)
    for x, y in zip(a, b):
        assert np.array_equal(x, y) if x.dtype == bool else np.allclose(x, y, atol=1e-5)
    # one image of the batch is the image rendered alone
    one = _render(volume, "lateral", poses[1])
    assert np.array_equal(one[1], a[1][1]) and np.allclose(one[0], a[0][1], atol=1e-6)


def test_smooth_masks_equals_blurring_the_whole_image():
    """Blurring each mask only around its support gives the whole-image blur (edges replicated)."""
    import torch.nn.functional as F

    from chexanatomy_lib.ct.projector import gaussian_blur_2d, smooth_masks

    rng = np.random.default_rng(0)
    masks = torch.zeros(4, 40, 48, dtype=torch.bool)
    masks[0, 5:20, 7:30] = torch.from_numpy(rng.random((15, 23)) < 0.7)  # ragged blob inside
    masks[1, 30:40, 0:12] = True  # touches two image borders
    masks[2, 10:11, 10:40] = True  # one pixel thick: thinner than two sigma, dropped
    sigma = 1.3
    r = int(np.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1.0) / sigma) ** 2)
    k = k / k.sum()
    x = masks.float()[:, None]
    ref = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    ref = F.conv2d(F.pad(ref, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))[:, 0]
    assert torch.allclose(gaussian_blur_2d(masks.float(), sigma), ref, atol=1e-6)
    out = smooth_masks(masks, sigma)
    assert out.dtype == torch.bool and torch.equal(out, ref > 0.5)
    assert out[1, 30:40, 0:8].all()  # a mask cut by the border keeps its border
    assert not out[2].any() and not out[3].any()
    assert torch.equal(smooth_masks(masks, 0.0), masks)


def test_mask_smoothing_brings_a_voxelised_sphere_closer_to_its_true_outline():
    """Read voxel by voxel, a sphere projects as a staircase; smoothing by one working voxel
    (the calibrated value) makes the mask agree better with the disc it should be, and
    better than half a voxel or one and a half."""
    source = SourceCT.from_case(_case(make_phantom(SHAPE, SPACING)))
    vol = make_working_volume(source, 2.0)
    groups = label_groups(NAMES, source.label_ids)
    pose = PatientPose(tx=1.3, tz=-0.7, ry=7.0)
    agreement = {}
    for smoothing in (0.0, 1.0, 2.0, 3.0):
        settings = RenderSettings(image_size=448, field_mm=320.0, working_spacing_mm=2.0, step_mm=0.5,
                                  mask_smoothing_mm=smoothing, detector=DetectorModel(photons_per_pixel=None))
        _, masks, _, _ = render_view(vol, "pa", pose, settings, groups)
        heart = masks[NAMES.index("heart")]
        centre = project_points((vol.isocentre + HEART_CENTRE)[None], "pa", settings.detector_geometry(), pose,
                                vol.isocentre)[0]
        radius = HEART_RADIUS * settings.sid_mm / (pose.sod + HEART_CENTRE[1]) / settings.pixel_spacing_mm
        yy, xx = np.mgrid[:448, :448] + 0.5
        disc = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2
        agreement[smoothing] = 2 * (heart & disc).sum() / (heart.sum() + disc.sum())
        assert heart.sum() == pytest.approx(disc.sum(), rel=0.05)  # no dilation or erosion to speak of
    assert agreement[2.0] > agreement[0.0] + 0.005
    assert agreement[2.0] > max(agreement[1.0], agreement[3.0])  # best at about one voxel
    with pytest.raises(ValueError, match="mask_smoothing_mm"):
        RenderSettings(mask_smoothing_mm=-1.0)


def test_a_lung_field_loses_exactly_the_pixels_a_heart_covers(volume):
    """SCR's lung-field rule on a phantom: the lung behind (and in front of) the heart block
    is cut out of the left lung field, pixel for pixel, and nothing else is."""
    vol, _ = volume
    names = ["lung_left", "heart", "lung_field_left"]
    groups = label_groups(names, vol.label_ids)
    assert groups[2].include == groups[0].include and groups[1].include[0] in groups[2].exclude
    for view in ("pa", "lateral"):
        _, masks, absent, _ = render_view(vol, view, PatientPose(), SETTINGS, groups)
        lung, heart, field = masks
        assert (lung & heart).any() and (lung & ~heart).any()  # the heart covers part of the lung
        np.testing.assert_array_equal(field, lung & ~heart)
        assert not absent[2]


def test_excluded_labels_take_pixels_out_of_a_group():
    from chexanatomy_lib.ct.synthesis import LabelGroup

    path = torch.tensor([[5.0, 0.0, 0.0], [5.0, 4.0, 0.0], [5.0, 2.0, 2.0], [0.0, 9.0, 0.0]])  # [N=4 rays, L=3]
    m = masks_from_path_lengths(path, [LabelGroup([0], [1, 2]), [0], LabelGroup([1], [])], threshold_mm=3.0)
    # ray 1 crosses 4 mm of label 1: out; ray 2 crosses 2 + 2 mm of the excluded labels: out too
    assert m.tolist() == [[True, False, False, False], [True, True, True, False], [False, True, False, True]]
