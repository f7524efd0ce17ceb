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
# # Ablations: model scale, input resolution and the vision encoder
#
# The paper's last three claims come from ablations of its recipe: a larger model
# segments better (C4), a higher input resolution segments better (C5), and fine-tuning
# the vision encoder changes little (C6). Each ablation is a *sweep* of chapter 3: the
# chapter runs once per value of the swept parameter and per seed, with everything else
# fixed, and every run is scored on the same held-out images by the same metrics module.
#
# | sweep file (`notebooks/sweeps/`) | smoke variant (`make sweeps`, 2 CPU cores) | paper variant (`--variant paper`, a GPU) |
# |---|---|---|
# | `ablation_model_scale.yaml` | random PaliGemmas of 1.8 M, 13 M and 37 M parameters at 96 px, 300 steps | PaliGemma 2 3B, 10B, 28B at 224 px, LoRA |
# | `ablation_resolution.yaml` | the tiny model reading the films at 64, 128 and 192 px, 900 steps | PaliGemma 2 3B at 224, 448, 896 px, LoRA |
# | `ablation_vision_finetuning.yaml` | chapter 3's image-level model fine-tuned to anatomy with its vision tower trained or frozen, 300 steps | LoRA on SigLIP or not |
#
# Two seeds per cell. The sweeps take too long to run inside the book: `make sweeps`
# runs the smoke variants (about 50 minutes on 2 cores) and records each finished sweep
# under `records/sweeps/` with its plan, device, revision and command, and with every
# cell's per-image scores; `chexanatomy sweep notebooks/sweeps/ablation_*.yaml
# --variant paper --record` does the same for the paper's checkpoints on a GPU. This
# chapter only reads: the recorded sweeps, and any sweep of the same name in this run
# directory (`<run_dir>/sweeps/<name>/`, written by `chexanatomy sweep` without
# `--record`). Every figure and table names where its numbers come from.
#
# **How a number is made.** For each swept value, the VLM's mean Dice over seeds and
# test images, with a 95% interval from a two-level bootstrap (seeds and images
# resampled together), beside the mean-mask baseline on the same images. An ablation's
# *effect* compares the sweep's two ends (largest − smallest model, highest − lowest
# resolution, vision tower trained − frozen) image by image: each resample draws the
# test images once for both settings and each setting's seeds on its own.

# %% tags=["parameters"]
run_dir = "runs/default"  # run directory; its sweeps/ folder is read besides the records
seed = 0  # seeds the bootstrap
records_dir = "records"  # recorded runs (relative to the project root); sweeps under records_dir/sweeps/
sweeps = ["ablation_model_scale", "ablation_resolution", "ablation_vision_finetuning"]  # sweep families shown
structures = ["lung fields", "heart"]  # scored structures ("lung fields": per-image mean of both lung fields)
metric = "dice"  # per-image metric of the sweeps' score tables
n_boot = 1000  # bootstrap resamples for the 95% intervals

# %%
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from chexanatomy_lib.evaluation.ablations import ablation_curve, find_sweeps, sweep_effects
from chexanatomy_lib.evaluation.figures import plot_curves, plot_differences
from chexanatomy_lib.pipeline import PROJECT_ROOT, stage_dir, write_metrics

out = stage_dir(run_dir, "08_ablations")
records = Path(records_dir) if Path(records_dir).is_absolute() else PROJECT_ROOT / records_dir
found = find_sweeps(sweeps, records, run_dir)
pd.DataFrame([{
    "sweep": sw.name, "source": sw.source, "profile": sw.profile, "swept": sw.key,
    "values": ", ".join(map(str, sw.values)), "seeds": len(sw.meta.get("seeds", [])),
    "images": sw.per_image["image_id"].nunique(), "wall time (min)": round(sw.meta.get("wall_time_s", np.nan) / 60, 1),
    "command": sw.meta.get("command", ""),
} for sw in found], columns=["sweep", "source", "profile", "swept", "values", "seeds", "images", "wall time (min)",
                             "command"])

# %% [markdown]
# The sweeps this chapter found: each one's source (recorded, with date, revision and
# device; or this run directory), the profile its cells ran with, the swept parameter
# and values, the seeds per cell, the held-out images every cell was scored on and the
# sweep's wall time.

# %%
if not found:
    print(f"no finished sweep of {sweeps} in {records}/sweeps or {run_dir}/sweeps: run `make sweeps`")
curves = {}
for sw in found:
    curve = ablation_curve(sw, structures, metric=metric, n_boot=n_boot, seed=seed)
    curves[(sw.name, sw.source)] = curve
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sw.values)
    x = "value" if numeric else "position"
    shown = curve.assign(line=f"VLM ({curve['seeds'].max()} seeds)")
    fig = plot_curves(shown, panel="structure", x=x, line="line", metric=metric, columns=len(structures),
                      xlabels={s: sw.key.replace("_", " ") for s in structures},
                      reference={s: float(g["baseline"].mean()) for s, g in curve.groupby("structure")},
                      xticks=None if numeric else {i: str(v).split("/")[-1] for i, v in enumerate(sw.values)},
                      ylim=None)
    fig.suptitle(f"{sw.name} — {sw.source}", fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    plt.show()

# %% [markdown]
# One figure per sweep and source: the VLM's mean Dice per swept value and structure,
# with its 95% band over seeds and test images; the dotted line is the mean-mask
# baseline on the same images (it does not depend on the model). A band that does not
# rise with the swept value says that this sweep, at its scale, shows no gain from it.
#
# ## Each ablation's effect, image by image

# %%
effects = sweep_effects(found, structures, metric=metric, n_boot=n_boot, seed=seed)
effects.to_csv(out / "effects.csv", index=False)
if len(effects):
    shown = effects.assign(**{"difference [95% CI]": [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in
                                                      zip(effects["difference"], effects["difference_lo"],
                                                          effects["difference_hi"])]})
    display(shown[["claim", "sweep", "source", "contrast", "structure", "mean_a", "mean_b", "difference [95% CI]",
                   "verdict"]].round(3))
    short = [", ".join(str(x).split(", ")[:2]) for x in effects["source"]]  # "recorded <date>, <revision>"
    table = effects.assign(source=short).set_index(["claim", "structure", "source"])
    plot_differences(table, title=f"ablation effects ({metric}; A is the first setting named)",
                     label=f"{metric} difference (A − B, 95% CI)")
    plt.show()

# %% [markdown]
# Per sweep, source and structure: the contrast (A − B), both settings' mean Dice on
# the images both scored, the difference with its 95% interval, and the verdict read
# from it ("A better": above zero; "A worse": below; "not distinguishable": the interval
# contains zero). Chapter 9 reads this table (`08_ablations/effects.csv`) to decide C4,
# C5 and C6.

# %%
headline = {"sweeps_found": len(found)}
for _, r in effects.iterrows():
    key = f"{r['sweep'].replace('.', '_')}_{r['structure'].replace(' ', '_')}"
    if r["source"] == "this run's sweep":
        key += "_this_run"
    for col in ("difference", "difference_lo", "difference_hi"):
        headline[f"{key}_{col}"] = r[col]
write_metrics(run_dir, "08_ablations", headline)
pd.Series(headline, name="value").to_frame()

# %% [markdown]
# ## What these sweeps can and cannot show
#
# The smoke variants train small random models for a few CPU minutes on one patient's
# films and score them on twenty-odd held-out films of the same patient. They show that
# each ablation runs end to end and how its effect is measured, and they say, with
# intervals, whether *at this scale* a larger model, a larger input or a trained vision
# tower changes the Dice. They cannot show the paper's effects: a random 37 M-parameter
# model given 300 steps is not a larger PaliGemma, a 192 px input to a model trained
# for two minutes is not a 896 px checkpoint, and a vision tower pretrained on two
# image-level questions about one patient is not SigLIP. The paper variants, run on a
# GPU with the real checkpoints and many patients' CTs, are where C4 to C6 are decided;
# their records appear here, labelled, when they exist.
