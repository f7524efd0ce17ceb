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
# # Few-shot adaptation to novel localisation tasks
#
# The paper's third claim (C3) is that a VLM pretrained on anatomy adapts to a new
# localisation task from a few labelled images better than the same model without
# that pretraining. This chapter measures sample efficiency as curves: for k labelled
# training images, k = 1, 2, 4, 8, 16, and several seeds (different k-shot draws), each
# start is fine-tuned on the novel task with the same budget and scored on held-out
# images.
#
# **Novel tasks.** Structures the anatomy stage never learnt (chapter 3's VLM learnt
# the lung fields and the heart; by default the trachea here), and synthetic lesions
# written into the CT before projection: pulmonary nodules (a ball of soft-tissue
# density, diameter and position drawn within stated ranges) and, where drawn, a
# pleural effusion (fluid filling the dependent base of one lung), each with its own
# projected mask (`chexanatomy_lib.ct.lesions`), so that `segment lung nodule` has an
# exact answer. The effusion is a task too (`tasks` parameter), but on the bundled CT
# the dependent lung base lies in the posterior recesses behind the liver and at the
# lower edge of chapter 1's field, so its projected mask is often cut by the field and
# lies below the diaphragm's shadow: the smoke run leaves it out.
#
# **Starts**, all with the same optimizer steps per run:
#
# * *anatomy VLM*: chapter 3's model, every weight fine-tuned on the novel task;
# * *image-level VLM*: the same architecture trained by chapter 3 for as many steps
#   on the same images, but with image-level tasks only (the view's orientation and
#   whether a structure is visible, never a box or a mask): the analogue of a VLM
#   pretrained for global image-text alignment; then fine-tuned like the first;
# * *U-Net (scratch)*: chapter 4's architecture, randomly initialised;
# * *U-Net (chapter 4 weights)*: chapter 4's network with a new output layer.
#
# **What comes out.** The k-shot draws (`07_few_shot/draws_<task>.json`, the same for
# every start), per-image scores of every run (`kshot_scores.csv`), curves of Dice and
# box accuracy against k with intervals over seeds and images, the area under each
# curve, the k at which each start reaches a fully supervised U-Net, and the measured
# form of C3: anatomy VLM minus image-level VLM, per k, with its interval.

# %% tags=["parameters"]
run_dir = "runs/default"  # run directory holding every stage's folder
seed = 0  # seeds the lesions and the bootstrap
device = "auto"  # "auto" (CUDA if available), "cpu" or "cuda"
tasks = {"trachea": ["trachea"], "lung nodule": ["lung_nodule"]}  # task name -> registry structures learnt together
ks = [1, 2, 4, 8, 16]  # labelled training images per run
seeds = [0, 1, 2]  # k-shot draws (each seed its own nested order of the eligible images)
starts = ["anatomy VLM", "image-level VLM", "U-Net (scratch)", "U-Net (chapter 4 weights)"]  # which starts run
vlm_steps = 25  # optimizer steps of every VLM run
vlm_batch_size = 4  # samples per VLM step
vlm_lr = 0.002  # peak learning rate of a VLM run
unet_steps = 25  # optimizer steps of every U-Net run (whole epochs over the k images)
unet_batch_size = 4  # images per U-Net step (k when k is smaller)
unet_lr = 0.01  # peak learning rate of a U-Net run
augment = 0.5  # probability of a rotated/zoomed/shifted copy per VLM sample (the U-Net uses chapter 4's setting)
loc_sigma = 24.0  # VLM runs: loc targets spread over this many bins, as in chapter 3
batch_workers = 0  # VLM runs: processes preparing training batches ahead of the step (0: the main process; a GPU run wants 2-4)
full_steps = 150  # steps of the fully supervised reference (U-Net from scratch, every eligible training image)
lesion_images = 48  # radiographs rendered with lesions (PA), split by deformed copy
nodule_diameter_mm = [12.0, 30.0]  # nodule diameters drawn in this range
effusion_probability = 0.5  # share of lesion images with a pleural effusion
n_boot = 1000  # bootstrap resamples for the 95% intervals

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display
from tqdm.auto import tqdm

from chexanatomy_lib.codec import MaskCodec
from chexanatomy_lib.ct.cohort import PoseRanges
from chexanatomy_lib.ct.dataset import ProjectedDataset
from chexanatomy_lib.ct.lesions import LESIONS, LesionRanges, synthesize_lesion_dataset
from chexanatomy_lib.ct.manifest import load_manifest
from chexanatomy_lib.ct.synthesis import RenderSettings
from chexanatomy_lib.evaluation.evaluate import score_images
from chexanatomy_lib.evaluation.figures import plot_curves, plot_differences, plot_overlays
from chexanatomy_lib.fewshot.adapt import adapt_unet, adapt_vlm
from chexanatomy_lib.fewshot.curves import area_under_curve, k_to_reach, kshot_curves, start_difference
from chexanatomy_lib.fewshot.sampling import eligible_rows, kshot_draws, save_draws
from chexanatomy_lib.pipeline import PROJECT_ROOT, stage_dir, write_metrics
from chexanatomy_lib.unet.checkpoint import read_model_card
from chexanatomy_lib.unet.data import Augmentation
from chexanatomy_lib.unet.model import UNetConfig
from chexanatomy_lib.vlm.model import load_saved_vlm

KNOWN_STARTS = ("anatomy VLM", "image-level VLM", "U-Net (scratch)", "U-Net (chapter 4 weights)")
FULL = "U-Net (scratch), all images"  # the fully supervised reference
unknown = [s for s in starts if s not in KNOWN_STARTS]
if unknown:
    raise ValueError(f"unknown start(s) {unknown}; starts: {list(KNOWN_STARTS)}")
out = stage_dir(run_dir, "07_few_shot")
ct_dir = stage_dir(run_dir, "01_ct_projection", create=False)
vlm_dir = stage_dir(run_dir, "03_vlm_finetune", create=False)
unet_dir = stage_dir(run_dir, "04_unet_baseline", create=False)
anatomy = ProjectedDataset(ct_dir / "dataset")
codec = MaskCodec.ours(stage_dir(run_dir, "02_token_codec", create=False) / "vqvae")
vlm_card = json.loads((vlm_dir / "checkpoint" / "model_card.json").read_text())
unet_card = read_model_card(unet_dir / "checkpoint")
learnt = set(vlm_card["structures"])
novel_to_vlm = {t: [s for s in ss if s not in learnt] for t, ss in tasks.items()}
if any(len(v) < len(tasks[t]) for t, v in novel_to_vlm.items()):
    raise ValueError(f"chapter 3's VLM already learnt {sorted(learnt)}: a novel task must not ask for them")
print(f"chapter 3's VLM learnt {sorted(learnt)}; chapter 4's U-Net learnt {len(unet_card['structures'])} structures")

# %% [markdown]
# ## Data: the novel tasks and their images
#
# A novel structure is learnt from chapter 1's training images and scored on its test
# images. Lesion tasks get their own radiographs: the bundled CT, deformed and posed as
# in chapter 1, with nodules (and in some images an effusion) written into it before
# projection, split by deformed copy like chapter 1.

# %%
needs_lesions = any(s in LESIONS for ss in tasks.values() for s in ss)
datasets = {}
if needs_lesions:
    manifest = PROJECT_ROOT / json.loads((ct_dir / "params.json").read_text())["manifest"]
    settings = RenderSettings.from_dict(anatomy.meta["render_settings"])
    ranges = LesionRanges(nodule_diameter_mm=tuple(nodule_diameter_mm), effusion_probability=effusion_probability)
    cohort = anatomy.meta["cohort"]  # deformed and posed as chapter 1's images
    lesion_path = synthesize_lesion_dataset(
        load_manifest(manifest)[0], out / "lesions", lesion_images, settings, ranges,
        structures=["lung_field_left", "lung_field_right", "heart"], seed=seed, overwrite=True, threads=2,
        amplitude_mm=cohort["amplitude_mm"], scale_range=cohort["scale_range"],
        control_points=cohort["control_points"], pose_ranges=PoseRanges(**cohort["pose_ranges"]))
    lesions = ProjectedDataset(lesion_path)
for task, ss in tasks.items():
    datasets[task] = lesions if any(s in LESIONS for s in ss) else anatomy
rows_by_task = {t: eligible_rows(datasets[t], "train", ss) for t, ss in tasks.items()}
draws = {}
for task, ss in tasks.items():
    usable_k = [k for k in ks if k <= len(rows_by_task[task])]
    draws[task] = kshot_draws(rows_by_task[task], usable_k, seeds)
    save_draws(draws[task], out / f"draws_{task.replace(' ', '_')}.json", datasets[task])
pd.DataFrame([{"task": t, "structures": ", ".join(ss), "images": datasets[t].path.name,
               "eligible training images": len(rows_by_task[t]),
               "test images": len(eligible_rows(datasets[t], "test", ss)),
               "k": ", ".join(str(k) for k in sorted(set(draws[t]["k"])))} for t, ss in tasks.items()]).set_index("task")

# %%
if needs_lesions:
    show = lesions.split_indices("train")[:4]
    fig = plot_overlays(np.asarray(lesions.images[show]), lesions.masks_for(show, list(LESIONS)), {}, list(LESIONS),
                        titles=[str(lesions.index["image_id"].iloc[i]) for i in show])
    plt.show()

# %% [markdown]
# ## The starts
#
# The image-level control was trained by chapter 3 beside its anatomy model: the same
# architecture, seed, steps, batch size and training images, with the view and
# visibility questions only. It learnt what the images look like and what is in them,
# never where.

# %%
control_dir = vlm_dir / "control" / "checkpoint"
if "image-level VLM" in starts and not (control_dir / "model_card.json").is_file():
    raise FileNotFoundError(f"{control_dir}: no image-level control; run chapter 3 with train_control=True")
control = load_saved_vlm(control_dir) if "image-level VLM" in starts else None
anatomy_vlm = load_saved_vlm(vlm_dir / "checkpoint") if "anatomy VLM" in starts else None
pd.DataFrame([{"start": "anatomy VLM", "pretraining": "chapter 3: segment, detect, caption, highlight, view",
               "steps": vlm_card["steps"]},
              {"start": "image-level VLM", "pretraining": "chapter 3: view, visible (no boxes or masks)",
               "steps": control.info["card"]["steps"] if control is not None else None},
              {"start": "U-Net (scratch)", "pretraining": "none", "steps": 0},
              {"start": "U-Net (chapter 4 weights)", "pretraining": f"chapter 4: {len(unet_card['structures'])} "
                                                                    "structures", "steps": None}]).set_index("start")

# %% [markdown]
# ## The k-shot runs
#
# Every (task, k, seed) trains each start on the same k images for the same number of
# steps and scores it on the task's test images with the shared per-image scoring.
# Runs already scored in this folder are read back, so an interrupted chapter resumes.

# %%
u_model = UNetConfig.from_dict(unet_card["model"])
u_aug = Augmentation(**unet_card["training"]["augmentation"]) if "augmentation" in unet_card["training"] else None
aug_params = {"max_rotation_deg": 3.0, "max_scale": 0.08, "max_shift": 0.04}


def run_once(task, start, rows, run_seed, where):
    ds, ss = datasets[task], tasks[task]
    if start in ("anatomy VLM", "image-level VLM"):
        base = anatomy_vlm if start == "anatomy VLM" else control
        return adapt_vlm(base, ds, rows, ss, codec, None, vlm_steps, vlm_batch_size, vlm_lr, run_seed,
                         loc_sigma=loc_sigma, augment=augment,
                         augment_params=aug_params, device=device, batch_workers=batch_workers)
    return adapt_unet(ds, rows, ss, where, full_steps if start == FULL else unet_steps,
                      unet_batch_size, unet_lr, run_seed, int(unet_card["input_size"]), u_model,
                      init_from=unet_dir / "checkpoint" if start == "U-Net (chapter 4 weights)" else None,
                      augmentation=u_aug, device=device)


def score_run(task, segmenter):
    ds, ss = datasets[task], tasks[task]
    test = ds.split_indices("test")
    masks, boxes, valid = segmenter.predict(np.asarray(ds.images[test], np.float32), ss, batch_size=16)
    ch = [ds.channel(s) for s in ss]
    keep = ~ds.absent[np.ix_(test, ch)] & ~ds.truncated[np.ix_(test, ch)]
    return score_images(masks, boxes, valid, ds.masks_for(test, ss), ss,
                        ds.index["image_id"].to_numpy()[test].astype(str), ds.index["view"].to_numpy()[test],
                        keep, ds.absent[np.ix_(test, ch)])


jobs = [(t, st, int(r.k), int(r.seed), r.rows) for t in tasks for _, r in draws[t].iterrows() for st in starts]
jobs += [(t, FULL, len(rows_by_task[t]), 0, list(rows_by_task[t])) for t in tasks]  # full supervision
scores = []
for task, start, k, s, rows in tqdm(jobs, desc="k-shot runs"):
    where = out / "runs" / task.replace(" ", "_") / start.replace(" ", "_").replace("(", "").replace(")", "") / f"k{k:03d}_s{s}"
    done = where / "scores.csv"
    if not done.is_file():
        where.mkdir(parents=True, exist_ok=True)
        score_run(task, run_once(task, start, rows, s, where)).to_csv(done, index=False)
    scores.append(pd.read_csv(done).assign(task=task, start=start, k=k, seed=s))
scores = pd.concat(scores, ignore_index=True)
full = scores[scores["start"] == FULL]
kshot = scores[scores["start"] != FULL]
kshot.to_csv(out / "kshot_scores.csv", index=False)
reference = full.groupby("task")["dice"].mean().to_dict()
print(f"{len(jobs)} runs; fully supervised U-Net (all eligible training images, {full_steps} steps): "
      + ", ".join(f"{t} Dice {v:.3f}" for t, v in reference.items()))

# %% [markdown]
# ## Curves
#
# Mean Dice and box accuracy against k (log scale), with 95% intervals that resample
# both the k-shot draws (seeds) and the test images; the dotted line is the fully
# supervised U-Net.

# %%
curves = {m: kshot_curves(kshot, m, n_boot=n_boot, seed=seed) for m in ("dice", "box_acc@0.5")}
for metric, table in curves.items():
    fig = plot_curves(table, panel="task", x="k", line="start", metric=metric, columns=len(tasks), logx=True,
                      reference=reference if metric == "dice" else None)
    fig.suptitle(f"{metric} against k labelled images (mean over seeds and test images, 95% CI)", fontsize=10, y=1.02)
    plt.show()
curves["dice"].round(3)

# %% [markdown]
# ## Summaries
#
# The area under each Dice curve (on the log2 k axis, divided by its length: the
# curve's mean height), and the smallest k at which each start reaches the fully
# supervised U-Net's mean Dice (and at which its interval clears it).

# %%
auc = area_under_curve(kshot, "dice", n_boot=n_boot, seed=seed)
reach = k_to_reach(curves["dice"], reference)
summary = auc.join(reach)
summary.to_csv(out / "kshot_summary.csv")
summary.round(3)

# %% [markdown]
# ## C3 in its measured form
#
# Anatomy VLM minus image-level VLM, per task and k: the difference of their mean Dice
# on the same draws and test images, with its 95% two-level interval and the verdict it
# gives ("A better": the anatomy-pretrained start is ahead with an interval above zero).

# %%
metrics = {}
if {"anatomy VLM", "image-level VLM"} <= set(starts):
    c3 = start_difference(kshot, "anatomy VLM", "image-level VLM", "dice", n_boot=n_boot, seed=seed)
    c3.to_csv(out / "c3_differences.csv")
    plot_differences(c3, title="anatomy VLM − image-level VLM, Dice (95% CI over seeds and images)",
                     label="difference in Dice (> 0: anatomy pretraining helps)")
    plt.show()
    display(c3.round(3))
    both = auc.xs("anatomy VLM", level="start")["auc"] - auc.xs("image-level VLM", level="start")["auc"]
    for task in tasks:
        key = task.replace(" ", "_")
        for k in (min(ks), 4, max(k for k in ks if k <= len(rows_by_task[task]))):
            if (task, k) in c3.index:
                for col in ("difference", "difference_lo", "difference_hi"):
                    metrics[f"c3_{key}_k{k}_{col}"] = c3.at[(task, k), col]
        metrics[f"c3_{key}_auc_difference"] = both.get(task)

# %%
for (task, start), row in auc.iterrows():
    key = f"{task}_{start}".replace(" ", "_").replace("(", "").replace(")", "").lower()
    metrics[f"auc_{key}"] = row["auc"]
for task, v in reference.items():
    metrics[f"full_supervision_dice_{task.replace(' ', '_')}"] = v
metrics["runs"] = len(jobs)
write_metrics(run_dir, "07_few_shot", metrics)
pd.Series(metrics, name="value").to_frame()

# %% [markdown]
# ## What this shows, and what it cannot
#
# The machinery is what a real run uses: seeded nested draws saved with the run, the
# same images and budget for every start, the models' own training code on the one
# loop, per-image scores, intervals over both seeds and test images, and a verdict read
# from the interval. What the smoke profile cannot show is the paper's claim. All the
# images are one patient's CT in many poses, so a "novel" structure sits in nearly the
# same place in every image and a handful of examples already fixes its position; the
# models are tiny and trained from scratch for minutes; the "pretrained" VLM's
# advantage over the image-level control partly reflects that it has already learnt the
# output format (boxes and mask tokens), which the control meets for the first time in
# these few steps, rather than anatomy as such; small targets such as nodules need
# far more than this budget (read each curve against the fully supervised reference
# line before reading a difference between starts); and chapter 4's U-Net learnt every
# visible structure, the novel ones included, so its weights are not naive to the
# structure tasks (they are to the lesions). A real test of C3 needs a pretrained
# PaliGemma, an image-level pretrained control of the same size, many patients and
# lesions drawn from real distributions: the `paper` profile and the sweep file
# `notebooks/sweeps/few_shot.yaml`.
