"""Chapter 4 as executed in the smoke book: what a reader of the U-Net chapter relies on."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.fixture(scope="module")
def chapter(smoke_run):
    from chexanatomy_lib.ct.dataset import ProjectedDataset

    run_dir = smoke_run.run_dir
    return {
        "run_dir": run_dir,
        "out": run_dir / "04_unet_baseline",
        "dataset": ProjectedDataset(run_dir / "01_ct_projection" / "dataset"),
    }


def test_unet_beats_the_mean_mask_baseline_on_held_out_lungs(chapter):
    from chexanatomy_lib.evaluation.baselines import mean_mask_predictions
    from chexanatomy_lib.evaluation.evaluate import evaluate_predictions
    from chexanatomy_lib.evaluation.predictions import load_predictions

    ds = chapter["dataset"]
    lungs = ["lung_left", "lung_right"]
    unet = load_predictions(chapter["out"] / "predictions" / "test.npz")
    _, u = evaluate_predictions(unet, ds, "test", structures=lungs, n_boot=10, hd95_structures=[])
    _, b = evaluate_predictions(mean_mask_predictions(ds, "test", structures=lungs), ds, "test",
                                structures=lungs, n_boot=10, hd95_structures=[])
    assert u["dice"].mean() >= b["dice"].mean() + 0.15, (u["dice"], b["dice"])


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
    mask, box, _ = seg.segment(np.asarray(ds.images[i]), ["lung_left"])["lung_left"]
    assert mask.shape == (ds.image_size, ds.image_size) and mask.any() and box is not None
