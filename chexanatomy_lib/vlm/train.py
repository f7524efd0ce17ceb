"""Fine-tuning PaliGemma: the VLM's batches and loss in the project's training loop.

The loop (:func:`chexanatomy_lib.training.train_loop`) owns Accelerate, the schedule,
resumable checkpoints, progress and the loss log; this module supplies the model's
parameter groups, its batches and its token loss. Data order and augmentation are
pure functions of (seed, step, slot), so a run interrupted after a checkpoint and
resumed reproduces the uninterrupted run's weights exactly (same device, same seed).
On several processes (`accelerate launch`, torchrun) each process takes every
`num_processes`-th slot of the global batch and gradients are averaged by DDP.
A batch (samples drawn, augmented and encoded into tokens, then tokenised) is made on
the training process when the step needs it, or, with `batch_workers` > 0, by that many
CPU worker processes a few steps ahead while the step runs (the same batches, in the
same order: the loss log is bit-identical).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..codec.geometry import NUM_LOC_BINS

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
    save_every: int = 0  # save the training state every K steps (0: at the end and on Ctrl-C only)
    keep_checkpoints: int = 2  # how many step checkpoints to keep
    log_every: int = 5  # loss log interval (steps)
    seed: int = 0  # data order and augmentation seed
    device: str = "auto"  # "auto" (CUDA if available), "cpu" or "cuda"
    stop_after: int | None = None  # stop after this step (simulates an interruption)
    batch_workers: int = 0  # processes preparing batches ahead of the step (0: the training process itself)

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")
        if self.batch_workers < 0:
            raise ValueError(f"batch_workers must be >= 0, not {self.batch_workers}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', not {self.mixed_precision!r}")


def token_loss(logits, labels, loc_start: int = -1, loc_sigma: float = 0.0, n_bins: int = NUM_LOC_BINS,
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


# Settings that may differ between an interrupted run and its continuation.
_RESUME_FREE = ("save_every", "keep_checkpoints", "log_every", "device", "stop_after", "batch_workers")


def train(
    vlm,
    sample_fn: Callable[[int, np.random.Generator], Any],
    train_indices: Sequence[int],
    config: TrainConfig,
    out_dir: str | Path | None,
    resume: bool = True,
    progress: bool = True,
):
    """Fine-tune `vlm.model` in place on samples `sample_fn(dataset_row, rng) -> Sample`.

    train_indices: dataset rows to draw from (int [n]).
    out_dir: gets `checkpoints/step_NNNNNN/` (the loop's saved states) and
        `training_log.json` (the loss log); with `resume`, the latest state there made
        with the same settings is continued. None: nothing is saved (a short few-shot
        run that is scored and discarded); the loss log is in the returned result.
    Returns the loop's `TrainResult`; `vlm.model` holds the trained weights (eval mode).

    Where batches are made: `sample_fn` and `vlm.processor` run on this process, between
    steps (`config.batch_workers` = 0), or in `batch_workers` processes forked from this
    one, a few steps ahead, while this process runs the steps (`training.prefetch_batches`).
    Workers use one torch thread each and no GPU: `sample_fn` must then keep to the CPU
    (a codec on the CPU, as `MaskCodec` loads). With several training processes each
    has its own workers for its own share of the slots.
    """
    from ..training import LoopConfig, make_accelerator, prefetch_batches, process_share, train_loop
    from .tasks import encode_batch

    indices = [int(i) for i in train_indices]
    if not indices:
        raise ValueError("no training images (empty train_indices)")
    model = vlm.model
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if config.compile_layers:
        from .model import compile_layers

        compile_layers(model)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    loc_start = int(vlm.processor.tokenizer.convert_tokens_to_ids("<loc0000>"))
    loop = LoopConfig(steps=config.steps, lr=config.lr, warmup_steps=config.warmup_steps,
                      weight_decay=config.weight_decay, betas=(0.9, config.beta2), grad_clip=config.grad_clip,
                      device=config.device, mixed_precision=config.mixed_precision, save_every=config.save_every,
                      keep_checkpoints=config.keep_checkpoints, log_every=config.log_every,
                      stop_after=config.stop_after, desc="fine-tuning", progress=progress)
    accelerator = make_accelerator(config.device, config.mixed_precision)
    share = process_share(config.batch_size, accelerator)

    def make_batch(step: int) -> dict:  # this process's share of global batch `step`
        slots = batch_slots(step, config.batch_size, len(indices), config.seed)
        samples = [sample_fn(indices[slots[j]], np.random.default_rng([config.seed, step, j, 7])) for j in share]
        return encode_batch(vlm.processor, samples, train=True)

    def batches(start: int):
        return prefetch_batches(make_batch, start, config.steps, config.batch_workers)

    def loss_fn(prepared, batch: dict, step: int):
        labels = batch.pop("labels")
        keep = target_span(labels)
        # NOTE: the loss is computed here, not by the model, so that loc targets can be
        # smoothed; with loc_sigma=0 it equals the model's own loss. The vocabulary head
        # runs on the positions that predict targets only.
        logits = prepared(**batch, logits_to_keep=keep).logits
        return token_loss(logits, labels[:, -keep:], loc_start, config.loc_sigma, loc_weight=config.loc_weight), {}

    fingerprint = {k: v for k, v in asdict(config).items() if k not in _RESUME_FREE}
    fingerprint["n_train"] = len(indices)
    result = train_loop(model, groups, batches, loss_fn, loop, checkpoint_dir=out_dir, fingerprint=fingerprint,
                        resume=resume, context=lambda m: _lora_in_compute_dtype(m, config.mixed_precision),
                        accelerator=accelerator)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return result


def train_image_level(vlm, dataset, rows: Sequence[int], structures: Sequence[str], codec, out_dir: str | Path,
                         steps: int, batch_size: int, lr: float, seed: int, device: str = "auto",
                         resume: bool = True, card: dict | None = None, progress: bool = True):
    """Train the image-level control in place and save it to ``out_dir/checkpoint``.

    ``vlm``: a freshly built model of the anatomy model's architecture (chapter 3 builds it
    with its own ``load_vlm`` settings); it trains for ``steps`` on dataset ``rows`` with
    image-level tasks only: the view's orientation, and whether each of ``structures`` is
    visible (``"visible heart"`` -> ``"yes"``/``"no"``), never a box or a mask. The loop's
    state is saved under ``out_dir`` (resumed when a run with the same settings stopped
    there). Returns the loop's ``TrainResult``.
    """
    from .model import save_vlm
    from .tasks import TaskSampler

    sampler = TaskSampler(dataset, codec, list(structures), task_mix={"view": 0.3, "visible": 0.7})
    config = TrainConfig(steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                         warmup_steps=max(1, int(steps) // 20), seed=int(seed), device=device,
                         save_every=max(1, int(steps) // 4))
    result = train(vlm, sampler.sample, list(rows), config, out_dir, resume=resume, progress=progress)
    save_vlm(vlm, Path(out_dir) / "checkpoint", {"pretraining": "image-level (view, visible)", "steps": int(steps),
                                                 "seed": int(seed), "visible_structures": list(structures),
                                                 "train_seconds": round(result.state.wall_s, 1), **(card or {})})
    return result
