"""The U-Net baseline on a tiny phantom dataset: loss, training, resuming,
predictions in the shared format, the segmenter and its error messages."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from chexanatomy_lib.ct.dataset import DatasetWriter, ProjectedDataset
from chexanatomy_lib.unet.checkpoint import CheckpointError
from chexanatomy_lib.unet.data import Augmentation, SegmentationSamples, default_structures
from chexanatomy_lib.codec.geometry import masks_to_boxes
from chexanatomy_lib.evaluation.predictions import predict_split
from chexanatomy_lib.unet.inference import load_segmenter
from chexanatomy_lib.unet.loss import MaskedDiceBCELoss
from chexanatomy_lib.unet.model import UNetConfig
from chexanatomy_lib.unet.train import TrainConfig, load_history, train_unet

ROOT = Path(__file__).resolve().parent.parent
STRUCTURES = ["lung_left", "lung_right", "heart", "stomach", "clavicula_left"]
META = {"pixel_spacing_mm": 1.5, "view_geometry": {"sdd": 1800.0}, "mask_threshold_mm": 1.0}
SIZE = 64
SPLITS = ("train",) * 20 + ("val",) * 6 + ("test",) * 6


def _ellipse(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w] + 0.5
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def phantom(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A phantom radiograph float32 [h, w] in [0, 1] and its masks bool [5, h, w]
    (STRUCTURES order): dark lungs, a bright heart, stomach and clavicle, all
    shifted and resized at random so that their position must be read from the image."""
    dy, dx = rng.uniform(-0.1, 0.1, 2)

    def e(cy, cx, ry, rx):
        j = rng.uniform(0.9, 1.1, 2)
        return _ellipse(h, w, (cy + dy) * h, (cx + dx) * w, ry * h * j[0], rx * w * j[1])

    lungs = e(0.5, 0.70, 0.28, 0.14), e(0.5, 0.30, 0.28, 0.14)
    heart, stomach, clav = e(0.62, 0.55, 0.14, 0.16), e(0.85, 0.68, 0.07, 0.10), e(0.16, 0.68, 0.03, 0.16)
    body = _ellipse(h, w, (0.5 + dy) * h, (0.5 + dx) * w, 0.48 * h, 0.42 * w)
    img = 0.15 + 0.35 * body - 0.25 * (lungs[0] | lungs[1]) + 0.3 * heart + 0.15 * stomach + 0.3 * clav
    img = np.clip(img + rng.normal(0, 0.04, img.shape), 0, 1).astype(np.float32)
    return img, np.stack([*lungs, heart, stomach, clav])


def write_phantom_dataset(path: Path, seed: int = 0) -> Path:
    """32 phantom images; stomach absent in every third, clavicle truncated (cut at
    the top) in every fourth."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(path, STRUCTURES, SIZE, META) as w:
        for k, split in enumerate(SPLITS):
            img, masks = phantom(rng, SIZE, SIZE)
            absent, truncated = np.zeros(5, bool), np.zeros(5, bool)
            if k % 3 == 0:
                masks[3], absent[3] = False, True
            if k % 4 == 0:
                masks[4, : int(0.17 * SIZE)], truncated[4] = False, True
            w.add(img, masks, absent, truncated,
                  {"image_id": f"img{k:03d}", "case_id": "case0", "copy_id": f"c{k:03d}",
                   "view": "pa", "split": split})
    return path


class FakeFlags:
    """A dataset view with one structure truncated or absent in every image."""

    def __init__(self, dataset: ProjectedDataset, truncate: str | None = None, absent: str | None = None):
        self.structures, self.split_indices = dataset.structures, dataset.split_indices
        self.truncated, self.absent = dataset.truncated.copy(), dataset.absent.copy()
        if truncate:
            self.truncated[:, dataset.channel(truncate)] = True
        if absent:
            self.absent[:, dataset.channel(absent)] = True


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


def tiny_config(**kw) -> TrainConfig:
    base = dict(input_size=32, epochs=12, batch_size=4, lr=1e-2, checkpoint_every=1000,
                model=UNetConfig(channels=(8, 16, 32), strides=(2, 2)), augmentation=Augmentation(prob=0.5))
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> ProjectedDataset:
    return ProjectedDataset(write_phantom_dataset(tmp_path_factory.mktemp("unet") / "dataset"))


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    ckpt = tmp_path_factory.mktemp("unet_ckpt") / "checkpoint"
    result = train_unet(dataset, ckpt, tiny_config(), progress=False)
    assert result.finished
    return ckpt


def test_default_structures_are_those_with_an_untruncated_present_training_mask(dataset):
    assert default_structures(dataset) == STRUCTURES  # clavicle: truncated in some images only
    assert default_structures(FakeFlags(dataset, truncate="clavicula_left")) == STRUCTURES[:4]
    assert default_structures(FakeFlags(dataset, absent="stomach")) == [s for s in STRUCTURES if s != "stomach"]


def test_loss_ignores_truncated_channels_and_penalises_predictions_on_absent_ones():
    loss = MaskedDiceBCELoss()
    target = torch.zeros(2, 2, 8, 8)
    target[:, 0, 2:6, 2:6] = 1
    logits = torch.where(target > 0, 5.0, -5.0)
    valid = torch.tensor([[True, False], [True, True]])
    base = loss(logits, target, valid)["loss"]
    changed = logits.clone()
    changed[0, 1] = 5.0  # image 0, structure 1 is truncated: anything goes there
    assert torch.allclose(loss(changed, target, valid)["loss"], base)
    wrong = logits.clone()
    wrong[1, 1] = 5.0  # image 1, structure 1 is absent (empty target): predicting it costs
    assert loss(wrong, target, valid)["loss"] > base + 0.5


def test_augmented_items_depend_only_on_seed_epoch_and_image(dataset):
    aug = Augmentation(prob=1.0, max_rotation_deg=10, max_scale=0.1, max_shift=0.05)
    a = SegmentationSamples(dataset, "train", ["lung_left", "heart"], 32, aug, seed=3)
    b = SegmentationSamples(dataset, "train", ["lung_left", "heart"], 32, aug, seed=3)
    assert torch.equal(a[(2, 5)]["image"], b[(2, 5)]["image"])
    assert torch.equal(a[(2, 5)]["target"], b[(2, 5)]["target"])
    assert not torch.equal(a[(2, 5)]["target"], a[(3, 5)]["target"])
    plain = a[5]  # no epoch: no augmentation, the resized stored masks
    assert plain["image"].shape == (1, 32, 32) and plain["target"].shape == (2, 32, 32)
    assert not torch.equal(plain["target"], a[(2, 5)]["target"])


def test_trained_unet_segments_held_out_phantoms_better_than_the_mean_mask(dataset, trained):
    seg = load_segmenter(trained, device="cpu")
    assert seg.structures == STRUCTURES
    test, train = dataset.split_indices("test"), dataset.split_indices("train")
    pred = seg.predict_masks(np.asarray(dataset.images[test]))
    gt = dataset.masks_for(test, seg.structures)
    mean = dataset.masks_for(train, seg.structures).mean(0) >= 0.5
    for s in (0, 1):  # lungs
        unet = np.mean([dice(pred[i, s], gt[i, s]) for i in range(len(test))])
        baseline = np.mean([dice(mean[s], gt[i, s]) for i in range(len(test))])
        assert unet > 0.85 and unet > baseline + 0.05, (seg.structures[s], unet, baseline)
    history = load_history(trained)
    assert history["epochs"][-1]["val_loss"] < 0.7 * history["epochs"][0]["val_loss"]


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_interrupted_and_resumed_run_ends_with_the_same_weights(dataset, tmp_path):
    config = tiny_config(epochs=3, checkpoint_every=4)  # 5 steps per epoch, 15 in all
    full = train_unet(dataset, tmp_path / "full", config, progress=False)
    part = train_unet(dataset, tmp_path / "part", config, progress=False, stop_after_steps=7)
    assert not part.finished and part.steps_done == 7
    assert not (tmp_path / "part" / "model.safetensors").exists()  # no model card before the end
    resumed = train_unet(dataset, tmp_path / "part", config, progress=False)
    assert resumed.resumed_from_step == 7 and resumed.finished and resumed.steps_done == full.steps_done == 15
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("wall_s", "cpu_s")} for r in h["epochs"]]  # noqa: E731
    assert strip(full.history) == strip(resumed.history)
    assert full.history["steps"] == resumed.history["steps"]


def test_finished_run_is_returned_without_training_and_changed_settings_start_afresh(dataset, tmp_path):
    config = tiny_config(epochs=1)
    first = train_unet(dataset, tmp_path / "ck", config, progress=False)
    again = train_unet(dataset, tmp_path / "ck", config, progress=False)
    assert again.resumed_from_step == first.steps_done and again.history == first.history
    other = train_unet(dataset, tmp_path / "ck", tiny_config(epochs=2), progress=False)
    assert other.resumed_from_step == 0 and other.steps_done == 2 * first.steps_done
    assert json.loads((tmp_path / "ck" / "model_card.json").read_text())["training"]["epochs"] == 2


def test_predictions_round_trip_through_the_shared_format(dataset, trained, tmp_path):
    from chexanatomy_lib.evaluation.predictions import load_predictions, save_predictions

    pred = predict_split(load_segmenter(trained, device="cpu"), dataset, "test", progress=False)
    test = dataset.split_indices("test")
    assert pred.masks.shape == (len(test), len(STRUCTURES), SIZE, SIZE)
    assert list(pred.image_ids) == dataset.index["image_id"].iloc[test].tolist()
    loaded = load_predictions(save_predictions(pred, tmp_path / "predictions" / "test.npz"))
    for key in ("image_ids", "structures", "masks", "valid"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(pred, key))
    np.testing.assert_array_equal(loaded.boxes, pred.boxes)  # NaN == NaN here
    from chexanatomy_lib.evaluation.evaluate import evaluate_predictions

    per_loaded, summary_loaded = evaluate_predictions(loaded, dataset, "test", n_boot=50)
    per_pred, summary_pred = evaluate_predictions(pred, dataset, "test", n_boot=50)
    pd_testing = pytest.importorskip("pandas").testing
    pd_testing.assert_frame_equal(summary_loaded, summary_pred)
    gt = dataset.masks_for(test, list(pred.structures))
    lung = per_loaded[per_loaded["structure"] == "lung_left"]["dice"].to_numpy()
    np.testing.assert_allclose(lung, [dice(pred.masks[i, 0], gt[i, 0]) for i in range(len(test))])
    # Boxes are the tight boxes of the predicted masks, NaN where a mask is empty.
    empty = ~pred.masks.reshape(*pred.masks.shape[:2], -1).any(-1)
    assert np.isnan(pred.boxes[empty]).all() and np.isfinite(pred.boxes[~empty]).all()
    i, s = np.argwhere(~empty)[0]
    rows, cols = np.flatnonzero(pred.masks[i, s].any(1)), np.flatnonzero(pred.masks[i, s].any(0))
    np.testing.assert_allclose(pred.boxes[i, s], [rows[0] / SIZE, cols[0] / SIZE,
                                                  (rows[-1] + 1) / SIZE, (cols[-1] + 1) / SIZE], atol=1e-6)


def test_segmenter_maps_an_image_of_another_size_back_to_that_size(trained):
    seg = load_segmenter(trained, device="cpu")
    img, masks = phantom(np.random.default_rng(99), 96, 80)  # not the stored 64 x 64, not square
    out = seg.segment(img, ["lung_left", "right lung", "heart"])  # a display name resolves too
    assert list(out) == ["lung_left", "right lung", "heart"]
    for (mask, box, text), gt in zip(out.values(), (masks[0], masks[1], masks[2])):
        assert mask.shape == (96, 80) and mask.dtype == bool and text is None
        assert dice(mask, gt) > 0.75
        np.testing.assert_allclose(box, masks_to_boxes(mask))
    with pytest.raises(ValueError, match="liver"):
        seg.segment(img, ["liver"])  # a registry structure, but not a training target
    with pytest.raises(ValueError, match="unknown structure"):
        seg.segment(img, ["spleeen"])


def test_bad_checkpoint_folders_are_named_in_the_error(trained, tmp_path):
    import shutil

    with pytest.raises(CheckpointError, match="does not exist"):
        load_segmenter(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty.*model_card\.json: missing"):
        load_segmenter(tmp_path / "empty")
    foreign = tmp_path / "vlm"
    foreign.mkdir()
    (foreign / "model_card.json").write_text(json.dumps({"kind": "vlm"}))
    with pytest.raises(CheckpointError, match="kind 'vlm', not a U-Net"):
        load_segmenter(foreign)
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=r"broken/model\.safetensors: unreadable weights"):
        load_segmenter(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_segmenter(broken)


def test_checkpoint_card_tells_the_segment_command_it_is_a_unet(trained):
    card = json.loads((trained / "model_card.json").read_text())
    assert card["kind"] == "unet" and card["input_size"] == 32 and card["threshold"] == 0.5
    assert card["structures"] == STRUCTURES


def test_unet_never_imports_the_vlm():
    code = ("import sys, chexanatomy_lib.unet.train, chexanatomy_lib.unet.inference, "
            "chexanatomy_lib.unet.figures; "
            "print(sorted(m for m in sys.modules if m.startswith('chexanatomy_lib.vlm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    for f in (ROOT / "chexanatomy_lib" / "unet").glob("*.py"):  # lazy imports inside functions too
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("vlm" in n.split(".") for n in names), (f, node.lineno)


def test_few_shot_run_learns_from_its_rows_only_and_starts_from_a_saved_network(dataset, trained, tmp_path):
    from chexanatomy_lib.unet.checkpoint import load_model

    rows = dataset.split_indices("train")[:3]
    names = list(dataset.structures)[:1]
    config = tiny_config(structures=tuple(names), epochs=2, batch_size=3)
    start = train_unet(dataset, tmp_path / "k3", config, progress=False, train_indices=rows, validate=False,
                       init_from=trained)
    card = json.loads((tmp_path / "k3" / "model_card.json").read_text())
    assert card["training"]["n_train_images"] == 3 and start.steps_done == 2
    assert not any("val_loss" in e for e in start.history["epochs"])  # nothing validated
    # every weight but the output layer started from the saved network
    source, _ = load_model(trained)
    fresh = train_unet(dataset, tmp_path / "k3_scratch", config, progress=False, train_indices=rows, validate=False)
    near = {k: (v - source.state_dict()[k]).abs().max().item() for k, v in _weights(tmp_path / "k3").items()
            if k in source.state_dict() and source.state_dict()[k].shape == v.shape}
    far = {k: (v - source.state_dict()[k]).abs().max().item() for k, v in _weights(tmp_path / "k3_scratch").items()
           if k in near}
    assert len(near) > 4 and sum(near.values()) < 0.2 * sum(far.values())
    assert fresh.steps_done == 2
    with pytest.raises(ValueError, match="not in split 'train'"):
        train_unet(dataset, tmp_path / "bad", config, progress=False,
                   train_indices=dataset.split_indices("test")[:1])
