"""Chapter 1 as executed in the smoke book: the cohort is framed like real films.

The real set is the 435 two-lung masks of torchxrayvision's wheel; targets of the
calibration: the median vertical centroid of the PA lung fields within 10 % of the
real median and the mean-mask Dice within 0.05 of the real set's. The median area
fraction is reported with its gap (this CT's lung fields are taller and fill less of
their box than the real, mostly heart-inclusive, annotations: see the chapter).
"""

from __future__ import annotations

import json

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def chapter(smoke_run):
    out = smoke_run.run_dir / "01_ct_projection"
    return {"out": out, "metrics": json.loads((out / "metrics.json").read_text()),
            "calibration": pd.read_csv(out / "lung_field_calibration.csv", index_col=0)}


def test_lung_fields_sit_and_vary_like_real_ones(chapter):
    m = chapter["metrics"]
    real, ours = m["real_lung_field_centroid_y_median"], m["lung_field_centroid_y_median"]
    assert abs(ours - real) <= 0.10 * real, (ours, real)
    assert abs(m["lung_field_mean_mask_dice"] - m["real_lung_field_mean_mask_dice"]) <= 0.05
    assert 0.30 < m["real_lung_field_area_fraction_median"] < 0.36  # the real set as it is read
    cal = chapter["calibration"]
    assert cal.at["centroid_y median", "met"] and cal.at["mean-mask Dice", "met"]
    # `met` is computed from the numbers, for the area too
    area = cal.loc["area_fraction median"]
    assert bool(area["met"]) == (abs(area["projected"] - area["real"]) <= 0.10 * area["real"])


def test_the_baseline_scores_the_pa_lung_fields_whole(chapter):
    m = chapter["metrics"]
    assert 0.7 < m["baseline_dice_lung_field_left"] < 0.95 and 0.7 < m["baseline_dice_lung_field_right"] < 0.95
