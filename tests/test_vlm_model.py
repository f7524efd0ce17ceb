"""Model building: labels from the processor, LoRA on checkpoints, frozen vision, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chexanatomy_lib.vlm.model import (
    CheckpointError,
    build_tiny,
    load_pretrained,
    load_vlm,
    trainable_parameters,
)
from chexanatomy_lib.vlm.tasks import Sample, encode_batch


@pytest.fixture(scope="module")
def tiny():
    return build_tiny("tiny", seed=0)


@pytest.fixture(scope="module")
def fake_checkpoint(tmp_path_factory, tiny):
    """A tiny random PaliGemma saved like a downloaded checkpoint (config, weights, processor)."""
    d = tmp_path_factory.mktemp("ckpt") / "paligemma-tiny-pt-128"
    tiny.core.save_pretrained(d)
    tiny.processor.save_pretrained(d)
    return d


def _samples():
    img = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    return [Sample(img, "segment left lung ; heart", "<loc0001><loc0002><loc0500><loc0600>" +
                   "<seg001>" * 16 + " left lung ; <loc0010><loc0020><loc0030><loc0040>" + "<seg002>" * 16 +
                   " heart", "segment"),
            Sample(img, "view orientation", "posteroanterior", "view")]


def test_labels_cover_exactly_the_target_and_eos(tiny):
    tok = tiny.processor.tokenizer
    samples = _samples()
    batch = encode_batch(tiny.processor, samples, train=True)
    for row, s in enumerate(samples):
        labels = batch["labels"][row]
        ids = batch["input_ids"][row]
        tt = batch["token_type_ids"][row]
        supervised = labels != -100
        want = tok(s.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert labels[supervised].tolist() == want
        assert ids[supervised].tolist() == want
        assert (tt.bool() == supervised).all()  # suffix = supervised tokens only
        # nothing of the image, <bos> or the prompt is supervised
        n_img = int((ids == tok.convert_tokens_to_ids("<image>")).sum())
        assert n_img == 64
        prompt_ids = tok(s.prompt + "\n", add_special_tokens=False)["input_ids"]
        first = int(supervised.nonzero()[0])
        assert ids[first - len(prompt_ids):first].tolist() == prompt_ids
        assert int(ids[first - len(prompt_ids) - 1]) == tok.bos_token_id


def test_tiny_models_train_everything_and_refuse_frozen_vision(tiny):
    rows = {r["component"]: r for r in trainable_parameters(tiny.model)}
    for comp in ("vision tower", "projector", "language model"):
        assert rows[comp]["parameters"] > 0 and rows[comp]["trainable"] == rows[comp]["parameters"]
    assert 1.0e6 < rows["total"]["parameters"] < 2.5e6
    with pytest.raises(ValueError, match="randomly initialised"):
        load_vlm("tiny", finetune_vision=False)


def test_random_models_start_with_ordinal_loc_embeddings(tiny):
    tok = tiny.processor.tokenizer
    loc0 = tok.convert_tokens_to_ids("<loc0000>")
    emb = tiny.core.get_input_embeddings().weight.detach()
    loc = torch.nn.functional.normalize(emb[loc0:loc0 + 1024], dim=1)
    near = (loc[500] * loc[501]).sum()
    far = (loc[500] * loc[900]).sum()
    assert near > 0.9 and far < near - 0.3
    other = emb[:loc0].norm(dim=1).mean()
    assert emb[loc0:loc0 + 1024].norm(dim=1).mean() == pytest.approx(float(other), rel=1e-3)


def test_lora_targets_only_the_language_model(fake_checkpoint):
    vlm = load_pretrained(str(fake_checkpoint), lora_r=4, finetune_vision=False)
    names = [n for n, p in vlm.model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and "language_model" in n for n in names)
    kinds = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    rows = {r["component"]: r for r in trainable_parameters(vlm.model)}
    assert rows["vision tower"]["trainable"] == 0 and rows["projector"]["trainable"] == 0
    assert rows["LoRA"]["trainable"] == rows["total"]["trainable"] > 0
    with_vision = load_pretrained(str(fake_checkpoint), lora_r=4, finetune_vision=True)
    vis = [n for n, p in with_vision.model.named_parameters() if p.requires_grad and "vision_tower" in n]
    assert vis and all("lora_" in n for n in vis)


def test_frozen_vision_does_not_change_in_a_training_step(fake_checkpoint):
    vlm = load_pretrained(str(fake_checkpoint), lora_r=4, finetune_vision=False)
    vision_before = {n: p.detach().clone() for n, p in vlm.model.named_parameters() if "vision_tower" in n}
    lora_before = {n: p.detach().clone() for n, p in vlm.model.named_parameters() if "lora_B" in n}
    opt = torch.optim.AdamW([p for p in vlm.model.parameters() if p.requires_grad], lr=1e-2)
    batch = encode_batch(vlm.processor, _samples(), train=True)
    for _ in range(2):
        vlm.model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(vlm.model.named_parameters())
    assert all(torch.equal(vision_before[n], after[n]) for n in vision_before)
    assert any(not torch.equal(lora_before[n], after[n]) for n in lora_before)  # the step did train


def test_adapter_saves_and_loads_on_its_base(fake_checkpoint, tmp_path):
    vlm = load_pretrained(str(fake_checkpoint), lora_r=4)
    with torch.no_grad():
        for n, p in vlm.model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    vlm.model.save_pretrained(tmp_path / "adapter")
    again = load_pretrained(str(fake_checkpoint), adapter=str(tmp_path / "adapter"), trainable=False)
    batch = encode_batch(vlm.processor, _samples(), train=True)
    vlm.model.eval()
    with torch.no_grad():
        a = vlm.model(**batch).logits
        b = again.model(**batch).logits
    torch.testing.assert_close(a, b)


def test_missing_checkpoint_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError) as err:
        load_vlm("google/paligemma2-3b-pt-224")
    msg = str(err.value)
    assert "google/paligemma2-3b-pt-224" in msg and "Hugging Face cache" in msg
    assert "huggingface-cli download" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vlm(str(tmp_path / "empty"))


def test_vlm_imports_without_the_ct_stack():
    """The GPU machines lack diffdrr, nibabel, torchio and monai: vlm must not need them."""
    import subprocess
    import sys

    code = ("import sys\n"
            "for m in ('diffdrr', 'nibabel', 'torchio', 'monai', 'SimpleITK'): sys.modules[m] = None\n"
            "import chexanatomy_lib.vlm.model, chexanatomy_lib.vlm.tasks, chexanatomy_lib.vlm.train\n"
            "import chexanatomy_lib.vlm.decode, chexanatomy_lib.vlm.predict, chexanatomy_lib.vlm.figures\n"
            "import chexanatomy_lib.segment, chexanatomy_lib.radiograph, chexanatomy_lib.augment\n"
            "import chexanatomy_lib.ct.registry, chexanatomy_lib.ct.dataset, chexanatomy_lib.codec\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
