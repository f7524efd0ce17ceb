"""Predictions format, the mean-mask baseline and evaluate_predictions on a tiny fake dataset."""

import numpy as np
import pytest

from chexanatomy_lib.ct.dataset import DatasetWriter, ProjectedDataset
from chexanatomy_lib.evaluation.baselines import mean_mask_predictions
from chexanatomy_lib.evaluation.evaluate import evaluate_predictions
from chexanatomy_lib.evaluation.figures import plot_summary
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


def test_one_summary_for_any_score_table():
    """`summarize` groups by any columns; the mean is the plain mean, the interval a seeded
    bootstrap (the k-th group with seed + k), and a group without rows is listed empty."""
    import pandas as pd

    from chexanatomy_lib.evaluation.evaluate import score_masks, score_routes, summarize
    from chexanatomy_lib.evaluation.metrics import bootstrap_ci

    rng = np.random.default_rng(0)
    ref = rng.random((12, 16, 16)) > 0.5
    noisy = ref ^ (rng.random((12, 16, 16)) > 0.9)
    table = pd.DataFrame({"structure": ["a", "b", "c"] * 4})
    scores = score_routes({"copy": ref, "noisy": noisy}, ref, table)
    assert list(scores.columns) == ["structure", "route", "tp", "fp", "fn", "dice", "iou"]
    assert (scores[scores.route == "copy"]["dice"] == 1.0).all()
    one = score_masks(noisy, ref, table)
    np.testing.assert_array_equal(one["dice"], scores[scores.route == "noisy"]["dice"])
    summary = summarize(scores, by=("route", "structure"), metrics=["dice"], n_boot=200, seed=3)
    assert summary.index.names == ["route", "structure"] and (summary["n"] == 4).all()
    g = scores[(scores.route == "noisy") & (scores.structure == "b")]["dice"].to_numpy()
    est, lo, hi = bootstrap_ci(g, n_boot=200, seed=3 + 4)  # the fifth group
    assert summary.loc[("noisy", "b"), "dice"] == est
    assert summary.loc[("noisy", "b"), "dice_lo"] == pytest.approx(lo) and summary.loc[("noisy", "b"), "dice_hi"] == pytest.approx(hi)
    rows = scores[(scores.route == "noisy") & (scores.structure == "b")]
    assert summary.loc[("noisy", "b"), "tp"] == rows["tp"].sum()  # counts are summed
    listed = summarize(scores, by="structure", metrics=["dice", "iou"], groups=["a", "z"])
    assert list(listed.index) == ["a", "z"] and listed.loc["z", "n"] == 0 and np.isnan(listed.loc["z", "dice"])


def test_any_segmenter_predicts_a_split_in_the_shared_format(dataset):
    from chexanatomy_lib.evaluation.predictions import predict_split

    class Oracle:
        """Returns the reference masks of the images it is shown (looked up by content)."""

        structures = NAMES

        def __init__(self):
            self.calls = []

        def predict(self, images, structures, batch_size=16, progress=False):
            self.calls.append(len(images))
            idx = dataset.split_indices("test")[sum(self.calls) - len(images):sum(self.calls)]
            masks = dataset.masks_for(idx, structures)
            return masks, np.zeros((*masks.shape[:2], 4), np.float32), np.ones(masks.shape[:2], bool)

    oracle = Oracle()
    pred = predict_split(oracle, dataset, "test", structures=["lung_left", "heart"], batch_size=2, chunk=1,
                         progress=False)
    assert oracle.calls == [2, 1]  # read in chunks of whole batches
    assert list(pred.image_ids) == ["img8", "img9", "img10"] and list(pred.structures) == ["lung_left", "heart"]
    np.testing.assert_array_equal(pred.masks, dataset.masks_for(dataset.split_indices("test"), ["lung_left", "heart"]))
    np.testing.assert_array_equal(pred.rows_of(["img10", "img8"]), [2, 0])
    with pytest.raises(KeyError, match="img99"):
        pred.rows_of(["img99"])


def test_comparison_table_and_overlays_draw_every_model_one_way(dataset):
    from chexanatomy_lib.evaluation.figures import comparison_table, plot_overlays

    test = dataset.split_indices("test")
    gt = dataset.masks_for(test)
    perfect = Predictions(dataset.index["image_id"].iloc[test], NAMES, gt, np.full((3, 3, 4), np.nan, np.float32),
                          np.ones((3, 3), bool))
    _, s_perfect = evaluate_predictions(perfect, dataset, "test", n_boot=20, hd95_structures=[])
    _, s_base = evaluate_predictions(mean_mask_predictions(dataset, "test"), dataset, "test", n_boot=20,
                                     hd95_structures=[])
    table = comparison_table({"perfect": s_perfect, "baseline": s_base}, metrics=("dice",))
    assert table.index.names == ["structure", "model"] and list(table.columns) == ["n", "invalid", "dice"]
    assert table.loc[("heart", "perfect"), "dice"] == "1.000 [1.000, 1.000]"
    assert list(table.index.get_level_values("model")[:2]) == ["perfect", "baseline"]
    fig = plot_overlays(np.asarray(dataset.images[test]), gt, {"perfect": gt, "baseline": gt}, NAMES,
                        titles=["a", "b", "c"])
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == NAMES + ["reference", "perfect", "baseline"]


def test_paired_difference_resamples_images_and_pairs_structures():
    import pandas as pd

    from chexanatomy_lib.evaluation.evaluate import paired_difference
    from chexanatomy_lib.evaluation.metrics import bootstrap_ci

    rng = np.random.default_rng(1)
    ids = [f"i{k}" for k in range(12)]
    a = pd.DataFrame([{"image_id": i, "structure": s, "dice": d} for i in ids for s, d in
                      (("x", rng.uniform(0.8, 0.9)), ("y", rng.uniform(0.5, 0.9)))])
    b = a.assign(dice=a["dice"] - np.where(a["structure"] == "x", 0.1, 0.2))
    b.loc[(b.image_id == "i0") & (b.structure == "x"), "dice"] = np.nan  # not scored: the pair drops out
    table = paired_difference(a, b, ["x"], n_boot=300, seed=5, together={"y alone": ["y"], "both": ["x", "y"]})
    assert list(table.index) == ["x", "y alone", "both"] and list(table["n"]) == [11, 12, 12]
    assert table.loc["x", "difference"] == pytest.approx(0.1) and table.loc["x", "difference_lo"] == pytest.approx(0.1)
    assert (table["verdict"] == "A better").all()  # every interval lies above zero
    swapped = paired_difference(b, a, ["x", "z"], n_boot=300, seed=5)
    assert list(swapped["verdict"]) == ["A worse", "n/a"]  # z: scored in neither
    diffs = (a["dice"] - b["dice"])[a.structure == "y"].to_numpy()
    est, lo, hi = bootstrap_ci(diffs, n_boot=300, seed=5 + 1)
    assert (table.loc["y alone", "difference"], table.loc["y alone", "difference_lo"],
            table.loc["y alone", "difference_hi"]) == \
        pytest.approx((est, lo, hi))
    assert table.loc["y alone", "a"] - table.loc["y alone", "b"] == pytest.approx(0.2)
    # a group averages its members' differences per image: image i0 has y's (0.2) only,
    # the other eleven x's and y's (0.15)
    assert table.loc["both", "difference"] == pytest.approx((0.2 + 11 * 0.15) / 12)
