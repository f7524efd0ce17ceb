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
# # U-Net baseline
#
# The paper's central in-distribution claim is that a vision-language model that
# *writes* anatomy as tokens segments about as well as a dedicated segmentation
# network. This chapter trains that network: a 2D U-Net {cite}`ronneberger2015unet`
# from MONAI, on exactly the data the VLM of chapter 3 sees — the same projected
# dataset, the same seeded train/val/test split and the same random rotations, zooms
# and shifts — and scores both models, together with a trivial baseline, with one
# evaluation function. Its input resolution is its own parameter (the table below
# sets it beside the VLM's): in the smoke profile 96 px, so that the network trains
# for 70 epochs within its three CPU minutes.
#
# **What goes in.** The DRRs and per-structure masks of chapter 1, resized to the
# network's input size. **What comes out.** A checkpoint (weights plus a model card
# that `chexanatomy segment` reads), learning curves, test-split predictions in the
# shared format (`04_unet_baseline/predictions/test.npz`, the same files the VLM
# writes) and one comparison table.
#
# **Method.** The network has one output channel per structure with its own
# sigmoid, not a softmax over classes: projected structures overlap (the heart lies
# in front of the lungs, ribs cross everything), so a pixel may belong to several.
# The loss is soft Dice plus binary cross-entropy. A structure cut by the CT's field
# of view in an image (*truncated*) has only a partial mask there and is left out of
# the loss for that image; a structure that is *absent* from an image is a
# legitimate empty target. By default the model learns every structure that is
# untruncated in all training images. Training runs under HF Accelerate (mixed
# precision on a GPU) and saves its full state — weights, optimizer, schedule, RNG
# and position in the data order — so an interrupted run resumes where it stopped
# and ends with the same weights. At test time the probabilities are resized back to
# the dataset's image size and thresholded at 0.5; each box is the tight box of the
# predicted mask.

# %% tags=["parameters"]
run_dir = "runs/default"  # run directory holding every stage's folder
seed = 0  # seeds weight initialisation, data order, augmentation and the bootstrap
device = "auto"  # "auto" (CUDA if available), "cpu" or "cuda"
structures = None  # registry names to learn; None = every structure untruncated in all training images
input_size = 96  # network input side (px); a multiple of the product of the strides
epochs = 70  # passes over the training split
batch_size = 8  # images per optimizer step
lr = 0.01  # peak AdamW learning rate (linear warm-up, then cosine decay)
weight_decay = 0.0001  # AdamW weight decay
channels = [16, 32, 64, 128]  # U-Net feature maps per level, shallow to deep
strides = [2, 2, 2]  # down-sampling factor between consecutive levels
num_res_units = 1  # residual units per U-Net block
head = 16  # feature maps before the 1x1 convolution to one logit per structure
augment = 0.8  # probability of a random rotation/zoom/shift per training image (as chapter 3)
max_rotation_deg = 3.0  # augmentation: rotation drawn in +-this (degrees)
max_scale = 0.08  # augmentation: zoom drawn in [1 - this, 1 + this]
max_shift = 0.04  # augmentation: shift drawn in +-this fraction of the side
checkpoint_every = 50  # optimizer steps between saved training states
resume = True  # continue a run interrupted in this stage's folder (same settings only)
n_boot = 1000  # bootstrap resamples for the 95% confidence intervals
overlay_structures = ["lung_field_left", "lung_field_right", "heart", "aorta"]  # outlines drawn on held-out images (those learnt)
n_overlay = 4  # held-out images shown, split between PA and lateral views

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from chexanatomy_lib.ct.dataset import ProjectedDataset
from chexanatomy_lib.evaluation.baselines import mean_mask_predictions
from chexanatomy_lib.evaluation.evaluate import evaluate_predictions, paired_difference
from chexanatomy_lib.evaluation.figures import comparison_table, plot_overlays, plot_summary
from chexanatomy_lib.evaluation.predictions import load_predictions, predict_split, save_predictions
from chexanatomy_lib.pipeline import stage_dir, write_metrics
from chexanatomy_lib.records import stage_records_table
from chexanatomy_lib.unet.data import Augmentation, default_structures
from chexanatomy_lib.unet.figures import plot_learning_curves
from chexanatomy_lib.unet.inference import load_segmenter
from chexanatomy_lib.unet.model import UNetConfig
from chexanatomy_lib.unet.train import TrainConfig, train_unet

out = stage_dir(run_dir, "04_unet_baseline")
dataset = ProjectedDataset(stage_dir(run_dir, "01_ct_projection", create=False) / "dataset")
learnt = list(structures) if structures is not None else default_structures(dataset)
splits = dataset.index.groupby(["split", "view"]).size().unstack(fill_value=0)
print(dataset)
print(f"{len(learnt)} structures learnt: {', '.join(learnt)}")
splits

# %% [markdown]
# The table above counts the images per split and view. The split is the one
# chapter 1 drew and saved; with a single source CT its unit is the deformed copy,
# so all views of one copy stay in one split. The next table puts this chapter's
# settings beside chapter 3's where both chapters have a parameter of the same name
# (empty when chapter 3 has not run): they should agree on the data-related ones.

# %%
vlm_dir = stage_dir(run_dir, "03_vlm_finetune", create=False)
vlm_params = json.loads((vlm_dir / "params.json").read_text()) if (vlm_dir / "params.json").is_file() else {}
vlm_card = vlm_dir / "checkpoint" / "model_card.json"
if vlm_card.is_file():  # the VLM's input resolution is a property of its model
    vlm_params["input_size"] = json.loads(vlm_card.read_text()).get("image_size")
ours = {"seed": seed, "input_size": input_size, "augment": augment, "max_rotation_deg": max_rotation_deg,
        "max_scale": max_scale, "max_shift": max_shift, "batch_size": batch_size}
pd.DataFrame([{"parameter": k, "U-Net (this chapter)": v, "VLM (chapter 3)": vlm_params[k]}
              for k, v in ours.items() if k in vlm_params])

# %%
config = TrainConfig(
    structures=learnt,
    input_size=input_size,
    epochs=epochs,
    batch_size=batch_size,
    lr=lr,
    weight_decay=weight_decay,
    model=UNetConfig(channels=channels, strides=strides, num_res_units=num_res_units, head=head),
    augmentation=Augmentation(augment, max_rotation_deg, max_scale, max_shift),
    seed=seed,
    device=device,
    checkpoint_every=checkpoint_every,
)
checkpoint = out / "checkpoint"
result = train_unet(dataset, checkpoint, config, resume=resume)
print(f"{result.n_parameters:,} parameters; {result.steps_done} optimizer steps "
      f"({result.total_steps // epochs} per epoch); resumed from step {result.resumed_from_step}; "
      f"{result.wall_s:.1f} s in this call")

# %% [markdown]
# ## Learning curves
#
# Left: the training loss of every optimizer step (on augmented images) and its
# running mean. Right: the mean training loss per epoch and the loss on the
# validation split (no augmentation), with its Dice term alone. A validation loss
# that flattens while the training loss keeps falling marks the point where more
# epochs stop helping on this data.

# %%
fig = plot_learning_curves(result.history)
plt.show()

# %% [markdown]
# ## Held-out images
#
# The saved checkpoint is loaded back as `chexanatomy segment` would load it and
# run on the test split; its masks are written in the shared prediction format.
# Below, a few test images of each view with the reference outlines (solid) and the
# U-Net's masks (filled), drawn as in chapter 3.

# %%
segmenter = load_segmenter(checkpoint, device=device)
unet_pred = predict_split(segmenter, dataset, "test")
unet_file = save_predictions(unet_pred, out / "predictions" / "test.npz")
shown = [s for s in overlay_structures if s in learnt] or learnt[:4]
half = max(1, n_overlay // 2)
show = [*dataset.split_indices("test", "pa")[:half], *dataset.split_indices("test", "lateral")[: n_overlay - half]]
rows = unet_pred.rows_of(dataset.index["image_id"].iloc[show])
fig = plot_overlays(np.asarray(dataset.images[show]), dataset.masks_for(show, shown),
                    {"U-Net": unet_pred.masks[rows][:, [unet_pred.channel(s) for s in shown]]}, shown,
                    titles=[f"{dataset.index['image_id'].iloc[i]} ({dataset.index['view'].iloc[i]})" for i in show])
plt.show()

# %% [markdown]
# ## Comparison with the VLM and the mean-mask baseline
#
# Three prediction files are scored by the same call, `evaluate_predictions`, once
# per file: the *mean-mask baseline* (each structure's mean training mask of the
# same view, thresholded at 0.5 — it never looks at the image, so it measures how
# much of a score comes from knowing where a structure usually lies), the VLM of
# chapter 3, and the U-Net. Dice and the 95th-percentile Hausdorff distance (HD95,
# pixels at the dataset's image size) are computed per image and structure; box
# accuracy is the fraction of images whose predicted box overlaps the reference
# mask's tight box with IoU >= 0.5. Brackets are 95% percentile-bootstrap intervals
# over test images. Absent and truncated structures are not scored.

# %%
vlm_file = vlm_dir / "predictions" / "test.npz"
scored = list(dict.fromkeys(learnt + (list(load_predictions(vlm_file).structures) if vlm_file.is_file() else [])))
baseline_file = save_predictions(mean_mask_predictions(dataset, "test", structures=scored),
                                 out / "baseline_predictions" / "test.npz")
files = {"mean-mask baseline": baseline_file, "VLM (chapter 3)": vlm_file, "U-Net": unet_file}
if not vlm_file.is_file():
    print(f"No VLM predictions at {vlm_file}: chapter 3 has not run in this run directory; "
          "the table compares the baseline and the U-Net only.")
    files.pop("VLM (chapter 3)")
summaries, per_image = {}, {}
for model, path in files.items():
    per_image[model], summaries[model] = evaluate_predictions(load_predictions(path), dataset, "test", n_boot=n_boot,
                                                              seed=seed)
comparison_table(summaries, metrics=("dice", "hd95", "box_acc@0.5"))

# %%
ax = plot_summary(summaries, "dice", structures=learnt, title="Dice per structure on the test split (95% CI)")
plt.show()

# %% [markdown]
# ## Paired differences
#
# Each comparison in its measured form: model A's Dice minus model B's on the same test
# images, per structure and for the two lung fields together (the per-image mean), with
# a 95% bootstrap interval over images. An interval above zero means A is better on
# these images, below zero worse, and one that contains zero that this run cannot tell
# them apart.

# %%
fields = [s for s in ("lung_field_left", "lung_field_right") if s in learnt]
compared = [s for s in ("lung_field_left", "lung_field_right", "lung_left", "lung_right", "heart") if s in learnt]
pairs = {"unet_minus_baseline": ("U-Net", "mean-mask baseline"),  # metrics key: (model A, model B)
         "vlm_minus_baseline": ("VLM (chapter 3)", "mean-mask baseline"),
         "unet_minus_vlm": ("U-Net", "VLM (chapter 3)")}
paired = {}
for key, (a, b) in pairs.items():
    if a in per_image and b in per_image:
        paired[key] = paired_difference(per_image[a], per_image[b], compared, n_boot=n_boot, seed=seed,
                                                 together={"lung fields": fields} if fields else None)
paired_table = pd.concat({" − ".join(pairs[key]): table for key, table in paired.items()},
                         names=["comparison", "structure"])
paired_table.to_csv(out / "paired_differences.csv")
paired_table.round(3)

# %%
lungs = [s for s in ("lungs", "lung_left", "lung_right") if s in learnt] or [s for s in learnt if s.startswith("lung_")]
headline = {}
for model, key in (("mean-mask baseline", "baseline"), ("VLM (chapter 3)", "vlm"), ("U-Net", "unet")):
    if model in summaries:
        s = summaries[model].reindex(learnt)
        headline[f"{key}_dice_mean"] = float(np.nanmean(s["dice"]))
        headline[f"{key}_dice_lung"] = float(np.nanmean(s.loc[lungs, "dice"])) if lungs else None
        headline[f"{key}_dice_lung_field"] = float(np.nanmean(s.reindex(fields)["dice"])) if fields else None
for key, table in paired.items():
    for row in ("lung fields", "heart"):
        if row in table.index:
            for col in ("difference", "difference_lo", "difference_hi"):
                headline[f"{row.replace(' ', '_')}_{key}_dice_{col}"] = table.at[row, col]
last = result.history["epochs"][-1] if result.history["epochs"] else {}
headline["unet_train_seconds"] = last.get("wall_s")  # wall clock: depends on the machine's load
headline["unet_train_cpu_seconds"] = last.get("cpu_s")  # CPU time over all threads
headline["unet_parameters"] = result.n_parameters
write_metrics(run_dir, "04_unet_baseline", headline)
pd.Series(headline, name="value").to_frame()

# %% [markdown]
# ## Recorded runs of this chapter
#
# The same chapter run where this build cannot run it (the `gpu` profile on one GPU,
# the `paper` profile) and recorded with `chexanatomy record`, beside this run: each
# row labelled with where and when it ran and the revision it ran at. No row but this
# run's means nothing is recorded yet.

# %%
stage_records_table("04_unet_baseline",
                    ["unet_dice_lung_field", "vlm_dice_lung_field", "lung_fields_unet_minus_vlm_dice_difference",
                     "lung_fields_unet_minus_vlm_dice_difference_lo", "lung_fields_unet_minus_vlm_dice_difference_hi",
                     "heart_unet_minus_vlm_dice_difference", "heart_unet_minus_vlm_dice_difference_lo",
                     "heart_unet_minus_vlm_dice_difference_hi", "unet_train_seconds"], current=headline).round(3)

# %% [markdown]
# ## What this shows, and what it cannot
#
# The headline rows above average Dice over the structures the U-Net learnt, over
# the lungs and over the lung fields. The gap between the U-Net and the mean-mask
# baseline is what the network reads from the image; where the two are close, a
# structure's position barely varies in this data and its Dice says little about
# segmentation skill. On films positioned like real ones (chapter 1) the baseline is
# strong, and the paired table above says, with its interval, whether each model
# beats it on the lung fields. The VLM's rows are directly comparable: same images,
# same references, same scoring code.
#
# With the smoke profile every image is a DRR of **one patient's CT**: the
# "patients" are deformed copies of a single chest, the test images are new poses
# and deformations of anatomy the model has already seen, and both models are
# small and trained from scratch for a few minutes on two CPU cores. The table
# therefore shows that the pipeline is sound — the U-Net learns the projected
# anatomy, its predictions round-trip through the shared format, and baseline, VLM
# and U-Net are scored identically with honest intervals — but it cannot show how
# either model generalises to new patients, to real radiographs or to anatomy that
# varies between people, nor whether the paper's "comparable to a U-Net" claim
# holds: that needs many CTs (the paper uses CT-RATE), a pretrained PaliGemma and
# the `paper` profile on a GPU. The confidence intervals cover resampling of test
# images only; with one source CT they say nothing about variation between
# patients, and the test images are not independent of each other.
