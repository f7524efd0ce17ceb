"""Training loop of the U-Net baseline (HF Accelerate).

`train_unet` trains on one split of a projected dataset and writes into a
checkpoint folder (see `chexanatomy_lib.unet.checkpoint`):

- `training_state/` every `checkpoint_every` optimizer steps and at each epoch's
  end: model, optimizer, scheduler and RNG states (`Accelerator.save_state`) plus
  `trainer_state.json` (epoch, batch within the epoch, step, learning curves).
  Data order and augmentation are pure functions of `(seed, epoch)`, so a run
  resumed from any saved state continues with the very batches it would have
  seen: interrupted-and-resumed and uninterrupted runs end with the same weights.
- `history.json`: learning curves, per step (training loss) and per epoch
  (mean training loss, validation loss), rewritten at every save.
- `model.safetensors` + `model_card.json` once training is complete.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..devices import resolve_device

from .checkpoint import CheckpointError, save_model
from .data import Augmentation, SegmentationSamples, default_structures
from .loss import MaskedDiceBCELoss
from .model import UNetConfig, build_unet, count_parameters

__all__ = ["TrainConfig", "TrainResult", "train_unet", "load_history", "resolve_device"]

STATE_DIR = "training_state"
STATE_FILE = "trainer_state.json"
HISTORY_FILE = "history.json"
# Settings that do not change what is computed; a saved state made with other
# values of these can still be resumed.
_RESUMABLE_ACROSS = ("device", "checkpoint_every", "num_workers")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run."""

    structures: tuple[str, ...] | None = None  # output channels; None = default_structures(dataset)
    input_size: int = 128  # side of the square model input (px); the VLM's input resolution
    epochs: int = 12  # passes over the training split
    batch_size: int = 8  # images per optimizer step
    lr: float = 1e-2  # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_frac: float = 0.05  # fraction of steps with linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0  # max gradient norm (0 = no clipping)
    dice_weight: float = 1.0  # weight of the Dice term of the loss
    bce_weight: float = 1.0  # weight of the binary cross-entropy term
    model: UNetConfig = field(default_factory=UNetConfig)  # architecture
    augmentation: Augmentation = field(default_factory=Augmentation)  # geometric augmentation bounds
    seed: int = 0  # weights init, data order and augmentation
    device: str = "auto"  # "auto" (CUDA if available), "cpu" or "cuda"
    mixed_precision: str = "auto"  # "auto" (bf16/fp16 on CUDA, none on CPU), "no", "bf16", "fp16"
    checkpoint_every: int = 50  # optimizer steps between saved training states
    num_workers: int = 0  # DataLoader worker processes

    def __post_init__(self) -> None:
        if self.structures is not None:
            object.__setattr__(self, "structures", tuple(self.structures))
        if isinstance(self.model, dict):
            object.__setattr__(self, "model", UNetConfig.from_dict(self.model))
        if isinstance(self.augmentation, dict):
            object.__setattr__(self, "augmentation", Augmentation(**self.augmentation))
        for name in ("input_size", "epochs", "batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.input_size % self.model.size_multiple:
            raise ValueError(
                f"input_size {self.input_size} must be a multiple of {self.model.size_multiple} "
                f"(the product of the U-Net strides {self.model.strides})"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'auto', 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["structures"] = None if self.structures is None else list(self.structures)
        d["model"] = self.model.to_dict()
        return d


@dataclass
class TrainResult:
    """What a call of `train_unet` did."""

    checkpoint_dir: Path  # the folder written
    structures: list[str]  # output channels, in order
    steps_done: int  # optimizer steps completed so far (all calls together)
    total_steps: int  # steps of the complete run
    resumed_from_step: int  # 0 for a fresh start
    finished: bool  # True once the model card and weights are written
    history: dict[str, list[dict[str, float]]]  # {"steps": [...], "epochs": [...]}
    wall_s: float  # seconds spent in this call
    n_parameters: int  # trainable parameters of the network


def _mixed_precision(setting: str, device: str) -> str:
    if setting != "auto":
        if setting != "no" and device == "cpu":
            raise ValueError(f"mixed_precision={setting!r} needs a CUDA device")
        return setting
    if device == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Positions of the training split in epoch `epoch`, shuffled, cut into batches."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


def _lr_lambda(total: int, warmup: int):
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    return {
        "image": torch.stack([it["image"] for it in items]),
        "target": torch.stack([it["target"] for it in items]),
        "valid": torch.stack([it["valid"] for it in items]),
    }


class _EpochBatches(torch.utils.data.Sampler):
    """Batch sampler yielding `(epoch, position)` keys so items know their epoch."""

    def __init__(self, batches: list[list[int]], epoch: int):
        self.batches, self.epoch = batches, epoch

    def __iter__(self):
        for b in self.batches:
            yield [(self.epoch, p) for p in b]

    def __len__(self) -> int:
        return len(self.batches)


def _fingerprint(config: TrainConfig, structures: list[str], dataset_key: dict[str, Any]) -> dict[str, Any]:
    d = config.to_dict()
    for k in _RESUMABLE_ACROSS:
        d.pop(k, None)
    d["structures"] = list(structures)
    d["dataset"] = dataset_key
    return json.loads(json.dumps(d))


def _dataset_key(dataset: Any, n_train: int) -> dict[str, Any]:
    return {"image_size": list(np.atleast_1d(dataset.image_size).tolist()), "n_train": int(n_train)}


def load_history(checkpoint_dir: str | Path) -> dict[str, list[dict[str, float]]]:
    """Learning curves of a (possibly unfinished) run: {"steps": [{step, epoch, loss,
    dice_loss, bce, lr}], "epochs": [{epoch, step, train_loss, val_loss, val_dice_loss,
    val_bce, wall_s, cpu_s}]} (wall_s, cpu_s: seconds of training so far, wall clock and
    process CPU time over all threads; losses as in `MaskedDiceBCELoss`; val_* only with a val split)."""
    path = Path(checkpoint_dir) / HISTORY_FILE
    if not path.is_file():
        raise CheckpointError(path, "missing; no training run has saved learning curves here")
    return json.loads(path.read_text())


@torch.no_grad()
def _validate(model, samples: SegmentationSamples, loss_fn, accelerator, batch_size: int) -> dict[str, float]:
    model.eval()
    sums = {"loss": 0.0, "dice_loss": 0.0, "bce": 0.0}
    n = 0
    for start in range(0, len(samples), batch_size):
        batch = _collate([samples[p] for p in range(start, min(start + batch_size, len(samples)))])
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            logits = model(batch["image"])
        out = loss_fn(logits, batch["target"], batch["valid"])
        k = batch["image"].shape[0]
        for key, name in (("loss", "loss"), ("dice_loss", "dice"), ("bce", "bce")):
            sums[key] += float(out[name]) * k
        n += k
    model.train()
    return {key: v / max(n, 1) for key, v in sums.items()}


def train_unet(
    dataset: Any,  # chexanatomy_lib.ct.dataset.ProjectedDataset
    checkpoint_dir: str | Path,  # folder for training state, curves, weights and model card
    config: TrainConfig | None = None,  # the run's settings
    *,
    resume: bool = True,  # continue from a saved state made with the same settings
    stop_after_steps: int | None = None,  # save and return after this many steps in all (an interruption)
    progress: bool = True,  # show a tqdm progress bar
) -> TrainResult:
    """Train the baseline on the dataset's train split, validating on its val split
    after every epoch; returns a TrainResult.

    With `resume=True` a saved training state whose settings match `config` is
    continued (a finished run is returned as is); a state made with other settings
    is reported and replaced by a fresh run. Ctrl-C saves the state before stopping.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    config = config or TrainConfig()
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    structures = list(config.structures) if config.structures is not None else default_structures(dataset, "train")
    if not structures:
        raise ValueError("no structures to train on: every structure is truncated or absent in the train split")

    device = resolve_device(config.device)
    accelerator = Accelerator(
        cpu=device == "cpu",
        mixed_precision=_mixed_precision(config.mixed_precision, device),
        step_scheduler_with_optimizer=False,
    )
    set_seed(config.seed)

    train = SegmentationSamples(dataset, "train", structures, config.input_size, config.augmentation, config.seed)
    has_val = len(np.asarray(dataset.split_indices("val"))) > 0
    val = SegmentationSamples(dataset, "val", structures, config.input_size, None, config.seed) if has_val else None

    model = build_unet(len(structures), config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    world = accelerator.num_processes
    per_process = batches_per_epoch // world if world > 1 else batches_per_epoch
    if per_process < 1:
        raise ValueError(f"{len(train)} training images are too few for batch size {config.batch_size} on {world} processes")
    total_steps = per_process * config.epochs
    warmup = int(round(config.warmup_frac * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total_steps, warmup))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    loss_fn = MaskedDiceBCELoss(config.dice_weight, config.bce_weight)

    fingerprint = _fingerprint(config, structures, _dataset_key(dataset, len(train)))
    state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "epoch_loss_sum": 0.0, "epoch_n": 0,
             "wall_s": 0.0, "cpu_s": 0.0, "history": {"steps": [], "epochs": []}}
    state_dir = root / STATE_DIR
    resumed_from = 0
    if resume and (state_dir / STATE_FILE).is_file():
        saved = json.loads((state_dir / STATE_FILE).read_text())
        if saved.get("fingerprint") == fingerprint:
            accelerator.load_state(str(state_dir))
            state = saved["state"]
            resumed_from = state["step"]
        else:
            diff = sorted(k for k in set(fingerprint) | set(saved.get("fingerprint", {}))
                          if fingerprint.get(k) != saved.get("fingerprint", {}).get(k))
            accelerator.print(f"{state_dir}: saved state was made with other settings ({', '.join(diff)}); starting afresh")

    def save_state() -> None:
        if not accelerator.is_main_process:
            accelerator.wait_for_everyone()
            return
        tmp = root / (STATE_DIR + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        accelerator.save_state(str(tmp))
        (tmp / STATE_FILE).write_text(json.dumps({"fingerprint": fingerprint, "state": state}))
        # NOTE: the new state is written completely before the old one is removed,
        # so an interruption while saving leaves at least one complete state.
        old = root / (STATE_DIR + ".old")
        if state_dir.exists():
            if old.exists():
                shutil.rmtree(old)
            state_dir.rename(old)
        tmp.rename(state_dir)
        if old.exists():
            shutil.rmtree(old)
        (root / HISTORY_FILE).write_text(json.dumps(state["history"]))
        accelerator.wait_for_everyone()

    def result(finished: bool) -> TrainResult:
        return TrainResult(root, structures, state["step"], total_steps, resumed_from, finished,
                           state["history"], time.perf_counter() - t0, count_parameters(accelerator.unwrap_model(model)))

    def finish() -> TrainResult:
        if accelerator.is_main_process:
            card = {
                "structures": structures,
                "input_size": config.input_size,
                "threshold": 0.5,
                "model": config.model.to_dict(),
                "training": {**config.to_dict(), "steps": state["step"], "device": device,
                             "image_size": _dataset_key(dataset, len(train))["image_size"],
                             "n_train_images": len(train), "n_val_images": len(val) if val else 0},
            }
            save_model(root, accelerator.unwrap_model(model), card)
            (root / HISTORY_FILE).write_text(json.dumps(state["history"]))
        accelerator.wait_for_everyone()
        return result(True)

    if state["step"] >= total_steps:
        if not (root / "model.safetensors").is_file():
            return finish()
        return result(True)

    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], desc="U-Net training", disable=not (progress and accelerator.is_local_main_process))
    t_resume = time.perf_counter() - state["wall_s"]
    cpu_resume = time.process_time() - state.get("cpu_s", 0.0)
    try:
        while state["epoch"] < config.epochs:
            epoch = state["epoch"]
            batches = _epoch_batches(len(train), config.batch_size, config.seed, epoch)[: per_process * world]
            mine = batches[accelerator.process_index :: world][state["batch_in_epoch"] :]
            loader = torch.utils.data.DataLoader(
                train, batch_sampler=_EpochBatches(mine, epoch), collate_fn=_collate, num_workers=config.num_workers
            )
            for batch in loader:
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                with accelerator.autocast():
                    logits = model(batch["image"])
                out = loss_fn(logits, batch["target"], batch["valid"])
                accelerator.backward(out["loss"])
                if config.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["batch_in_epoch"] += 1
                loss = float(out["loss"].detach())
                state["epoch_loss_sum"] += loss
                state["epoch_n"] += 1
                state["history"]["steps"].append(
                    {"step": state["step"], "epoch": epoch, "loss": loss, "dice_loss": float(out["dice"]),
                     "bce": float(out["bce"]), "lr": lr}
                )
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss:.3f}")
                state["wall_s"] = time.perf_counter() - t_resume
                state["cpu_s"] = time.process_time() - cpu_resume
                if stop_after_steps is not None and state["step"] >= stop_after_steps:
                    save_state()
                    return result(False)
                if state["step"] % config.checkpoint_every == 0:
                    save_state()
            record = {"epoch": epoch, "step": state["step"],
                      "train_loss": state["epoch_loss_sum"] / max(state["epoch_n"], 1)}
            if val is not None:
                v = _validate(model, val, loss_fn, accelerator, config.batch_size)
                record.update(val_loss=v["loss"], val_dice_loss=v["dice_loss"], val_bce=v["bce"])
            state["wall_s"] = time.perf_counter() - t_resume
            state["cpu_s"] = time.process_time() - cpu_resume
            record["wall_s"], record["cpu_s"] = state["wall_s"], state["cpu_s"]
            state["history"]["epochs"].append(record)
            state.update(epoch=epoch + 1, batch_in_epoch=0, epoch_loss_sum=0.0, epoch_n=0)
            save_state()
    except KeyboardInterrupt:
        save_state()
        bar.close()
        raise
    bar.close()
    return finish()
