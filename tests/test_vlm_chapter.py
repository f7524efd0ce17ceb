"""Chapter 3 as executed in the smoke book: what a reader of the VLM chapter relies on.

The issue's criteria for the smoke profile, checked on the saved test-split
predictions (not on numbers typed into the notebook): on held-out images the
fine-tuned tiny PaliGemma beats the mean-training-mask baseline on the lungs,
*averaged over the two lungs* (`lung_left`, `lung_right`): mean box accuracy at
IoU 0.5 higher by at least 0.3 and mean Dice higher; and chapter 1's poses vary
enough that the baseline's lung Dice stays below 0.7.

NOTE: the criteria are asserted for the mean of the two lungs, not for each lung:
the left lung clears them by a wide margin, the right lung's box accuracy by less,
and the right lung's Dice stays near the baseline's (see the chapter's gain table).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

LUNGS = ["lung_left", "lung_right"]


@pytest.fixture(scope="module")
def chapter(smoke_run):
    from chexanatomy_lib.ct.dataset import ProjectedDataset
    from chexanatomy_lib.evaluation.baselines import mean_mask_predictions
    from chexanatomy_lib.evaluation.evaluate import evaluate_predictions
    from chexanatomy_lib.evaluation.predictions import load_predictions

    run_dir = smoke_run.run_dir
    out = run_dir / "03_vlm_finetune"
    ds = ProjectedDataset(run_dir / "01_ct_projection" / "dataset")
    vlm = load_predictions(out / "predictions" / "test.npz")
    base = mean_mask_predictions(ds, "test", structures=LUNGS)
    _, s_vlm = evaluate_predictions(vlm, ds, "test", structures=LUNGS, n_boot=10, hd95_structures=[])
    _, s_base = evaluate_predictions(base, ds, "test", structures=LUNGS, n_boot=10, hd95_structures=[])
    return {"out": out, "dataset": ds, "pred": vlm, "vlm": s_vlm, "base": s_base,
            "metrics": json.loads((out / "metrics.json").read_text())}


def test_lungs_are_scored_on_held_out_images(chapter):
    ds = chapter["dataset"]
    assert list(chapter["pred"].image_ids) == ds.index["image_id"].iloc[ds.split_indices("test")].tolist()
    # few lungs truncated: most test images are scored for both lungs
    assert (chapter["vlm"].loc[LUNGS, "n"] >= 0.8 * len(ds.split_indices("test"))).all(), chapter["vlm"]["n"]


def test_poses_vary_enough_that_the_mean_mask_is_not_enough(chapter):
    base = chapter["base"]
    assert (base.loc[LUNGS, "dice"] < 0.7).all(), base["dice"]
    assert (base.loc[LUNGS, "box_acc@0.5"] <= 0.6).all(), base["box_acc@0.5"]


# The target: a lung box-accuracy margin of at least 0.3 over the baseline.
# Measured 2026-11-23 on an idle 2-core machine (`chexanatomy book --profile smoke`,
# seed 0, 900 steps, median loc read-out): +0.475 (left lung 0.90 vs 0.15, right lung
# 0.55 vs 0.35); greedy read-out of the same model +0.50. Ad-hoc runs of the same
# configuration with other seeds or codecs gave +0.375 to +0.525 on test (median)
# against +0.225 to +0.50 (greedy).
LUNG_BOX_MARGIN_TARGET = 0.3


def test_vlm_beats_the_mean_mask_baseline_on_lung_boxes(chapter):
    v, b = chapter["vlm"].loc[LUNGS, "box_acc@0.5"], chapter["base"].loc[LUNGS, "box_acc@0.5"]
    assert v.mean() >= b.mean() + LUNG_BOX_MARGIN_TARGET, (v.to_dict(), b.to_dict())
    assert ((v - b) > 0).all(), "a lung's box accuracy is not above the baseline's"


def test_vlm_beats_the_mean_mask_baseline_on_lung_dice(chapter):
    v, b = chapter["vlm"].loc[LUNGS, "dice"], chapter["base"].loc[LUNGS, "dice"]
    assert v.mean() > b.mean(), (v.to_dict(), b.to_dict())


def test_constrained_decoding_gives_only_valid_outputs(chapter):
    pred = chapter["pred"]
    assert pred.valid.all()
    assert np.isfinite(pred.boxes).all()
    b = pred.boxes
    assert ((b[..., 2] > b[..., 0]) & (b[..., 3] > b[..., 1])).all()
    assert chapter["metrics"]["invalid_constrained"] == 0.0


def test_metrics_file_agrees_with_the_saved_predictions(chapter):
    m = chapter["metrics"]
    for lung in LUNGS:
        assert m[f"box_acc@0.5/{lung}"] == pytest.approx(chapter["vlm"].at[lung, "box_acc@0.5"])
        assert m[f"dice/{lung}"] == pytest.approx(chapter["vlm"].at[lung, "dice"])
