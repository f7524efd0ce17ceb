"""The training loop: exact resume, loss log, several processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from test_vlm_data import STRUCTURES, make_codec, make_fake_dataset


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_dataset(tmp_path_factory.mktemp("ds") / "dataset", n=8, size=64)


def _run(fake, out, **cfg):
    from chexanatomy_lib.vlm.model import build_tiny
    from chexanatomy_lib.vlm.tasks import TaskSampler
    from chexanatomy_lib.vlm.train import TrainConfig, train

    vlm = build_tiny("tiny", seed=0)
    sampler = TaskSampler(fake, make_codec(), STRUCTURES, augment=0.5)
    settings = dict(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, log_every=1, device="cpu", seed=3)
    settings.update(cfg)
    config = TrainConfig(**settings)
    res = train(vlm, sampler.sample, fake.split_indices("train"), config, out, progress=False)
    return vlm, res


def test_interrupt_and_resume_gives_the_same_weights(fake, tmp_path):
    full, res_full = _run(fake, tmp_path / "full")
    part, res_part = _run(fake, tmp_path / "resumed", save_every=2, stop_after=2)
    assert res_part.steps_done == 2 and not res_part.finished
    assert (tmp_path / "resumed" / "checkpoints" / "step_000002" / "trainer_state.json").is_file()
    resumed, res_resumed = _run(fake, tmp_path / "resumed", save_every=2)
    assert res_resumed.resumed_from_step == 2 and res_resumed.finished
    a = full.core.state_dict()
    b = resumed.core.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the weights did move away from the initialisation
    from chexanatomy_lib.vlm.model import build_tiny

    init = build_tiny("tiny", seed=0).core.state_dict()
    assert not all(torch.equal(init[k], a[k]) for k in a)
    # the loss log of the resumed run continues the interrupted one
    assert [e["step"] for e in res_resumed.log] == [1, 2, 3, 4]
    assert [e["loss"] for e in res_resumed.log] == pytest.approx([e["loss"] for e in res_full.log], rel=1e-5)
    logged = json.loads((tmp_path / "resumed" / "training_log.json").read_text())["log"]
    assert len(logged) == 4


def test_schedule_warms_up_then_decays_to_zero():
    from chexanatomy_lib.training import learning_rate

    vals = [learning_rate(s, 1.0, 10, 100) for s in range(100)]
    assert vals[0] == pytest.approx(0.1) and vals[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(vals[9:], vals[10:]))
    assert vals[-1] < 0.01


def test_data_order_visits_every_image_once_per_epoch():
    from chexanatomy_lib.vlm.train import batch_slots

    seen = [j for step in range(5) for j in batch_slots(step, 2, 10, seed=1)]
    assert sorted(seen) == list(range(10))
    assert batch_slots(3, 2, 10, 1) == batch_slots(3, 2, 10, 1)
    assert seen != [j for step in range(5) for j in batch_slots(step, 2, 10, seed=2)]


SCRIPT = textwrap.dedent('''
    import hashlib, json, sys
    from pathlib import Path
    import numpy as np, torch
    sys.path.insert(0, sys.argv[3])
    from test_vlm_data import STRUCTURES, make_codec
    from chexanatomy_lib.ct.dataset import ProjectedDataset
    from chexanatomy_lib.vlm.model import build_tiny
    from chexanatomy_lib.vlm.tasks import TaskSampler
    from chexanatomy_lib.vlm.train import TrainConfig, train
    from accelerate import PartialState
    torch.set_num_threads(1)
    ds = ProjectedDataset(sys.argv[1])
    vlm = build_tiny("tiny", seed=0)
    sampler = TaskSampler(ds, make_codec(), STRUCTURES)
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, log_every=1, device="cpu", save_every=1)
    res = train(vlm, sampler.sample, ds.split_indices("train"), cfg, sys.argv[2], progress=False)
    state = PartialState()
    h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in vlm.core.parameters())).hexdigest()
    Path(sys.argv[2], f"rank{state.process_index}.json").write_text(json.dumps(
        {"world": state.num_processes, "hash": h, "steps": res.steps_done, "log": res.log}))
''')


@pytest.mark.slow
def test_two_cpu_processes_train_the_same_model(fake, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(script), str(fake.path), str(tmp_path / "out"), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 and r["steps"] == 2 for r in ranks)
    assert ranks[0]["hash"] == ranks[1]["hash"]  # DDP kept the replicas identical
    assert len(ranks[0]["log"]) == 2 and np.isfinite(ranks[0]["log"][-1]["loss"])
    assert (tmp_path / "out" / "checkpoints" / "step_000001" / "trainer_state.json").is_file()


def test_token_loss_matches_the_model_loss_and_smooths_loc_targets():
    from chexanatomy_lib.vlm.train import token_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 7, 1100)
    labels = torch.full((2, 7), -100)
    labels[:, 4:] = torch.tensor([[60, 70, 1], [65, 2, 1]])
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 1100), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(token_loss(logits, labels), ref)
    # with smoothing, predicting a neighbouring bin costs less than a far one
    near = torch.full((1, 2, 1100), -10.0)
    far = near.clone()
    near[0, 0, 50 + 41] = 10.0  # target bin 40 (loc_start 50), prediction 41
    far[0, 0, 50 + 400] = 10.0
    lab = torch.tensor([[-100, 90]])
    assert token_loss(near, lab, 50, 4.0) < token_loss(far, lab, 50, 4.0)
    assert token_loss(near, lab, 50, 0.0) == pytest.approx(float(token_loss(far, lab, 50, 0.0)))


def test_checkpoints_of_other_settings_are_not_resumed(fake, tmp_path):
    _run(fake, tmp_path / "run", save_every=2, stop_after=2)
    _, res = _run(fake, tmp_path / "run", save_every=2, lr=5e-4, steps=3)
    assert res.resumed_from_step == 0 and res.finished


def test_loc_weight_weights_box_tokens_in_the_mean():
    import torch

    from chexanatomy_lib.vlm.train import token_loss

    torch.manual_seed(0)
    v, loc_start, n_bins = 40, 10, 20
    logits = torch.randn(2, 6, v)
    labels = torch.tensor([[-100, 12, 3, 25, 5, -100], [-100, -100, 11, 4, 29, 2]])
    plain = token_loss(logits, labels, loc_start, 0.0, n_bins=n_bins)
    assert torch.allclose(token_loss(logits, labels, loc_start, 0.0, n_bins=n_bins, loc_weight=1.0), plain)
    tgt = labels[:, 1:][labels[:, 1:] != -100]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1][labels[:, 1:] != -100], tgt, reduction="none")
    w = torch.where((tgt >= loc_start) & (tgt < loc_start + n_bins), 3.0, 1.0)
    weighted = token_loss(logits, labels, loc_start, 0.0, n_bins=n_bins, loc_weight=3.0)
    assert torch.allclose(weighted, (w * nll).sum() / w.sum())
    assert not torch.allclose(weighted, plain)


def test_loss_on_target_logits_only_equals_the_loss_on_all_logits(fake):
    """Training computes the vocabulary head on the positions that predict targets only
    (``logits_to_keep``); the loss is the same as with every position's logits."""
    from chexanatomy_lib.vlm.model import build_tiny
    from chexanatomy_lib.vlm.tasks import TaskSampler, encode_batch
    from chexanatomy_lib.vlm.train import target_span, token_loss

    vlm = build_tiny("tiny", seed=0)
    sampler = TaskSampler(fake, make_codec(), STRUCTURES, augment=0.0)
    samples = [sampler.sample(int(i), np.random.default_rng(i)) for i in fake.split_indices("train")[:3]]
    batch = encode_batch(vlm.processor, samples, train=True)
    labels = batch.pop("labels")
    keep = target_span(labels)
    assert keep < labels.shape[1]  # the image and prompt positions are skipped
    with torch.no_grad():
        full = token_loss(vlm.model(**batch).logits, labels, 5, 2.0, loc_weight=3.0)
        part = token_loss(vlm.model(**batch, logits_to_keep=keep).logits, labels[:, -keep:], 5, 2.0, loc_weight=3.0)
    torch.testing.assert_close(part, full)
    assert target_span(torch.full((2, 5), -100)) == 5
    lab = torch.full((2, 6), -100)
    lab[0, 4:] = 7
    lab[1, 3:] = 7
    assert target_span(lab) == 4  # positions 2..5: position 2 predicts the first target at 3
