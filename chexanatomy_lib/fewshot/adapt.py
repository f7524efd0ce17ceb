"""One k-shot run per start: a model adapted to a novel task from k labelled images.

Starts (the chapter picks which):

* a saved VLM (chapter 3's, pretrained on anatomy; or the image-level control that
  chapter 3 trains beside it, :func:`chexanatomy_lib.vlm.train.train_image_level`),
  fine-tuned on the novel task's ``segment`` prompts (:func:`adapt_vlm`);
* a U-Net from scratch, or one whose weights start from a saved U-Net (chapter 4's)
  except its last 1x1 convolution, which has one output per novel structure
  (:func:`adapt_unet`).

Every run has the same budget (optimizer steps and batch size are the chapter's
parameters), trains on exactly the rows of its k-shot draw, and uses the models' own
training code on the project's one loop.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np


def adapt_vlm(base, dataset, rows: Sequence[int], structures: Sequence[str], codec, out_dir: str | Path | None,
              steps: int, batch_size: int, lr: float, seed: int, loc_sigma: float = 0.0, loc_weight: float = 1.0,
              augment: float = 0.0, augment_params: dict | None = None, device: str = "auto",
              batch_workers: int = 0):
    """Fine-tune a copy of ``base`` (a :class:`~chexanatomy_lib.vlm.model.VLM`, left unchanged) to
    segment ``structures`` from dataset ``rows`` (every weight of a randomly initialised
    model, the LoRA adapters of a checkpoint); returns a
    :class:`~chexanatomy_lib.vlm.predict.VLMSegmenter` of the adapted copy.

    Samples are ``segment`` prompts listing the structures (their display names or
    synonyms), with probability ``augment`` a rotated, zoomed and shifted copy of the
    image (``augment_params`` as in :class:`~chexanatomy_lib.vlm.tasks.TaskSampler`).
    ``out_dir``: where the loop saves its state and loss log; None: nothing is saved (a
    k-shot run is scored and discarded). ``batch_workers``: processes preparing the batches
    ahead of the step (:class:`~chexanatomy_lib.vlm.train.TrainConfig`).
    """
    from ..vlm.model import VLM
    from ..vlm.predict import VLMSegmenter
    from ..vlm.tasks import TaskSampler
    from ..vlm.train import TrainConfig, train

    vlm = VLM(copy.deepcopy(base.model), base.processor, base.base, base.lora, base.finetune_vision, base.image_size,
              dict(base.info))
    for name, p in vlm.model.named_parameters():  # a tiny model trains all its weights, a checkpoint its LoRA adapters
        p.requires_grad_(not vlm.lora or "lora_" in name)
    sampler = TaskSampler(dataset, codec, list(structures), task_mix={"segment": 1.0}, augment=augment,
                          augment_params=augment_params, full_list_prob=1.0)
    sampler.prepare(rows)
    config = TrainConfig(steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                         warmup_steps=max(1, int(steps) // 10), loc_sigma=loc_sigma, loc_weight=loc_weight,
                         seed=int(seed), device=device, log_every=max(1, int(steps) // 10),
                         batch_workers=int(batch_workers))
    train(vlm, sampler.sample, list(rows), config, out_dir, resume=False, progress=False)
    return VLMSegmenter(vlm, codec, structures=list(structures))


def adapt_unet(dataset, rows: Sequence[int], structures: Sequence[str], out_dir: str | Path, steps: int,
               batch_size: int, lr: float, seed: int, input_size: int, model: Any = None,
               init_from: str | Path | None = None, augmentation: Any = None, device: str = "auto"):
    """Train a U-Net on dataset ``rows`` for ``structures`` for about ``steps`` optimizer steps
    (whole epochs over the k images, at least one), from scratch or, with ``init_from``
    (a U-Net checkpoint folder), starting from its weights except the output layer.
    Returns a :class:`~chexanatomy_lib.unet.inference.UNetSegmenter`."""
    import math

    from ..unet.inference import load_segmenter
    from ..unet.model import UNetConfig
    from ..unet.train import TrainConfig, train_unet

    per_epoch = math.ceil(len(rows) / min(int(batch_size), len(rows)))
    config = TrainConfig(structures=tuple(structures), input_size=int(input_size),
                         epochs=max(1, round(int(steps) / per_epoch)), batch_size=min(int(batch_size), len(rows)),
                         lr=float(lr), model=model or UNetConfig(), seed=int(seed), device=device,
                         checkpoint_every=10**9, **({"augmentation": augmentation} if augmentation is not None else {}))
    train_unet(dataset, out_dir, config, resume=False, progress=False, train_indices=np.asarray(rows),
               init_from=init_from, validate=False)
    return load_segmenter(out_dir, device=device)
