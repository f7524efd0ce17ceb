"""Chapter 4 as executed in the smoke book: what a reader of the U-Net chapter relies on.

Target of the smoke profile on a cohort framed like real films: on held-out images the
U-Net beats the mean-mask baseline's lung-field Dice, the 95% bootstrap interval of the
paired difference (both lung fields, per image) above zero. Measured 2026-11-29 on a
2-core machine (`make test`'s smoke book, 96 px input, 70 epochs): +0.077 (0.058 to
0.095); lung-field Dice 0.897 against the baseline's 0.824.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

FIELDS = ["lung_field_left", "lung_field_right"]


@pytest.fixture(scope="module")
def chapter(smoke_run):
    from chexanatomy_lib.ct.dataset import ProjectedDataset

    run_dir = smoke_run.run_dir
    return {
        "run_dir": run_dir,
        "out": run_dir / "04_unet_baseline",
        "dataset": ProjectedDataset(run_dir / "01_ct_projection" / "dataset"),
    }


def test_unet_beats_the_mean_mask_baseline_on_held_out_lung_fields(chapter):
    from chexanatomy_lib.evaluation.baselines import mean_mask_predictions
    from chexanatomy_lib.evaluation.evaluate import evaluate_predictions, paired_difference
    from chexanatomy_lib.evaluation.predictions import load_predictions

    ds = chapter["dataset"]
    unet = load_predictions(chapter["out"] / "predictions" / "test.npz")
    p_u, s_u = evaluate_predictions(unet, ds, "test", structures=FIELDS, n_boot=10, hd95_structures=[])
    p_b, s_b = evaluate_predictions(mean_mask_predictions(ds, "test", structures=FIELDS), ds, "test",
                                    structures=FIELDS, n_boot=10, hd95_structures=[])
    paired = paired_difference(p_u, p_b, FIELDS, n_boot=1000, seed=0, together={"lung fields": FIELDS})
    assert paired.at["lung fields", "difference_lo"] > 0, paired
    assert (s_u.loc[FIELDS, "dice"] > s_b.loc[FIELDS, "dice"]).all(), (s_u["dice"], s_b["dice"])
    # the chapter's own paired table says the same
    metrics = json.loads((chapter["out"] / "metrics.json").read_text())
    assert metrics["lung_fields_unet_minus_baseline_dice_difference_lo"] > 0


def test_unet_predictions_cover_what_the_vlm_scores(chapter):
    from chexanatomy_lib.evaluation.predictions import load_predictions

    unet = load_predictions(chapter["out"] / "predictions" / "test.npz")
    from chexanatomy_lib.unet.data import default_structures

    vlm = load_predictions(chapter["run_dir"] / "03_vlm_finetune" / "predictions" / "test.npz")
    learnable = set(default_structures(chapter["dataset"]))  # a structure truncated everywhere has no labels
    assert set(vlm.structures.tolist()) & learnable <= set(unet.structures.tolist())
    ds = chapter["dataset"]
    assert list(unet.image_ids) == ds.index["image_id"].iloc[ds.split_indices("test")].tolist()
    assert unet.image_size == (ds.image_size, ds.image_size)


def test_chapter_checkpoint_segments_through_its_model_card(chapter):
    from chexanatomy_lib.unet.inference import load_segmenter

    ckpt = chapter["out"] / "checkpoint"
    card = json.loads((ckpt / "model_card.json").read_text())
    assert card["kind"] == "unet"
    seg = load_segmenter(ckpt, device="cpu")
    ds = chapter["dataset"]
    i = int(ds.split_indices("test")[0])
    mask, box, _ = seg.segment(np.asarray(ds.images[i]), ["lung_field_left"])["lung_field_left"]
    assert mask.shape == (ds.image_size, ds.image_size) and mask.any() and box is not None
