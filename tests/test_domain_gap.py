"""Domain-gap statistics and clinical measures on shapes whose answers are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from chexanatomy_lib.evaluation.clinical import cardiothoracic_ratio, ctr_errors
from chexanatomy_lib.evaluation.domain_gap import (
    intensity_gap, intensity_histograms, jensen_shannon, radial_power_spectrum, shape_gap, shape_statistics,
)


def _ellipse(h, w, cy, cx, ry, rx, angle_deg=0.0):
    yy, xx = np.mgrid[:h, :w] + 0.5
    t = np.deg2rad(angle_deg)
    # rotate the frame: positive angle leans the top of the long (vertical) axis to the image's right
    u = (yy - cy) * np.cos(t) - (xx - cx) * np.sin(t)
    v = (yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
    return (u / ry) ** 2 + (v / rx) ** 2 <= 1


def test_shape_statistics_of_known_shapes():
    m = np.zeros((4, 100, 100), bool)
    m[0, 20:60, 30:50] = True  # a 40 x 20 box
    m[1] = _ellipse(100, 100, 50, 50, 30, 10, angle_deg=20)
    m[2, 10:20, 10:90] = True
    m[2, 10:90, 10:20] = True  # an L: far from convex
    s = shape_statistics(m)
    assert s.at[0, "area_fraction"] == pytest.approx(0.08)
    assert s.at[0, "box_aspect"] == pytest.approx(2.0)
    assert s.at[0, "centroid_y"] == pytest.approx(39.5 / 100) and s.at[0, "centroid_x"] == pytest.approx(39.5 / 100)
    assert s.at[0, "box_fill"] == pytest.approx(1.0) and s.at[0, "convexity"] == pytest.approx(1.0)
    assert abs(s.at[0, "orientation_deg"]) < 1e-6
    assert s.at[1, "orientation_deg"] == pytest.approx(20.0, abs=1.5)
    mirrored = shape_statistics(m[1:2, :, ::-1])
    assert mirrored.at[0, "orientation_deg"] == pytest.approx(-s.at[1, "orientation_deg"], abs=1e-6)
    assert s.at[1, "convexity"] > 0.93 and s.at[2, "convexity"] < 0.5
    assert s.iloc[3].isna().all()  # empty mask


def test_shape_gap_is_zero_for_one_set_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    a = pd.DataFrame({"area_fraction": rng.normal(0.3, 0.05, 200)})
    same = shape_gap(a, a, statistics=["area_fraction"], n_boot=100)
    assert same.at["area_fraction", "wasserstein"] == pytest.approx(0.0)
    b = pd.DataFrame({"area_fraction": rng.normal(0.4, 0.05, 150)})
    far = shape_gap(a, b, statistics=["area_fraction"], n_boot=200)
    row = far.loc["area_fraction"]
    assert row["wasserstein"] == pytest.approx(0.1, abs=0.02)
    assert row["wasserstein_lo"] > 0.07 and row["standardised"] == pytest.approx(2.0, abs=0.4)


def test_intensity_measures():
    p = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert jensen_shannon(*p) == pytest.approx(1.0) and jensen_shannon(p[0], p[0]) == pytest.approx(0.0)
    images = np.full((2, 8, 8), 0.3)
    keep = np.zeros((2, 8, 8), bool)
    keep[:, :4] = True
    images[:, 4:] = 0.9
    h = intensity_histograms(images, bins=10, masks=keep)
    assert h.shape == (2, 10) and h[:, 3].tolist() == [1.0, 1.0]
    rng = np.random.default_rng(0)
    smooth = np.stack([np.outer(np.sin(np.linspace(0, 3, 64)), np.cos(np.linspace(0, 2, 64))) for _ in range(3)])
    noisy = rng.random((3, 64, 64))
    freq, spec = radial_power_spectrum(np.concatenate([smooth, noisy]))
    assert freq.shape == (32,) and 0 < freq[0] < freq[-1] <= 0.5
    assert spec[:3, -1].mean() < spec[3:, -1].mean() - 3  # white noise keeps power at high frequencies
    gap = intensity_gap(smooth * 0.5 + 0.5, noisy, n_boot=50)
    assert list(gap.index) == ["jensen_shannon", "wasserstein", "log_spectrum"]
    assert (gap["lo"] <= gap["value"] + 1e-12).all() and (gap["value"] <= gap["hi"] + 1e-12).all()
    same = intensity_gap(noisy, noisy, n_boot=20)
    assert same.at["jensen_shannon", "value"] == pytest.approx(0.0, abs=1e-12)


def test_cardiothoracic_ratio_from_masks():
    heart = np.zeros((2, 50, 100), bool)
    fields = np.zeros((2, 2, 50, 100), bool)
    heart[0, 20:35, 40:70] = True  # 30 px wide
    fields[0, 0, 5:40, 55:90] = True  # patient's left field, on the image's right
    fields[0, 1, 10:30, 10:45] = True  # right field; together rows 10..29 span 10..89: 80 px
    t = cardiothoracic_ratio(heart, fields)
    assert t.at[0, "heart_width"] == 30 and t.at[0, "thorax_width"] == 80
    assert t.at[0, "ctr"] == pytest.approx(30 / 80) and 10 <= t.at[0, "thorax_row"] < 30
    assert np.isnan(t.at[1, "ctr"])  # nothing drawn
    speck = heart.copy()
    speck[0, 45, 95] = True  # a stray pixel far to the side stretches the extent unless dropped
    assert cardiothoracic_ratio(speck, fields).at[0, "ctr"] == pytest.approx(30 / 80)
    assert cardiothoracic_ratio(speck, fields, largest_piece=False).at[0, "heart_width"] == 56
    assert cardiothoracic_ratio(heart, fields.any(1)).at[0, "ctr"] == pytest.approx(30 / 80)
    e = ctr_errors(t, t.assign(ctr=[0.6, np.nan]))
    assert e.at[0, "error"] == pytest.approx(0.6 - 0.375) and e.at[0, "same_call"] == 0.0
    with pytest.raises(ValueError, match="heart"):
        cardiothoracic_ratio(heart[0], fields)
