# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Fine-tuning PaliGemma to write anatomy
#
# CheXanatomy's model has no segmentation head. PaliGemma reads a radiograph and a
# prompt such as `segment left lung field ; heart` and *writes* the answer as tokens: per
# structure four `<loc>` tokens for its box (`ymin, xmin, ymax, xmax`, 1,024 bins)
# and sixteen `<seg>` tokens that the mask VQ-VAE of chapter 2 decodes to the mask
# inside that box, followed by the structure's name. Everything is next-token
# prediction with cross-entropy on the answer only.
#
# **What goes in.** The projected dataset of chapter 1 (DRRs and per-structure masks,
# PA and lateral views, seeded train/val/test split) and the mask codec of chapter 2.
# **What comes out.** A fine-tuned checkpoint (`03_vlm_finetune/checkpoint/`, read by
# chapter 4 and by `chexanatomy segment`), its loss curve, test-split predictions in
# the shared format (`03_vlm_finetune/predictions/test.npz`) and per-structure scores
# next to a trivial baseline.
#
# **Method.** Training mixes the paper's tasks: *segment* one or several structures,
# *detect* (boxes only), *caption* a box or a box plus mask, name the structure
# *highlighted* by an overlay drawn on the image, and the *view* orientation
# (posteroanterior or lateral). Prompts name structures by their display name or a
# synonym from the structure registry (`heart`, `cor`, `cardiac silhouette`), and the
# answer repeats the name asked for. Structures that are absent from an image or cut by
# the CT's field of view are never targets. With probability `augment` a sample is
# one of `augment_copies` rotated, zoomed and shifted copies of its image, made once
# before training; both its `<loc>` and its `<seg>` tokens are recomputed from the
# transformed masks, and a structure pushed partly out of the frame is dropped. The
# default ranges (rotations up to 3 degrees, shifts up to 4 % of the side, zoom by up
# to 8 %) are about as wide as the positioning and magnification spread of chapter 1's
# cohort, framed like real films: wider ranges teach poses the test images never
# show. The model learns the left and right *lung fields* (the lungs as real
# radiographs are annotated, chapter 1) and the heart. The model is either a small PaliGemma of the
# real architecture (SigLIP vision tower, linear projector, Gemma decoder) initialised
# at random, in which case *every* weight trains, or a pretrained PaliGemma checkpoint
# with LoRA adapters (rank 16) on the language model's attention and MLP projections,
# plus the vision tower's when `finetune_vision` is set. Optimisation is AdamW
# (weight decay 0.01, β₂ = 0.999) with linear warm-up and cosine decay and gradient
# clipping at 1.0, driven by HF Accelerate. Optionally (`loc_sigma`) a box coordinate's
# target is spread over neighbouring `<loc>` bins, so that a near miss costs less than
# a far one, and (`loc_weight`) the four box tokens of a structure can be weighted up
# against its sixteen seg tokens and its name, so that *where* a structure is does not
# take second place to its outline; a randomly initialised model also starts with ordinal `<loc>` embeddings
# (sinusoidal in the bin index), since a coordinate is a position on a line, not one
# of 1,024 unrelated classes; the full training state is checkpointed
# so that an interrupted run resumes to the same weights.
#
# At test time each image gets one request listing every structure, so the image is
# encoded once. Decoding is either free (greedy) or *constrained* by the output
# grammar: a logits processor allows, per structure, only four loc tokens forming a
# box with `ymax > ymin` and `xmax > xmin`, then sixteen seg tokens, then the
# requested name and `;`. Constrained output is valid by construction; free output
# shows what the model has learnt of the format on its own. Within the grammar a box
# coordinate is read from the model's distribution over the allowed `<loc>` bins by
# `loc_rule`: `"greedy"` takes its most likely bin, `"median"` its median bin. The
# bins are ordered, so the median is the choice with the least expected absolute
# error, and it is the natural read-out of a model trained with `loc_sigma`, which
# learns to spread its mass over neighbouring bins when unsure: the mode of such a
# broad distribution jumps with small changes of the logits, its median does not.
# The seg tokens are categorical and stay greedy. The chapter reports both rules;
# with twenty-odd test images, which of the two scores higher can change from one
# seed to the next.

# %% tags=["parameters"]
run_dir = "runs/default"  # run directory holding every stage's folder
seed = 0  # seeds weight initialisation, data order, augmentation and the bootstrap
device = "auto"  # "auto" (CUDA if available), "cpu" or "cuda"
model = "tiny"  # "tiny"/"small"/"base" (random init, all weights train), a PaliGemma checkpoint id/folder, or a folder saved here
image_size: int | None = None  # input side of a random model (px, multiple of 16); None: the preset's (tiny 128)
adapter: str | None = None  # a published LoRA adapter (folder or id) to start from; checkpoints only
finetune_vision = True  # train the vision tower (always for random models; LoRA on SigLIP for checkpoints)
lora_r = 16  # LoRA rank (checkpoints only)
dtype = "auto"  # checkpoint weight dtype: "auto" (bf16 on CUDA), "float32", "bfloat16"
structures = ["lung_field_left", "lung_field_right", "heart"]  # registry names to learn (those never usable in training are dropped)
task_mix = {"segment": 0.75, "detect": 0.15, "caption_box": 0.025, "caption_mask": 0.025, "highlight": 0.025, "view": 0.025}  # task sampling weights
full_list_prob = 1.0  # share of segment/detect prompts listing all structures in order (the test request)
augment = 0.8  # probability that a sample is a randomly rotated/zoomed/shifted copy
augment_copies = 10  # augmented copies precomputed per training image (their tokens recomputed)
max_rotation_deg = 3.0  # augmentation: rotation drawn in +-this (degrees)
max_scale = 0.08  # augmentation: zoom drawn in [1 - this, 1 + this]
max_shift = 0.04  # augmentation: shift drawn in +-this fraction of the side
steps = 900  # optimizer steps
batch_size = 8  # samples per optimizer step
lr = 0.003  # peak AdamW learning rate (5e-5 is the paper's LoRA value)
loc_sigma = 24.0  # loc targets spread as a Gaussian of this many bins (0 = plain cross-entropy)
loc_weight = 4.0  # weight of each <loc> target token in the loss relative to the other answer tokens
warmup_steps = 40  # linear warm-up steps
mixed_precision = "no"  # "no", "bf16" or "fp16" (GPU)
gradient_checkpointing = False  # recompute activations in the backward pass (saves GPU memory)
compile_layers = False  # torch.compile each decoder and vision-encoder layer (GPU: faster steps after ~40 s of compiling)
save_every = 100  # optimizer steps between saved training states
batch_workers = 0  # processes preparing training batches ahead of the step (0: the main process; a GPU run wants 2-4)
resume = True  # continue a run interrupted in this stage's folder
decode_batch_size = 32  # images per generate call
loc_rule = "median"  # constrained decoding reads a box coordinate as the "median" or "greedy" (most likely) <loc> bin
n_boot = 1000  # bootstrap resamples for the 95% confidence intervals
n_overlay = 4  # held-out images shown with their predictions
train_control = True  # also train chapter 7's image-level control (same architecture, steps and images; no boxes or masks)

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from chexanatomy_lib.codec import MaskCodec
from chexanatomy_lib.ct.dataset import ProjectedDataset
from chexanatomy_lib.evaluation.baselines import mean_mask_predictions
from chexanatomy_lib.evaluation.evaluate import evaluate_predictions, paired_difference
from chexanatomy_lib.evaluation.figures import comparison_table, plot_overlays, plot_summary
from chexanatomy_lib.evaluation.metrics import invalid_rate
from chexanatomy_lib.evaluation.predictions import predict_split, save_predictions
from chexanatomy_lib.pipeline import stage_dir, write_metrics
from chexanatomy_lib.records import stage_records_table, vlm_gpu_table
from chexanatomy_lib.vlm.decode import LOC_RULES
from chexanatomy_lib.vlm.figures import plot_loss, plot_task_examples
from chexanatomy_lib.vlm.model import load_vlm, trainable_parameters
from chexanatomy_lib.vlm.predict import VLMSegmenter, prompt_names, save_finetuned
from chexanatomy_lib.vlm.tasks import TaskSampler
from chexanatomy_lib.vlm.train import TrainConfig, train, train_image_level

if loc_rule not in LOC_RULES:  # checked before training, not after it
    raise ValueError(f"loc_rule must be one of {LOC_RULES}, got {loc_rule!r}")
out = stage_dir(run_dir, "03_vlm_finetune")
dataset = ProjectedDataset(stage_dir(run_dir, "01_ct_projection") / "dataset")
codec_dir = stage_dir(run_dir, "02_token_codec") / "vqvae"
codec = MaskCodec.ours(codec_dir)
torch.manual_seed(seed)
dataset

# %% [markdown]
# ## Data and targets
#
# The table counts, per split, the images in which each structure is a usable target
# (present and not truncated). Images of both views are used for training and testing.

# %%
train_idx = dataset.split_indices("train")
test_idx = dataset.split_indices("test")
never = [s for s in structures
         if not (~dataset.absent[train_idx, dataset.channel(s)] & ~dataset.truncated[train_idx, dataset.channel(s)]).any()]
if never:
    print("not learnt (absent or truncated in every training image):", never)
structures = [s for s in structures if s not in never]
usable = pd.DataFrame({
    split: [int((~dataset.absent[dataset.split_indices(split), dataset.channel(s)]
                 & ~dataset.truncated[dataset.split_indices(split), dataset.channel(s)]).sum()) for s in structures]
    for split in ("train", "val", "test")
}, index=pd.Index([f"{s} ({n})" for s, n in zip(structures, prompt_names(structures))], name="structure"))
usable.loc["images"] = [len(dataset.split_indices(s)) for s in ("train", "val", "test")]
usable

# %%
sampler = TaskSampler(dataset, codec, structures, task_mix=task_mix, augment=augment,
                      augment_params={"max_rotation_deg": max_rotation_deg, "max_scale": max_scale,
                                      "max_shift": max_shift}, full_list_prob=full_list_prob)
sampler.prepare(train_idx, augment_copies=augment_copies if augment > 0 else 0, seed=seed, progress=True)
rng = np.random.default_rng(seed)
examples = [sampler.sample(int(train_idx[k % len(train_idx)]), rng, task=t)
            for k, t in enumerate(["segment", "detect", "caption_box", "caption_mask", "highlight", "view"])]
plot_task_examples(examples)
plt.show()

# %% [markdown]
# One training sample of each task, as the model sees it: the input image (the
# *highlight* task draws a box or a tinted mask on it), the prompt above it and the
# target text below it.
#
# ## The model and what trains

# %%
vlm = load_vlm(model, seed=seed, finetune_vision=finetune_vision, lora_r=lora_r, adapter=adapter, dtype=dtype,
               image_size=image_size)
report = pd.DataFrame(trainable_parameters(vlm.model)).set_index("component")
report

# %% [markdown]
# The trainable-parameter report counts parameters per component of PaliGemma. For a
# randomly initialised model every row is fully trainable; for a checkpoint with
# LoRA only the adapters train, and the vision tower stays frozen unless
# `finetune_vision` is set (the adapters are placed by module path, so the SigLIP
# projections that share the language model's names are not touched by accident).
#
# ## Training

# %%
config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, loc_sigma=loc_sigma,
                     loc_weight=loc_weight, mixed_precision=mixed_precision,
                     gradient_checkpointing=gradient_checkpointing, compile_layers=compile_layers,
                     save_every=save_every, seed=seed, device=device, batch_workers=batch_workers)
result = train(vlm, sampler.sample, train_idx, config, out, resume=resume)
plot_loss(result.log, title=f"{model}: {steps} steps of {batch_size} samples ({result.state.wall_s:.0f} s)")
plt.show()

# %% [markdown]
# The loss is the mean cross-entropy per answer token over all tasks. A few hundred
# steps on one patient's images bring a small random model to the point where the
# box tokens carry information; the seg tokens, sixteen per structure and each one of
# 128 codes, are the slowest part to learn.

# %%
ckpt = save_finetuned(vlm, out / "checkpoint", structures, codec_dir,
                      extra={"seed": seed, "steps": steps, "train_seconds": round(result.state.wall_s, 1),
                             "dataset": str(dataset.path), "loc_rule": loc_rule})
device_name = str(next(vlm.model.parameters()).device)
other_rule = "greedy" if loc_rule == "median" else "median"
decoders = {f"constrained, {loc_rule} loc (saved)": VLMSegmenter(vlm, codec, loc_rule=loc_rule, structures=structures),
            f"constrained, {other_rule} loc": VLMSegmenter(vlm, codec, loc_rule=other_rule, structures=structures),
            "free greedy": VLMSegmenter(vlm, codec, constrained=False, structures=structures)}
preds = {name: predict_split(seg, dataset, "test", batch_size=decode_batch_size) for name, seg in decoders.items()}
pred, other_pred, free_pred = preds.values()
save_predictions(pred, out / "predictions" / "test.npz")
first_image = [np.asarray(dataset.images[test_idx[0]])]
pd.DataFrame({"decoding": list(decoders),
              "invalid instances": [invalid_rate(p.valid) for p in preds.values()],
              "example output (first test image)": [seg.decode(first_image)[0].text[:90] + "…"
                                                    for seg in decoders.values()]})

# %% [markdown]
# The share of requested structures whose output is not a well-formed instance
# (four loc tokens forming a box, sixteen seg tokens, the name), for both decoders.
# Constrained decoding is valid by construction; the free decoder's invalid rate
# measures how much of the format the model has learnt on its own. The constrained
# predictions with `loc_rule` are the ones saved, scored below against the baseline
# and read by the next chapters; the other rule is scored beside them.
#
# ## Results on held-out images

# %%
baseline = mean_mask_predictions(dataset, "test", structures=structures)
per_image_vlm, summary_vlm = evaluate_predictions(pred, dataset, "test", structures=structures, n_boot=n_boot,
                                                 seed=seed, hd95_structures=[])
_, summary_other = evaluate_predictions(other_pred, dataset, "test", structures=structures, n_boot=n_boot,
                                        seed=seed, hd95_structures=[])
_, summary_free = evaluate_predictions(free_pred, dataset, "test", structures=structures, n_boot=n_boot,
                                       seed=seed, hd95_structures=[])
per_image_base, summary_base = evaluate_predictions(baseline, dataset, "test", structures=structures, n_boot=n_boot,
                                                   seed=seed, hd95_structures=[])
summaries = {f"VLM (constrained, {loc_rule} loc)": summary_vlm, f"VLM (constrained, {other_rule} loc)": summary_other,
             "VLM (free)": summary_free, "mean training mask": summary_base}
comparison_table(summaries)

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
plot_summary(summaries, metric="dice", structures=structures, ax=axes[0], title="Dice")
plot_summary(summaries, metric="box_acc@0.5", structures=structures, ax=axes[1], title="box accuracy (IoU ≥ 0.5)")
for ax in axes:
    ax.get_legend().remove()
fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(summaries), fontsize=8)
fig.tight_layout(rect=(0, 0.07, 1, 1))
plt.show()

# %% [markdown]
# Per structure, the mean Dice and the share of boxes with IoU ≥ 0.5 against the
# reference, with 95% bootstrap intervals over test images, for the fine-tuned model
# (constrained decoding with either loc rule, and free decoding) and for the *mean
# training mask*: each structure's
# average mask over the training images of the same view, thresholded at 0.5, which
# never looks at the test image. A model that does not beat that baseline has learnt
# nothing beyond where a structure usually lies.
#
# The paired comparison below is the measured form: per structure, and for the two
# lung fields together, the VLM's Dice minus the baseline's on the same test images,
# with a 95% bootstrap interval over images and the verdict read from it (A is the
# VLM): an interval above zero says the VLM is better than the baseline on these
# images, one that contains zero that this run cannot tell them apart, one below zero
# that it is worse.

# %%
lung_fields = [s for s in ("lung_field_left", "lung_field_right") if s in structures]
paired = paired_difference(per_image_vlm, per_image_base, structures, n_boot=n_boot, seed=seed,
                           together={"lung fields": lung_fields} if lung_fields else None)
paired.rename(columns={"a": "VLM Dice", "b": "baseline Dice", "difference": "VLM − baseline"}).round(3)

# %%
show = np.concatenate([test_idx[dataset.index["view"].to_numpy()[test_idx] == v][: (n_overlay + 1) // 2]
                       for v in ("pa", "lateral")])[:n_overlay]
rows = [int(np.flatnonzero(test_idx == i)[0]) for i in show]
plot_overlays(np.asarray(dataset.images[show]), dataset.masks_for(show, structures),
              {f"VLM (constrained, {loc_rule} loc)": pred.masks[rows], "mean training mask": baseline.masks[rows]},
              prompt_names(structures),
              titles=[f"{dataset.index['image_id'].iloc[i]} ({dataset.index['view'].iloc[i]})" for i in show])
plt.show()

# %% [markdown]
# Held-out DRRs with the reference outline (solid), the fine-tuned model's mask
# (filled) and the mean-mask baseline (dotted) per structure.

# %%
metrics = {"train_seconds": result.state.wall_s, "final_loss": result.log[-1]["loss"],
           "invalid_constrained": invalid_rate(pred.valid), "invalid_free": invalid_rate(free_pred.valid)}
if lung_fields:
    metrics.update({"lung_fields_vlm_minus_baseline_dice": paired.at["lung fields", "difference"],
                    "lung_fields_vlm_minus_baseline_dice_lo": paired.at["lung fields", "difference_lo"],
                    "lung_fields_vlm_minus_baseline_dice_hi": paired.at["lung fields", "difference_hi"]})
for s in structures:
    metrics[f"dice/{s}"] = float(summary_vlm.loc[s, "dice"])
    metrics[f"box_acc@0.5/{s}"] = float(summary_vlm.loc[s, "box_acc@0.5"])
    metrics[f"{other_rule}_loc_dice/{s}"] = float(summary_other.loc[s, "dice"])
    metrics[f"{other_rule}_loc_box_acc@0.5/{s}"] = float(summary_other.loc[s, "box_acc@0.5"])
    metrics[f"baseline_dice/{s}"] = float(summary_base.loc[s, "dice"])
    metrics[f"baseline_box_acc@0.5/{s}"] = float(summary_base.loc[s, "box_acc@0.5"])
write_metrics(run_dir, "03_vlm_finetune", metrics)
# per-image scores of the saved predictions and the baseline: what a sweep over this chapter gathers
pd.concat([per_image_vlm.assign(method="vlm"), per_image_base.assign(method="baseline")]).to_csv(
    out / "test_scores.csv", index=False)
print(json.dumps({k: round(v, 3) for k, v in metrics.items()}, indent=1))

# %% [markdown]
# ## Recorded runs of this chapter
#
# The same chapter run where this build cannot run it (the `gpu` profile on one GPU,
# the `paper` profile) and recorded with `chexanatomy record`, beside this run: each
# row labelled with where and when it ran and the revision it ran at. No row but this
# run's means nothing is recorded yet.

# %%
stage_records_table("03_vlm_finetune",
                    ["dice/lung_field_left", "dice/lung_field_right", "dice/heart",
                     "lung_fields_vlm_minus_baseline_dice", "lung_fields_vlm_minus_baseline_dice_lo",
                     "lung_fields_vlm_minus_baseline_dice_hi", "train_seconds"], current=metrics).round(3)

# %% [markdown]
# ## An image-level control for chapter 7
#
# Chapter 7 asks whether learning anatomy makes this model a better few-shot learner
# of new localisation tasks. Its control is trained here, so that it matches the model
# above by construction: the same architecture, initialisation and seed, the same
# number of steps and batch size, the same training images, but image-level tasks
# only — the view's orientation and whether a structure is visible (`visible heart`
# → `yes`/`no`, over every structure of the dataset), never a box or a mask: the
# analogue of a model pretrained for global image-text alignment.

# %%
if train_control:
    visible = [s for s in dataset.structures if (~dataset.absent[train_idx, dataset.channel(s)]).any()]
    control_vlm = load_vlm(model, seed=seed, finetune_vision=finetune_vision, lora_r=lora_r, adapter=adapter,
                           dtype=dtype, image_size=image_size)
    control = train_image_level(control_vlm, dataset, train_idx, visible, codec, out / "control", steps,
                                   batch_size, lr, seed, device=device, resume=resume,
                                   card={"base": model, "dataset": str(dataset.path)})
    plot_loss(control.log, title=f"image-level control: {steps} steps ({control.state.wall_s:.0f} s)")
    plt.show()

# %% [markdown]
# ## Training throughput of the real architecture on a GPU
#
# The paper's model cannot train here, but its speed can be measured where a GPU
# is available: `benchmarks/bench_vlm_gpu.py` trains the PaliGemma 2 3B
# architecture (random weights, LoRA r=16 on the language model, one structure per
# sample) and reports samples per second and model FLOPs utilisation, MFU =
# (4N + attention FLOPs per token) × tokens/s / 989 TFLOP/s. The training loop of
# this chapter uses the same settings that the fastest recorded runs use: the
# vocabulary head only on target positions, LoRA products in bf16 under mixed
# precision, and `compile_layers` (see `benchmarks/README.md`). The recorded runs,
# when present:

# %%
vlm_gpu_table().round(1)

# %% [markdown]
# ## What this run can and cannot show
#
# The smoke profile trains a small PaliGemma of the real architecture (its size is
# in the parameter table above), from random weights, for a few hundred steps on the CPU, on DRRs of
# *one* patient: the bundled CT under random deformations and poses. Its test images
# are other deformed copies of the same anatomy. It therefore shows that the whole
# pipeline works — multi-task prompts, token targets recomputed under augmentation,
# resumable training, constrained decoding, the mask codec, the shared evaluation —
# and whether the model places each structure *in a given image* at least as well as
# the average mask does (the paired table above says it per structure, with its
# interval). It cannot show anything about real radiographs, other patients, the
# paper's Dice values or the comparison with the U-Net in distribution: those need
# many CTs and a pretrained checkpoint (`model = "google/paligemma2-3b-pt-224"`, LoRA,
# the paper profile on a GPU). On films positioned as consistently as real ones, the
# baseline is strong: every box it draws overlaps the reference with IoU above 0.5,
# and its Dice is close to the real set's own mean-mask Dice (chapter 1), so box
# accuracy no longer separates a model from it and Dice differences are small. A
# tiny model trained from scratch for two CPU minutes can reach about the baseline's
# lung-field Dice, not much more; the `gpu` profile is where the VLM must come close
# to the U-Net. With twenty-odd test images the intervals are wide, and the ranking of model
# and baseline can change with the seed; the paired table, not this text, says what
# this run achieved.
