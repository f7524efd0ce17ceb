"""Batches made by worker processes ahead of the step: the same run as on the training process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from test_vlm_data import make_fake_dataset
from test_vlm_train import _run


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_fake_dataset(tmp_path_factory.mktemp("ds") / "dataset", n=8, size=64)


def _same_weights(a, b) -> bool:
    sa, sb = a.core.state_dict(), b.core.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_two_workers_give_the_loss_log_and_weights_of_the_training_process(fake, tmp_path):
    here, res_here = _run(fake, tmp_path / "here", batch_workers=0)
    ahead, res_ahead = _run(fake, tmp_path / "ahead", batch_workers=2)
    assert [e["step"] for e in res_ahead.log] == [1, 2, 3, 4]
    assert res_ahead.log == res_here.log  # bit-identical, not approximately equal
    assert _same_weights(here, ahead)


def test_a_run_with_workers_resumes_as_if_uninterrupted(fake, tmp_path):
    full, res_full = _run(fake, tmp_path / "full", batch_workers=0)
    _, res_part = _run(fake, tmp_path / "resumed", batch_workers=2, save_every=2, stop_after=2)
    assert res_part.steps_done == 2
    # batch_workers is no part of the fingerprint: a continuation may use another number
    resumed, res_resumed = _run(fake, tmp_path / "resumed", batch_workers=1, save_every=2)
    assert res_resumed.resumed_from_step == 2 and res_resumed.finished
    assert [e["loss"] for e in res_resumed.log] == [e["loss"] for e in res_full.log]
    assert _same_weights(full, resumed)


def test_an_error_in_a_worker_is_raised_naming_its_step(fake, tmp_path, monkeypatch):
    from chexanatomy_lib.vlm.tasks import TaskSampler

    sample = TaskSampler.sample
    step2 = [np.random.default_rng([3, 2, j, 7]).bit_generator.state for j in range(2)]  # _run: seed 3, batch 2

    def failing(self, i, rng, task=None):  # fails on the samples of step 2 (known by their seeded rng)
        if rng.bit_generator.state in step2:
            raise ValueError("unreadable image")
        return sample(self, i, rng, task)

    monkeypatch.setattr(TaskSampler, "sample", failing)
    with pytest.raises(RuntimeError, match=r"step 2 failed: ValueError: unreadable image"):
        _run(fake, tmp_path / "fails", batch_workers=2)
