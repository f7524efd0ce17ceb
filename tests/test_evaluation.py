"""Predictions format, the mean-mask baseline and evaluate_predictions on a tiny fake dataset."""

import numpy as np
import pytest

from chexanatomy_lib.ct.dataset import DatasetWriter, ProjectedDataset
from chexanatomy_lib.evaluation.baselines import mean_mask_predictions
from chexanatomy_lib.evaluation.evaluate import evaluate_predictions, plot_summary
from chexanatomy_lib.evaluation.predictions import (
    Predictions, PredictionsError, load_predictions, save_predictions,
)

SIZE = 32
NAMES = ["heart", "lung_left", "clavicula_left"]
META = {"pixel_spacing_mm": 1.0, "view_geometry": {}, "mask_threshold_mm": 1.0}


def make_dataset(path):
    """8 train images (heart always at rows 10:20, cols 8:24 in PA), 3 test images."""
    with DatasetWriter(path, NAMES, SIZE, META) as w:
        for k in range(11):
            split = "train" if k < 8 else "test"
            view = "pa" if k % 2 == 0 else "lateral"
            masks = np.zeros((3, SIZE, SIZE), bool)
            shift = 0 if view == "pa" else 6
            masks[0, 10:20, 8 + shift:24 + shift - 4] = True
            masks[1, 2 + k % 3:14, 2:10] = True
            absent = np.array([False, False, k in (8, 9)])
            if not absent[2]:
                masks[2, 1:3, 20:30] = True
            truncated = np.array([False, False, k == 10])
            w.add(np.zeros((SIZE, SIZE), np.float32), masks, absent, truncated,
                  {"image_id": f"img{k}", "case_id": "c0", "copy_id": str(k), "view": view, "split": split})
    return ProjectedDataset(path)


@pytest.fixture()
def dataset(tmp_path):
    return make_dataset(tmp_path / "ds")


def test_mean_mask_baseline_uses_training_masks_per_view(dataset):
    pred = mean_mask_predictions(dataset, split="test", per_view=True)
    assert list(pred.image_ids) == ["img8", "img9", "img10"]
    assert pred.masks.shape == (3, 3, SIZE, SIZE)
    pa_heart = np.zeros((SIZE, SIZE), bool)
    pa_heart[10:20, 8:20] = True
    np.testing.assert_array_equal(pred.masks[0, 0], pa_heart)  # img8 is PA
    np.testing.assert_array_equal(pred.masks[1, 0], np.roll(pa_heart, 6, axis=1))  # img9 lateral
    np.testing.assert_allclose(pred.boxes[0, 0], [10 / 32, 8 / 32, 20 / 32, 20 / 32])
    pooled = mean_mask_predictions(dataset, split="test", per_view=False)
    assert not pooled.masks[0, 0].sum() == pa_heart.sum()  # pooling over views blurs the heart


def test_evaluate_scores_perfect_and_baseline_predictions(dataset, tmp_path):
    test = dataset.split_indices("test")
    gt = dataset.masks_for(test)
    boxes = np.full((3, 3, 4), np.nan, np.float32)
    for i in range(3):
        for s in range(3):
            m = gt[i, s]
            if m.any():
                r, c = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
                boxes[i, s] = [r[0] / SIZE, c[0] / SIZE, (r[-1] + 1) / SIZE, (c[-1] + 1) / SIZE]
    perfect = Predictions(dataset.index["image_id"].iloc[test], NAMES, gt, boxes, np.ones((3, 3), bool))
    per_image, summary = evaluate_predictions(perfect, dataset, n_boot=200)
    # absent (img8, img9 clavicle) and truncated (img10 clavicle) rows are not scored
    assert summary.loc["clavicula_left", "n"] == 0 and summary.loc["heart", "n"] == 3
    assert np.allclose(per_image["dice"], 1.0) and np.allclose(per_image["hd95"], 0.0)
    assert np.allclose(per_image["box_acc@0.75"], 1.0)
    assert summary.loc["heart", "dice_lo"] == 1.0 and summary.loc["heart", "invalid_rate"] == 0.0
    _, with_absent = evaluate_predictions(perfect, dataset, include_absent=True, n_boot=50)
    assert with_absent.loc["clavicula_left", "n"] == 2 and with_absent.loc["clavicula_left", "dice"] == 1.0

    # invalid outputs score zero whatever mask they carry
    broken = Predictions(perfect.image_ids, NAMES, gt, boxes, np.array([[False, True, True]] * 3))
    per_b, sum_b = evaluate_predictions(broken, dataset, n_boot=50)
    assert sum_b.loc["heart", "dice"] == 0.0 and sum_b.loc["heart", "invalid_rate"] == 1.0
    assert sum_b.loc["heart", "box_iou"] == 0.0

    base = mean_mask_predictions(dataset)
    per_m, sum_m = evaluate_predictions(base, dataset, n_boot=200, seed=0)
    lung = per_m[per_m.structure == "lung_left"]
    tp, fp, fn = lung[["tp", "fp", "fn"]].to_numpy().T
    np.testing.assert_allclose(lung["dice"], 2 * tp / (2 * tp + fp + fn))
    row = sum_m.loc["lung_left"]
    assert row["dice_lo"] <= row["dice"] <= row["dice_hi"] and row["dice"] < 1.0
    assert plot_summary({"mean mask": sum_m, "perfect": summary}, metric="dice") is not None

    # the saved file reads back identically
    path = save_predictions(base, tmp_path / "predictions" / "test.npz")
    back = load_predictions(path)
    np.testing.assert_array_equal(back.masks, base.masks)
    np.testing.assert_array_equal(back.boxes, base.boxes)
    assert list(back.image_ids) == list(base.image_ids)


def test_bad_predictions_files_are_named(tmp_path, dataset):
    np.savez(tmp_path / "p.npz", image_ids=np.array(["a"]), structures=np.array(["heart"]))
    with pytest.raises(PredictionsError, match=r"p\.npz: missing arrays \['masks', 'boxes', 'valid'\]"):
        load_predictions(tmp_path / "p.npz")
    np.savez(tmp_path / "q.npz", image_ids=np.array(["a"]), structures=np.array(["heart"]),
             masks=np.zeros((1, 1, 8, 1), np.uint8), boxes=np.zeros((1, 2, 4), np.float32),
             valid=np.ones((1, 1), bool))
    with pytest.raises(PredictionsError, match=r"q\.npz: boxes have shape \(1, 2, 4\)"):
        load_predictions(tmp_path / "q.npz")
    base = mean_mask_predictions(dataset)
    partial = Predictions(base.image_ids[:1], base.structures, base.masks[:1], base.boxes[:1], base.valid[:1])
    with pytest.raises(PredictionsError, match="lack 2 image"):
        evaluate_predictions(partial, dataset)
