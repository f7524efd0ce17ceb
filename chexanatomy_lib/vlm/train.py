"""The fine-tuning loop: HF Accelerate, AdamW + warmup/cosine, resumable checkpoints.

Data order and augmentation are pure functions of (seed, step, slot), so a run
interrupted after a checkpoint and resumed reproduces the uninterrupted run's
weights exactly (same device, same seed). On several processes (`accelerate
launch`, torchrun) each process takes every `num_processes`-th slot of the
global batch and gradients are averaged by DDP.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

STATE_NAME = "trainer_state.json"
LOSS_NAME = "loss.json"


@dataclass
class TrainConfig:
    """Training settings (flat values; the notebook's parameters map onto these)."""

    steps: int = 300  # optimizer steps
    batch_size: int = 8  # global batch (samples per step, over all processes)
    lr: float = 1e-3  # peak learning rate (tiny random models); 5e-5 for LoRA on checkpoints
    weight_decay: float = 0.01  # AdamW weight decay
    beta2: float = 0.999  # AdamW beta2
    warmup_steps: int = 20  # linear warmup steps, then cosine decay to 0
    grad_clip: float = 1.0  # max global gradient norm
    loc_sigma: float = 0.0  # >0: loc-token targets spread as a Gaussian of this many bins (0: plain cross-entropy)
    loc_weight: float = 1.0  # weight of a `<loc>` target token relative to any other answer token in the loss
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (Accelerate)
    gradient_checkpointing: bool = False  # recompute activations in backward (saves memory)
    compile_layers: bool = False  # torch.compile each decoder and vision-encoder layer (GPU; see vlm.model.compile_layers)
    save_every: int = 0  # checkpoint every K steps (0: only the final state)
    keep_checkpoints: int = 2  # how many step checkpoints to keep
    log_every: int = 5  # loss log interval (steps)
    seed: int = 0  # data order and augmentation seed
    device: str = "auto"  # "auto" (CUDA if available), "cpu" or "cuda"
    stop_after: int | None = None  # stop after this step (simulates an interruption)

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', not {self.mixed_precision!r}")


@dataclass
class TrainResult:
    """What `train` returns: the loss log and timing."""

    log: list[dict[str, float]] = field(default_factory=list)  # {"step", "loss", "lr", "seconds"}
    steps_done: int = 0
    resumed_from: int = 0  # step the run resumed from (0: fresh start)
    seconds: float = 0.0  # wall time of this call
    finished: bool = False  # reached config.steps


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier in [0, 1]: linear warmup over `warmup` steps then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def token_loss(logits, labels, loc_start: int = -1, loc_sigma: float = 0.0, n_bins: int = 1024,
               loc_weight: float = 1.0):
    """Next-token cross-entropy (mean over supervised tokens, `<loc>` targets weighted by `loc_weight`).

    logits: float [B, L, V]; labels: int [B, L] with -100 where unsupervised
    (the processor's labels, not yet shifted). With `loc_sigma` > 0, a `<loc>`
    target bin t is replaced by a Gaussian over the loc bins centred on t
    (standard deviation `loc_sigma` bins): a near miss costs less than a far one.
    With `loc_weight` != 1 the mean is weighted: a `<loc>` target counts `loc_weight`
    times as much as any other token (four box tokens per structure are otherwise
    outweighed by its sixteen seg tokens and its name).
    """
    import torch
    import torch.nn.functional as F

    lg = logits[:, :-1].float()
    tgt = labels[:, 1:]
    keep = tgt != -100
    lg, tgt = lg[keep], tgt[keep]  # [T, V], [T]
    logp = F.log_softmax(lg, dim=-1)
    nll = -logp.gather(1, tgt[:, None])[:, 0]
    if loc_sigma > 0 and loc_start >= 0:
        is_loc = (tgt >= loc_start) & (tgt < loc_start + n_bins)
        if is_loc.any():
            bins = torch.arange(n_bins, device=lg.device, dtype=torch.float32)
            t = (tgt[is_loc] - loc_start).float()
            q = torch.exp(-0.5 * ((bins[None, :] - t[:, None]) / loc_sigma) ** 2)
            q = q / q.sum(1, keepdim=True)
            soft = -(q * logp[is_loc][:, loc_start:loc_start + n_bins]).sum(1)
            nll = nll.clone()
            nll[is_loc] = soft
    if loc_weight != 1.0 and loc_start >= 0:
        is_loc = (tgt >= loc_start) & (tgt < loc_start + n_bins)
        w = torch.where(is_loc, torch.full_like(nll, float(loc_weight)), torch.ones_like(nll))
        return (w * nll).sum() / w.sum()
    return nll.mean()


def target_span(labels) -> int:
    """How many trailing positions of a batch hold every supervised token and the one
    before it (which predicts it): ``L - min(first supervised position) + 1``.

    labels: int [B, L], -100 where unsupervised. Logits of the last ``target_span``
    positions (``logits_to_keep``) are all the loss needs, and the 257k-way
    vocabulary head is then not computed on the image and prompt positions.
    """
    length = int(labels.shape[1])
    sup = labels != -100
    rows = sup.any(dim=1)
    if not bool(rows.any()):
        return length
    first = int(sup.int().argmax(dim=1)[rows].min())
    return length - first + 1 if first > 0 else length


def _lora_in_compute_dtype(model, mixed_precision: str):
    """Under mixed precision, let LoRA layers take their bf16/fp16 input as it is.

    NOTE: peft keeps adapter weights in fp32 and, by default, casts each LoRA
    layer's input to fp32 first: a copy of every projection's input, and fp32
    matrix products, in every layer. Under autocast the products run in the
    compute dtype anyway, so the cast is only cost (on an H100 it took a fifth of
    the GPU time of a PaliGemma 2 3B LoRA step; see benchmarks/bench_vlm_gpu.py).
    The fp32 adapter weights stay the optimizer's master weights.
    """
    import contextlib

    if mixed_precision == "no":
        return contextlib.nullcontext()
    try:
        from peft.helpers import disable_input_dtype_casting
    except ImportError:  # older peft: no such switch
        return contextlib.nullcontext()
    from accelerate.utils import extract_model_from_parallel

    inner = extract_model_from_parallel(model)
    return disable_input_dtype_casting(inner) if hasattr(inner, "peft_config") else contextlib.nullcontext()


def batch_slots(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Dataset positions (into the training index list, 0..n-1) of global batch `step`.

    Epoch `e` visits a permutation drawn from `default_rng([seed, e])`; the batch
    is positions `step*batch_size ... +batch_size` of that endless sequence.
    """
    out = []
    for j in range(batch_size):
        p = step * batch_size + j
        epoch, k = divmod(p, n)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[k]))
    return out


def _latest_checkpoint(ckpt_root: Path) -> Path | None:
    if not ckpt_root.is_dir():
        return None
    done = sorted((p for p in ckpt_root.glob("step_*") if (p / STATE_NAME).is_file()),
                  key=lambda p: int(p.name.split("_")[1]))
    return done[-1] if done else None


def make_accelerator(config: TrainConfig):
    """An `Accelerator` for `config` (CPU forced when `device="cpu"` or no CUDA)."""
    from accelerate import Accelerator

    from ..devices import resolve_device

    return Accelerator(mixed_precision=config.mixed_precision, cpu=resolve_device(config.device) == "cpu")


def train(
    vlm,
    sample_fn: Callable[[int, np.random.Generator], Any],
    train_indices: Sequence[int],
    config: TrainConfig,
    out_dir: str | Path,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune `vlm.model` in place on samples `sample_fn(dataset_row, rng) -> Sample`.

    train_indices: dataset rows to draw from (int [n]).
    out_dir: gets `checkpoints/step_NNNNNN/` (Accelerate state + `trainer_state.json`)
        and `loss.json` (the loss log); with `resume`, the latest checkpoint there is loaded first.
    Returns a `TrainResult`; `vlm.model` holds the trained weights (unwrapped).
    """
    import torch
    from tqdm.auto import tqdm

    from .tasks import encode_batch

    out = Path(out_dir)
    ckpt_root = out / "checkpoints"
    indices = [int(i) for i in train_indices]
    if not indices:
        raise ValueError("no training images (empty train_indices)")
    accelerator = make_accelerator(config)
    model = vlm.model
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if config.compile_layers:
        from .model import compile_layers

        compile_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, config.beta2),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, config.warmup_steps, config.steps))
    # NOTE: the scheduler is not passed to prepare(): Accelerate would step it once
    # per process per step. It is registered so that save_state/load_state keep it.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    result = TrainResult()
    start = 0
    latest = _latest_checkpoint(ckpt_root) if resume else None
    if latest is not None and not _same_run(json.loads((latest / STATE_NAME).read_text()).get("config", {}), config):
        if accelerator.is_main_process:
            print(f"not resuming from {latest}: it was written with other training settings")
        latest = None
    if latest is not None:
        accelerator.load_state(str(latest))
        state = json.loads((latest / STATE_NAME).read_text())
        start = int(state["step"])
        result.log = list(state.get("log", []))
        result.resumed_from = start
    loc_start = int(vlm.processor.tokenizer.convert_tokens_to_ids("<loc0000>"))
    rank, world = accelerator.process_index, accelerator.num_processes
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {world} processes")
    t0 = time.perf_counter()
    end = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
    model.train()
    bar = tqdm(range(start, end), initial=start, total=config.steps, desc="fine-tuning",
               disable=not (progress and accelerator.is_main_process))
    running: list[float] = []
    for step in bar:
        slots = batch_slots(step, config.batch_size, len(indices), config.seed)
        mine = range(rank, config.batch_size, world)
        samples = [sample_fn(indices[slots[j]], np.random.default_rng([config.seed, step, j, 7])) for j in mine]
        batch = encode_batch(vlm.processor, samples, train=True)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        keep = target_span(labels)
        with accelerator.autocast(), _lora_in_compute_dtype(model, config.mixed_precision):
            # NOTE: the loss is computed here, not by the model, so that loc targets
            # can be smoothed; with loc_sigma=0 it equals the model's own loss. The
            # vocabulary head runs on the positions that predict targets only.
            logits = model(**batch, logits_to_keep=keep).logits
            loss = token_loss(logits, labels[:, -keep:], loc_start, config.loc_sigma,
                              loc_weight=config.loc_weight)
        accelerator.backward(loss)
        if config.grad_clip:
            accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_val = float(accelerator.reduce(loss.detach(), reduction="mean"))
        running.append(loss_val)
        done = step + 1
        if done % config.log_every == 0 or done == end:
            entry = {"step": done, "loss": float(np.mean(running)), "lr": float(scheduler.get_last_lr()[0]),
                     "seconds": time.perf_counter() - t0}
            result.log.append(entry)
            running = []
            bar.set_postfix(loss=f"{entry['loss']:.3f}")
        if config.save_every and done % config.save_every == 0 and done < config.steps:
            _save(accelerator, ckpt_root, done, result.log, config)
    bar.close()
    result.steps_done = end
    result.finished = end >= config.steps
    result.seconds = time.perf_counter() - t0
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / LOSS_NAME).write_text(json.dumps({"config": asdict(config), "log": result.log}, indent=1))
    if config.gradient_checkpointing:
        accelerator.unwrap_model(model).gradient_checkpointing_disable()
    vlm.model = accelerator.unwrap_model(model)
    vlm.model.eval()
    accelerator.wait_for_everyone()
    return result


# Settings that may differ between an interrupted run and its continuation.
_RESUME_FREE = ("save_every", "keep_checkpoints", "log_every", "device", "stop_after")


def _same_run(saved: dict, config: TrainConfig) -> bool:
    now = asdict(config)
    return all(saved.get(k) == v for k, v in now.items() if k not in _RESUME_FREE)


def _save(accelerator, ckpt_root: Path, step: int, log: list, config: TrainConfig) -> None:
    d = ckpt_root / f"step_{step:06d}"
    accelerator.save_state(str(d))
    if accelerator.is_main_process:
        (d / STATE_NAME).write_text(json.dumps({"step": step, "log": log, "config": asdict(config)}))
        old = sorted((p for p in ckpt_root.glob("step_*")), key=lambda p: int(p.name.split("_")[1]))
        import shutil

        for p in old[:-max(1, config.keep_checkpoints)]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()


def read_loss_log(out_dir: str | Path) -> list[dict[str, float]]:
    """The loss log written by `train` (`loss.json` in `out_dir`)."""
    f = Path(out_dir) / LOSS_NAME
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no loss log (has training run?)")
    return json.loads(f.read_text())["log"]
