"""The training loop every model of the book uses: the mask VQ-VAE, the VLM, the U-Net
and the few-shot runs.

A model supplies three things: its parameters (the optimiser's groups), its batches
(a function of the step to start from; :func:`prefetch_batches` makes them ahead of
the step in worker processes) and its loss (a function of the model, one batch and
the step). The loop owns everything else:

* HF Accelerate: device placement, mixed precision, several processes (``accelerate
  launch`` / torchrun; each process draws its own share of a batch and DDP averages
  the gradients);
* AdamW with linear warm-up and cosine decay (:func:`learning_rate`), gradient clipping;
* resumable state: every ``save_every`` steps (and when a step hook asks, at the end,
  and on Ctrl-C) ``<checkpoint_dir>/checkpoints/step_NNNNNN/`` gets the model,
  optimiser and RNG states (``Accelerator.save_state``), any registered extra state,
  and ``trainer_state.json`` (step, loss log, the hooks' own records, time spent, and
  the run's *fingerprint*). A later call with the same fingerprint continues from the
  latest one; since batches are pure functions of the step (or their generator is part
  of the saved state), an interrupted and resumed run ends with the weights of an
  uninterrupted one. A saved state with another fingerprint is reported and replaced;
* a progress bar and the loss log: every ``log_every`` steps one entry
  ``{"step", "loss", "lr", <the means of what the loss function reported>}``, also
  written to ``<checkpoint_dir>/training_log.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

STATE_NAME = "trainer_state.json"
LOG_NAME = "training_log.json"
CHECKPOINTS = "checkpoints"


@dataclass
class LoopConfig:
    """How to optimise (the model's own settings live with the model)."""

    steps: int  # optimizer steps of the whole run
    lr: float  # peak learning rate
    warmup_steps: int = 0  # linear warm-up steps, then cosine decay
    min_lr_ratio: float = 0.0  # the cosine ends at lr * this
    weight_decay: float = 0.0  # AdamW weight decay (groups may set their own)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    grad_clip: float | None = 1.0  # max global gradient norm (0 or None: no clipping)
    device: str = "auto"  # "auto" (CUDA if available), "cpu" or "cuda"
    mixed_precision: str = "no"  # "no", "bf16", "fp16" or "auto" (bf16/fp16 on CUDA, none on CPU)
    save_every: int = 0  # steps between saved training states (0: only at the end and when a hook asks)
    keep_checkpoints: int = 2  # saved states kept (the most recent)
    log_every: int = 1  # steps per loss-log entry
    stop_after: int | None = None  # save and return after this many steps in all (an interruption)
    desc: str = "training"  # progress bar label
    progress: bool = True  # show a progress bar (main process only)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.log_every < 1:
            raise ValueError(f"steps and log_every must be >= 1, got {self.steps} and {self.log_every}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', not {self.mixed_precision!r}")


@dataclass
class TrainingState:
    """What a run has done so far; saved with every checkpoint and restored on resume."""

    step: int = 0  # optimizer steps done
    log: list[dict[str, float]] = field(default_factory=list)  # the loss log
    records: dict[str, Any] = field(default_factory=dict)  # the step hooks' own JSON-able records
    wall_s: float = 0.0  # seconds of training, all calls together (wall clock)
    cpu_s: float = 0.0  # process CPU seconds of training (all threads), all calls together
    pending: list = field(default_factory=list)  # [loss, info, lr] of the steps since the last log entry

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "log": self.log, "records": self.records, "wall_s": self.wall_s,
                "cpu_s": self.cpu_s, "pending": self.pending}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainingState":
        return cls(int(d["step"]), list(d.get("log", [])), dict(d.get("records", {})),
                   float(d.get("wall_s", 0.0)), float(d.get("cpu_s", 0.0)), list(d.get("pending", [])))


@dataclass
class TrainResult:
    """What one call of :func:`train_loop` did."""

    steps_done: int  # optimizer steps completed so far (all calls together)
    total_steps: int  # steps of the complete run
    resumed_from_step: int  # the step this call started from (0: a fresh start)
    finished: bool  # True once every step is done
    log: list[dict[str, float]]  # the loss log (all calls together)
    records: dict[str, Any]  # the step hooks' records (all calls together)
    wall_s: float  # seconds spent in this call
    state: TrainingState  # the full state (its wall_s and cpu_s cover all calls)


@dataclass
class StepContext:
    """What a step hook sees after an optimizer step: the prepared model (for evaluation),
    the accelerator and the state (whose ``records`` it may extend)."""

    model: Any
    accelerator: Any
    state: TrainingState
    config: LoopConfig


def learning_rate(step: int, peak: float, warmup: int, total: int, min_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up from ``peak / warmup``
    to ``peak`` over ``warmup`` steps, then cosine decay to ``peak * min_ratio`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1.0 - min_ratio) * (0.5 * (1.0 + math.cos(math.pi * t))))


def mixed_precision_for(setting: str, device: str) -> str:
    """The Accelerate mixed-precision mode for ``setting`` on ``device`` ("auto": bf16 (or fp16
    where bf16 is unsupported) on CUDA, none on the CPU); bf16/fp16 on the CPU is an error."""
    import torch

    if setting == "auto":
        if device == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if setting != "no" and device == "cpu":
        raise ValueError(f"mixed_precision={setting!r} needs a CUDA device")
    return setting


def make_accelerator(device: str = "auto", mixed_precision: str = "no"):
    """An ``Accelerator`` on ``device`` (the CPU when ``"cpu"`` or without CUDA)."""
    from accelerate import Accelerator

    from .devices import resolve_device

    dev = resolve_device(device)
    return Accelerator(cpu=dev == "cpu", mixed_precision=mixed_precision_for(mixed_precision, dev))


def process_share(batch_size: int, accelerator) -> range:
    """The slots of a global batch of ``batch_size`` that this process computes (every
    ``num_processes``-th, from its rank); an error when the batch does not divide evenly."""
    world = accelerator.num_processes
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} is not divisible by {world} processes")
    return range(accelerator.process_index, batch_size, world)


def prefetch_batches(make_batch: Callable[[int], Any], start: int, stop: int, workers: int = 0) -> Iterator[Any]:
    """``make_batch(step)`` for ``step`` in ``start .. stop - 1``, in step order: a ``batches(start)``
    for :func:`train_loop` when a batch is a pure function of its step.

    ``workers`` = 0: each batch is made on this process when the loop asks for it.
    ``workers`` = N > 0: N worker processes (a ``DataLoader`` over the steps; forked, so
    ``make_batch`` and what it refers to are not pickled) make them, worker ``w`` the steps
    ``start + w, start + w + N, ...``, each up to two steps ahead, while this process trains
    on the earlier ones; the batches come back in step order. A worker runs one torch
    thread and must not touch CUDA (what ``make_batch`` uses stays on the CPU). An error
    there is raised here (``RuntimeError``, naming the step) when its step comes up.
    Needs the fork start method (Linux; not Windows).
    """
    if workers <= 0:
        for step in range(start, stop):
            yield make_batch(step)
        return
    import torch
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    class Steps(IterableDataset):
        def __iter__(self):
            w = get_worker_info()
            for step in range(start + w.id, stop, w.num_workers):
                try:
                    batch = make_batch(step)
                except Exception as e:
                    raise RuntimeError(f"preparing the batch of step {step} failed: {type(e).__name__}: {e}") from e
                yield step, batch

    # NOTE: the loader's own generator: its worker seeds are otherwise drawn from the global
    # torch RNG, which would then differ from a run with workers=0 (and be saved with the state).
    loader = DataLoader(Steps(), batch_size=None, num_workers=workers, prefetch_factor=2,
                        worker_init_fn=_batch_worker_init, multiprocessing_context="fork",
                        generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    try:
        for expected, (step, batch) in zip(range(start, stop), it):
            if step != expected:
                raise RuntimeError(f"the batch of step {step} was delivered for step {expected}")
            yield batch
    finally:
        it._shutdown_workers()  # now, also when the loop stops early or fails, not when it is collected


def _batch_worker_init(worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # N workers beside the training process: one thread each


def checkpoint_dirs(checkpoint_dir: str | Path) -> list[Path]:
    """Complete saved states under ``checkpoint_dir``, oldest first."""
    root = Path(checkpoint_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.is_dir() and (p / STATE_NAME).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def read_training_log(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``training_log.json`` of a (possibly unfinished) run: ``{"log", "records", "step", "total_steps",
    "wall_s", "cpu_s", "fingerprint"}``. Raises ``FileNotFoundError`` naming the file when absent."""
    path = Path(checkpoint_dir) / LOG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; no training run has saved its log here")
    return json.loads(path.read_text())


def _differences(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _to_device(batch: Any, device) -> Any:
    from accelerate.utils import send_to_device

    return send_to_device(batch, device)


def _scalar(v) -> Any:
    import torch

    return v.detach() if isinstance(v, torch.Tensor) else float(v)


def train_loop(
    model,  # the module to train (trained in place; its parameters receive the updates)
    param_groups: Sequence[dict[str, Any]] | Iterable,  # optimiser groups (dicts with "params") or parameters
    batches: Callable[[int], Iterator[Any]] | None,  # start step -> this process's batches from that step on
    loss_fn: Callable[[Any, Any, int], tuple[Any, dict[str, Any]]],  # (model, batch, step) -> (loss, info)
    config: LoopConfig,
    *,
    checkpoint_dir: str | Path | None = None,  # where states and the log are saved (None: nowhere)
    fingerprint: dict[str, Any] | None = None,  # JSON-able: everything that decides the run
    resume: bool = True,  # continue from a saved state with the same fingerprint
    extra_state: Sequence[Any] = (),  # objects with state_dict/load_state_dict saved with each state
    on_step_end: Callable[[StepContext], bool | None] | None = None,  # after each step; True asks for a save
    context: Callable[[Any], contextlib.AbstractContextManager] | None = None,  # model -> around each loss
    accelerator=None,  # an Accelerator (default: make_accelerator(config.device, config.mixed_precision))
    log: Callable[[str], None] | None = None,  # where notices go (default: the accelerator's print)
) -> TrainResult:
    """Train ``model`` for ``config.steps`` optimizer steps (see the module docstring).

    ``batches(start)`` yields one batch per step from step ``start`` on (tensors, or
    dicts/lists of them: moved to the device here); None means the loss function
    draws its own data (``batch`` is then None). ``loss_fn`` returns a scalar loss
    tensor and a dict of scalars (tensors or floats) averaged into the loss log.
    Nothing here draws random numbers: seed before building the model. The model is
    left in eval mode; the caller keeps its reference (the weights are trained in place).
    """
    import torch
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    acc = accelerator if accelerator is not None else make_accelerator(config.device, config.mixed_precision)
    say = log or acc.print
    groups = list(param_groups)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    if not any(len(list(g["params"])) for g in groups):
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    prepared, optimizer = acc.prepare(model, optimizer)
    if extra_state:
        acc.register_for_checkpointing(*extra_state)
    fingerprint = json.loads(json.dumps(fingerprint or {}, default=str))

    root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state = TrainingState()
    saved = checkpoint_dirs(root) if root is not None and resume else []
    if saved:
        latest = saved[-1]
        meta = json.loads((latest / STATE_NAME).read_text())
        if meta.get("fingerprint") == fingerprint:
            acc.load_state(str(latest))
            state = TrainingState.from_json(meta["state"])
        else:
            diff = _differences(fingerprint, meta.get("fingerprint", {}))
            say(f"{latest}: saved state was made with other settings ({', '.join(diff)}); starting afresh")
            saved = []
    if root is not None and not saved and (root / CHECKPOINTS).exists() and acc.is_main_process:
        shutil.rmtree(root / CHECKPOINTS)  # states of another run, or resume=False
    resumed_from = state.step

    def write_log() -> None:
        if root is not None and acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            (root / LOG_NAME).write_text(json.dumps(
                {"fingerprint": fingerprint, "total_steps": config.steps, **state.to_json()}, indent=1))

    def save() -> None:
        if root is None:
            return
        # NOTE: the steps since the last log entry are saved too (averaged over processes), so
        # that a resumed run writes the same log entries as an uninterrupted one.
        state.pending = [[_mean(acc, [loss]), {k: _mean(acc, [v]) for k, v in info.items()}, lr]
                         for loss, info, lr in state.pending]
        final = root / CHECKPOINTS / f"step_{state.step:06d}"
        tmp = root / CHECKPOINTS / f"step_{state.step:06d}.partial"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            (tmp / STATE_NAME).write_text(json.dumps({"fingerprint": fingerprint, "state": state.to_json()}))
            # NOTE: a state is complete before it gets its final name, and older ones go only
            # then: an interruption while saving leaves the previous complete state in place.
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            for old in checkpoint_dirs(root)[:-max(1, config.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        write_log()
        acc.wait_for_everyone()

    def result() -> TrainResult:
        return TrainResult(state.step, config.steps, resumed_from, state.step >= config.steps, state.log,
                           state.records, time.perf_counter() - t0, state)

    end = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
    if state.step >= end:
        model.eval()
        return result()

    # NOTE: clipped in the model's own parameter order: the global norm sums per-tensor
    # norms in that order, and another order changes it in the last bits.
    params = [p for p in prepared.parameters() if p.requires_grad]
    ctx = context or (lambda m: contextlib.nullcontext())
    wall0, cpu0 = time.perf_counter() - state.wall_s, time.process_time() - state.cpu_s
    bar = tqdm(total=config.steps, initial=state.step, desc=config.desc,
               disable=not (config.progress and acc.is_local_main_process))
    source = iter(batches(state.step)) if batches is not None else None
    prepared.train()
    try:
        while state.step < end:
            step = state.step
            batch = _to_device(next(source), acc.device) if source is not None else None
            lr = learning_rate(step, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio)
            for g in optimizer.param_groups:
                g["lr"] = lr
            with acc.autocast(), ctx(prepared):
                loss, info = loss_fn(prepared, batch, step)
            acc.backward(loss)
            if config.grad_clip:
                acc.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.pending.append([loss.detach(), {k: _scalar(v) for k, v in (info or {}).items()}, lr])
            if state.step % config.log_every == 0 or state.step == config.steps:
                entry = _log_entry(acc, state.step, lr, state.pending)
                state.log.append(entry)
                state.pending = []
                bar.set_postfix(loss=f"{entry['loss']:.4f}")
            bar.update(1)
            state.wall_s = time.perf_counter() - wall0
            state.cpu_s = time.process_time() - cpu0
            wants_save = False
            if on_step_end is not None:
                wants_save = bool(on_step_end(StepContext(prepared, acc, state, config)))
                state.wall_s = time.perf_counter() - wall0
                state.cpu_s = time.process_time() - cpu0
            periodic = bool(config.save_every) and state.step % config.save_every == 0
            if wants_save or periodic or state.step == end:
                save()
    except KeyboardInterrupt:
        save()
        bar.close()
        raise
    finally:
        if hasattr(source, "close"):
            source.close()  # a generator's cleanup (e.g. its worker processes) runs now
    bar.close()
    write_log()
    acc.wait_for_everyone()
    model.eval()
    return result()


def _mean(acc, values: list) -> float:
    """Mean over ``values`` (scalar tensors or numbers) of their means over processes, as a float."""
    import torch

    vals = [v.detach().double() if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)
            for v in values]
    per_step = acc.reduce(torch.stack([v.to(acc.device) for v in vals]), reduction="mean")
    return float(np.mean([float(v) for v in per_step.cpu()]))


def _log_entry(acc, step: int, lr: float, pending: list) -> dict[str, float]:
    """One loss-log entry: the means over the ``pending`` steps ([loss, info, lr] each), over processes."""
    entry: dict[str, float] = {"step": step, "loss": _mean(acc, [p[0] for p in pending]), "lr": lr}
    for k in dict.fromkeys(k for p in pending for k in p[1]):
        entry[k] = _mean(acc, [p[1][k] for p in pending if k in p[1]])
    return entry
