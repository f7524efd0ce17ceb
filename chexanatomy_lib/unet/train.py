"""Training the U-Net baseline: its batches, loss and epoch records in the project's
training loop (:func:`chexanatomy_lib.training.train_loop`).

`train_unet` trains on one split of a projected dataset and writes into a checkpoint
folder (see `chexanatomy_lib.unet.checkpoint`):

- `checkpoints/step_NNNNNN/` every `checkpoint_every` optimizer steps, at each epoch's
  end and at the end: the loop's saved state (model, optimizer and RNG states, the
  loss log and the per-epoch records). Data order and augmentation are pure functions
  of `(seed, epoch)`, so a run resumed from any saved state continues with the very
  batches it would have seen: interrupted-and-resumed and uninterrupted runs end with
  the same weights.
- `training_log.json`: the learning curves, per step (training loss) and per epoch
  (mean training loss, validation loss), rewritten at every save.
- `model.safetensors` + `model_card.json` once training is complete.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints import CheckpointError
from ..devices import resolve_device
from ..training import TrainResult
from .checkpoint import save_model
from .data import Augmentation, SegmentationSamples, default_structures
from .loss import MaskedDiceBCELoss
from .model import UNetConfig, build_unet, count_parameters

__all__ = ["TrainConfig", "UNetTrainResult", "train_unet", "load_history"]

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
class UNetTrainResult(TrainResult):
    """What a call of `train_unet` did: the loop's result plus the U-Net's folder and channels."""

    checkpoint_dir: Path = Path(".")  # the folder written
    structures: list[str] = field(default_factory=list)  # output channels, in order
    n_parameters: int = 0  # trainable parameters of the network

    @property
    def history(self) -> dict[str, list[dict[str, float]]]:
        """Learning curves: {"steps": the loss log, "epochs": the per-epoch records}."""
        return {"steps": self.log, "epochs": self.records.get("epochs", [])}


def _epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Positions of the training split in epoch `epoch`, shuffled, cut into batches."""
    order = np.random.default_rng([seed, epoch, 7]).permutation(n)
    return [order[i : i + batch_size].tolist() for i in range(0, n, batch_size)]


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
    return d


def _dataset_key(dataset: Any, n_train: int) -> dict[str, Any]:
    return {"image_size": list(np.atleast_1d(dataset.image_size).tolist()), "n_train": int(n_train)}


def load_history(checkpoint_dir: str | Path) -> dict[str, list[dict[str, float]]]:
    """Learning curves of a (possibly unfinished) run: {"steps": [{step, loss, lr, epoch,
    dice_loss, bce}], "epochs": [{epoch, step, train_loss, val_loss, val_dice_loss, val_bce,
    wall_s, cpu_s}]} (wall_s, cpu_s: seconds of training so far, wall clock and process CPU
    time over all threads; losses as in `MaskedDiceBCELoss`; val_* only with a val split)."""
    from ..training import LOG_NAME, read_training_log

    try:
        saved = read_training_log(checkpoint_dir)
    except FileNotFoundError:
        raise CheckpointError(Path(checkpoint_dir) / LOG_NAME,
                              "missing; no training run has saved learning curves here") from None
    return {"steps": saved["log"], "epochs": saved.get("records", {}).get("epochs", [])}


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


def _initialise_from(model: torch.nn.Module, checkpoint_dir: str | Path, config: UNetConfig) -> str:
    """Copy into ``model`` every weight of the saved U-Net whose name and shape match; returns
    the checkpoint's key for the run's fingerprint. A checkpoint of another architecture is
    refused with a CheckpointError naming it."""
    from .checkpoint import load_model

    source, card = load_model(checkpoint_dir)
    if UNetConfig.from_dict(card["model"]) != config:
        raise CheckpointError(checkpoint_dir, f"its U-Net ({card['model']}) is not the one configured ({config.to_dict()})")
    own = model.state_dict()
    copied = {k: v for k, v in source.state_dict().items() if k in own and own[k].shape == v.shape}
    own.update(copied)
    model.load_state_dict(own)
    return f"{Path(checkpoint_dir).resolve()}:{len(copied)}/{len(own)}"


def train_unet(
    dataset: Any,  # chexanatomy_lib.ct.dataset.ProjectedDataset
    checkpoint_dir: str | Path,  # folder for training states, curves, weights and model card
    config: TrainConfig | None = None,  # the run's settings
    *,
    resume: bool = True,  # continue from a saved state made with the same settings
    stop_after_steps: int | None = None,  # save and return after this many steps in all (an interruption)
    progress: bool = True,  # show a tqdm progress bar
    train_indices: Any = None,  # rows of the train split to learn from (a k-shot draw); None: all of it
    init_from: str | Path | None = None,  # a U-Net checkpoint whose weights start the run (all but the output layer)
    validate: bool = True,  # score the val split and save the state after every epoch
) -> UNetTrainResult:
    """Train the baseline on the dataset's train split, validating on its val split
    after every epoch; returns a UNetTrainResult.

    With `resume=True` a saved training state whose settings match `config` is
    continued (a finished run is returned as is); a state made with other settings
    is reported and replaced by a fresh run. Ctrl-C saves the state before stopping.
    `train_indices` and `init_from` adapt a network to a novel task from a few images
    (chapter 7): every weight of `init_from` whose name and shape match is copied, so the
    last 1x1 convolution, which has one output per structure, starts afresh when the
    structures differ. Without `validate` (a few-shot run) nothing is scored and the
    state is saved at the checkpoint interval and at the end only.
    """
    from accelerate.utils import set_seed

    from ..training import LoopConfig, StepContext, make_accelerator, train_loop

    config = config or TrainConfig()
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    structures = list(config.structures) if config.structures is not None else default_structures(dataset, "train")
    if not structures:
        raise ValueError("no structures to train on: every structure is truncated or absent in the train split")

    device = resolve_device(config.device)
    accelerator = make_accelerator(device, config.mixed_precision)
    set_seed(config.seed)

    train = SegmentationSamples(dataset, "train", structures, config.input_size, config.augmentation, config.seed,
                                indices=train_indices)
    has_val = validate and len(np.asarray(dataset.split_indices("val"))) > 0
    val = SegmentationSamples(dataset, "val", structures, config.input_size, None, config.seed) if has_val else None

    model = build_unet(len(structures), config.model)
    start_key = None
    if init_from is not None:
        start_key = _initialise_from(model, init_from, config.model)
    batches_per_epoch = math.ceil(len(train) / config.batch_size)
    world, rank = accelerator.num_processes, accelerator.process_index
    per_process = batches_per_epoch // world if world > 1 else batches_per_epoch
    if per_process < 1:
        raise ValueError(f"{len(train)} training images are too few for batch size {config.batch_size} on {world} processes")
    total_steps = per_process * config.epochs
    loss_module = MaskedDiceBCELoss(config.dice_weight, config.bce_weight)

    def batches(start: int):
        first_epoch, first_batch = divmod(start, per_process)
        for epoch in range(first_epoch, config.epochs):
            ordered = _epoch_batches(len(train), config.batch_size, config.seed, epoch)[: per_process * world]
            mine = ordered[rank::world][first_batch if epoch == first_epoch else 0:]
            yield from torch.utils.data.DataLoader(train, batch_sampler=_EpochBatches(mine, epoch), collate_fn=_collate,
                                                   num_workers=config.num_workers)

    def loss_fn(net, batch: dict, step: int):
        out = loss_module(net(batch["image"]), batch["target"], batch["valid"])
        return out["loss"], {"epoch": step // per_process, "dice_loss": out["dice"], "bce": out["bce"]}

    def end_of_epoch(ctx: StepContext) -> bool:
        """After an epoch's last step: its mean training loss and the validation loss; save."""
        if ctx.state.step % per_process:
            return False
        t0 = time.perf_counter()
        epoch = ctx.state.step // per_process - 1
        losses = [e["loss"] for e in ctx.state.log if epoch * per_process < e["step"] <= (epoch + 1) * per_process]
        record = {"epoch": epoch, "step": ctx.state.step, "train_loss": sum(losses) / max(len(losses), 1)}
        if val is not None:
            v = _validate(ctx.model, val, loss_module, ctx.accelerator, config.batch_size)
            record.update(val_loss=v["loss"], val_dice_loss=v["dice_loss"], val_bce=v["bce"])
        record["wall_s"] = ctx.state.wall_s + (time.perf_counter() - t0)
        record["cpu_s"] = ctx.state.cpu_s
        ctx.state.records.setdefault("epochs", []).append(record)
        return validate

    loop = LoopConfig(steps=total_steps, lr=config.lr, warmup_steps=int(round(config.warmup_frac * total_steps)),
                      weight_decay=config.weight_decay, grad_clip=config.grad_clip, device=device,
                      mixed_precision=config.mixed_precision, save_every=config.checkpoint_every,
                      keep_checkpoints=1, log_every=1, stop_after=stop_after_steps, desc="U-Net training",
                      progress=progress)
    data_key = _dataset_key(dataset, len(train))
    if train_indices is not None:
        data_key["rows"] = [int(i) for i in train.indices]
    if start_key is not None:
        data_key["init_from"] = start_key
    fingerprint = _fingerprint(config, structures, data_key)
    result = train_loop(model, model.parameters(), batches, loss_fn, loop, checkpoint_dir=root,
                        fingerprint=fingerprint, resume=resume, on_step_end=end_of_epoch, accelerator=accelerator)
    if result.finished and accelerator.is_main_process:
        card = {
            "structures": structures,
            "input_size": config.input_size,
            "threshold": 0.5,
            "model": config.model.to_dict(),
            "training": {**config.to_dict(), "steps": result.steps_done, "device": device,
                         "image_size": _dataset_key(dataset, len(train))["image_size"],
                         "n_train_images": len(train), "n_val_images": len(val) if val else 0},
        }
        save_model(root, model, card)
    accelerator.wait_for_everyone()
    return UNetTrainResult(**{k: getattr(result, k) for k in result.__dataclass_fields__}, checkpoint_dir=root,
                           structures=structures, n_parameters=count_parameters(model))
