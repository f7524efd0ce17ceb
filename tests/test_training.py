"""The one training loop: schedule, exact resume (after a save or Ctrl-C), the loss log,
settings that changed, a finished run."""

from __future__ import annotations

import json

import pytest
import torch

from chexanatomy_lib.training import LoopConfig, checkpoint_dirs, learning_rate, read_training_log, train_loop


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    return x, x @ torch.arange(1.0, 6.0)[:, None] + 0.1 * torch.randn(64, 1, generator=g)


def _run(out, interrupt_at=None, **cfg):
    """A small regression trained by the loop; batches are a pure function of the step."""
    x, y = _data()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def batches(start):
        for step in range(start, 10_000):
            idx = torch.randperm(64, generator=torch.Generator().manual_seed(step))[:8]
            yield {"x": x[idx], "y": y[idx]}

    def loss_fn(net, batch, step):
        if interrupt_at is not None and step == interrupt_at:
            raise KeyboardInterrupt
        pred = net(batch["x"])
        return torch.nn.functional.mse_loss(pred, batch["y"]), {"abs_error": (pred - batch["y"]).abs().mean()}

    settings = dict(steps=12, lr=0.05, warmup_steps=3, weight_decay=0.01, device="cpu", log_every=3,
                    progress=False)
    settings.update(cfg)
    result = train_loop(model, model.parameters(), batches, loss_fn, LoopConfig(**settings), checkpoint_dir=out,
                        fingerprint={"lr": settings["lr"], "steps": settings["steps"]})
    return model, result


def test_schedule_warms_up_then_decays_to_its_floor():
    vals = [learning_rate(s, 2.0, 4, 20, min_ratio=0.1) for s in range(20)]
    assert vals[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    assert all(a >= b for a, b in zip(vals[3:], vals[4:]))
    assert vals[-1] == pytest.approx(0.2, abs=0.05) and min(vals) >= 0.2
    assert learning_rate(25, 2.0, 4, 20, min_ratio=0.1) == pytest.approx(0.2)  # past the end: the floor


def test_interrupted_and_resumed_runs_end_with_the_same_weights_and_log(tmp_path):
    full, res_full = _run(tmp_path / "full")
    # stopped mid log-interval (7 is not a multiple of 3), resumed from the state saved there
    _, part = _run(tmp_path / "part", save_every=2, stop_after=7)
    assert part.steps_done == 7 and not part.finished and part.resumed_from_step == 0
    assert [p.name for p in checkpoint_dirs(tmp_path / "part")] == ["step_000006", "step_000007"]  # two kept
    resumed, res = _run(tmp_path / "part", save_every=2)
    assert res.resumed_from_step == 7 and res.finished and res.steps_done == 12
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert res.log == res_full.log  # the interval cut by the interruption is logged as if it was not
    assert [e["step"] for e in res.log] == [3, 6, 9, 12]
    assert set(res.log[0]) == {"step", "loss", "lr", "abs_error"}
    assert read_training_log(tmp_path / "part")["log"] == res.log


def test_ctrl_c_saves_the_state_and_the_run_resumes_from_it(tmp_path):
    full, _ = _run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", interrupt_at=5)
    assert json.loads((checkpoint_dirs(tmp_path / "run")[-1] / "trainer_state.json").read_text())["state"]["step"] == 5
    resumed, res = _run(tmp_path / "run")
    assert res.resumed_from_step == 5 and res.finished
    assert all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))


def test_other_settings_start_afresh_and_a_finished_run_is_returned_as_is(tmp_path, capsys):
    first, res = _run(tmp_path / "run")
    again, res_again = _run(tmp_path / "run")
    assert res_again.resumed_from_step == 12 and res_again.finished and res_again.log == res.log
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))  # weights restored
    _, other = _run(tmp_path / "run", lr=0.02)
    assert other.resumed_from_step == 0 and other.finished
    assert "other settings (lr)" in capsys.readouterr().out


def test_a_model_without_trainable_parameters_is_an_error(tmp_path):
    model = torch.nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_loop(model, [p for p in model.parameters() if p.requires_grad], None,
                   lambda m, b, s: (m(torch.ones(1, 2)).sum(), {}), LoopConfig(steps=2, lr=0.1, device="cpu"))


def test_resume_false_starts_afresh_and_clears_the_old_states(tmp_path):
    _run(tmp_path / "run", save_every=2, stop_after=6)
    x, y = _data()
    torch.manual_seed(1)
    model = torch.nn.Linear(5, 1)
    res = train_loop(model, model.parameters(), None,
                     lambda m, b, s: (torch.nn.functional.mse_loss(m(x), y), {}),
                     LoopConfig(steps=3, lr=0.01, device="cpu", progress=False), checkpoint_dir=tmp_path / "run",
                     resume=False)
    assert res.resumed_from_step == 0 and res.finished
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_000003"]  # none of the old run's left
