"""Chapter 5 as executed in the smoke book: what a reader of the shift chapter relies on.

Every axis and magnitude the chapter was given is scored for the three predictors on
the same pairs; its unshifted point is the models' in-distribution score of chapters 3
and 4; and every verdict it prints is the one its interval gives.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

FIELDS = ["lung_field_left", "lung_field_right"]
MODELS = {"VLM", "U-Net", "mean-mask baseline"}


@pytest.fixture(scope="module")
def chapter(smoke_run):
    out = smoke_run.run_dir / "05_shift"
    return {
        "run_dir": smoke_run.run_dir,
        "out": out,
        "params": json.loads((out / "params.json").read_text()),
        "scores": pd.read_csv(out / "shift_scores.csv"),
        "metrics": json.loads((out / "metrics.json").read_text()),
    }


def test_every_axis_and_magnitude_is_scored_for_every_model_on_the_same_pairs(chapter):
    scores, params = chapter["scores"], chapter["params"]
    assert set(scores["axis"]) == set(params["axes"])
    assert set(scores["model"]) == MODELS
    for axis, mags in params["axes"].items():
        g = scores[(scores["axis"] == axis) & (scores["structure"].isin(params["structures"]))]
        assert sorted(set(g["magnitude"])) == sorted(float(m) for m in mags), axis
        pairs = {(m, model): set(zip(gm["image_id"], gm["structure"]))
                 for (m, model), gm in g.groupby(["magnitude", "model"])}
        none = pairs[(float(mags[0]), "VLM")]
        assert none and all(p <= none for p in pairs.values()), axis  # never a pair not scored unshifted
        assert len({frozenset(p) for (m, _), p in pairs.items() if m == float(mags[0])}) == 1
    assert scores["dice"].between(0, 1).all()


def test_unshifted_point_is_the_in_distribution_score(chapter):
    """The first point of every curve is what chapters 3 and 4 scored on the same images."""
    from chexanatomy_lib.ct.dataset import ProjectedDataset
    from chexanatomy_lib.evaluation.evaluate import evaluate_predictions
    from chexanatomy_lib.evaluation.predictions import load_predictions

    run_dir, scores, params = chapter["run_dir"], chapter["scores"], chapter["params"]
    ds = ProjectedDataset(run_dir / "01_ct_projection" / "dataset")
    for model, stage in (("VLM", "03_vlm_finetune"), ("U-Net", "04_unet_baseline")):
        per_image, _ = evaluate_predictions(load_predictions(run_dir / stage / "predictions" / "test.npz"), ds,
                                            params["split"], structures=FIELDS, n_boot=10, hd95_structures=[])
        per_image = per_image[per_image["view"].isin(params["views"])]
        axis = next(iter(params["axes"]))
        none = scores[(scores["axis"] == axis) & (scores["magnitude"] == float(params["axes"][axis][0]))
                      & (scores["model"] == model) & scores["structure"].isin(FIELDS)]
        assert len(none) == len(per_image)
        assert none["dice"].mean() == pytest.approx(per_image["dice"].mean(), abs=0.01), model


def test_verdicts_follow_their_intervals(chapter):
    table = pd.read_csv(chapter["out"] / "drop_differences.csv")
    assert len(table) and {"axis", "magnitude", "structure", "difference", "verdict"} <= set(table.columns)
    expected = np.where(table["difference_lo"] > 0, "A better",
                        np.where(table["difference_hi"] < 0, "A worse", "not distinguishable"))
    assert (table["verdict"] == expected).all()
    m = chapter["metrics"]
    lo, est, hi = (m[f"c2_geometric_vlm_minus_unet_drop_{c}"] for c in ("difference_lo", "difference",
                                                                        "difference_hi"))
    assert lo <= est <= hi
    assert m["n_images"] == len(chapter["scores"]["image_id"].unique())
