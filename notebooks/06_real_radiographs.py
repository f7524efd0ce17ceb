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
# # Real chest radiographs: the domain gap and clinical measures
#
# The paper trains on radiographs rendered from CT and evaluates on real chest
# X-rays. Its referee asked for the synthetic-to-real gap to be *measured* — how the
# projected anatomy and the rendered images differ from real ones — and for the
# failures to be examined (R1, R2). This chapter does both for any real set a user
# brings, and in the smoke build shows what can be measured without real images.
#
# **What goes in.** Chapter 1's projected dataset, the predictions and checkpoints of
# chapters 3 and 4, the real lung-field annotations that ship inside the
# `torchxrayvision` wheel (masks only, read in place, used here for evaluation only),
# and optionally a real set described by a manifest (`-p real_manifest=data_manifests/real_jsrt.yaml`;
# readers for JSRT with SCR masks, Montgomery, Shenzhen, CheXmask, VinDr-RibCXR and
# any folder of images with per-structure masks are in `chexanatomy_lib.real.readers`).
# **What comes out.** The shape gap between projected and real annotations with
# intervals (`06_real_radiographs/shape_gap.csv`), the cardiothoracic ratio measured
# from reference and predicted masks, and, with a real set: both models scored on it,
# the intensity and texture gap, the image-space shifts of chapter 5 on real films,
# and the worst cases drawn.
#
# **Method.** Real images are letterboxed to the dataset's image size as
# `chexanatomy segment` does (padded to a square, centred, resized), their masks with
# them, so the models see real films exactly as they see DRRs. Scores come from the
# same per-image scoring as every chapter, beside the mean-mask baseline (each
# structure's mean training mask, which never looks at the image).

# %% tags=["parameters"]
run_dir = "runs/default"  # run directory holding every stage's folder
seed = 0  # seeds the bootstrap and the marker positions
device = "auto"  # where both models run with a real set: "auto" (CUDA if available), "cpu" or "cuda"
real_manifest = None  # a real set's manifest (data_manifests/real_*.yaml); None: only what needs no real images
real_limit = None  # read at most this many images of the real set (None: all)
structures = ["lung_field_left", "lung_field_right", "heart"]  # scored where both the models and the set have them
real_axes = {"rotation_2d": [0, 15, 30], "blur": [0, 2, 4], "contrast": [0, 0.5], "gamma": [1.0, 0.5], "invert": [0, 1],
             "markers": [0, 2]}  # image-space shifts of chapter 5 applied to the real films
n_worst = 4  # worst cases drawn per structure
batch_size = 16  # images per forward pass
n_boot = 1000  # bootstrap resamples for the 95% intervals

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import display

from chexanatomy_lib.codec.geometry import masks_to_boxes
from chexanatomy_lib.ct.dataset import ProjectedDataset
from chexanatomy_lib.evaluation.baselines import mean_mask_predictions, mean_masks
from chexanatomy_lib.evaluation.clinical import CARDIOMEGALY_CTR, cardiothoracic_ratio, ctr_errors
from chexanatomy_lib.evaluation.domain_gap import (
    STATISTICS, intensity_gap, intensity_histograms, radial_power_spectrum, shape_gap, shape_statistics,
)
from chexanatomy_lib.evaluation.evaluate import METRICS, paired_difference, score_images, summarize
from chexanatomy_lib.evaluation.figures import (
    comparison_table, plot_agreement, plot_curves, plot_distributions, plot_overlays, plot_summary,
)
from chexanatomy_lib.evaluation.metrics import bootstrap_ci
from chexanatomy_lib.evaluation.predictions import load_predictions
from chexanatomy_lib.evaluation.shift import image_shifted_set, score_shifted
from chexanatomy_lib.pipeline import stage_dir, write_metrics
from chexanatomy_lib.real.v7labs import read_lung_masks

out = stage_dir(run_dir, "06_real_radiographs")
dataset = ProjectedDataset(stage_dir(run_dir, "01_ct_projection", create=False) / "dataset")
size = int(dataset.image_size)
fields = ["lung_field_left", "lung_field_right"]
pa = np.flatnonzero(dataset.index["view"].to_numpy() == "pa")
print(dataset)
print(f"real set: {real_manifest or 'none given (the sections that need real images are skipped)'}")

# %% [markdown]
# ## The shape gap: projected lung fields against real annotations
#
# Every PA image of chapter 1's cohort against the 435 real frontal lung-field masks
# that ship with torchxrayvision (V7 Labs' annotations of the COVID-19 image data
# collection), both on the same square grid. Per statistic: the two medians and the
# Wasserstein distance between the distributions with a 95% bootstrap interval (each
# set resampled), and that distance over the real masks' own standard deviation
# (*standardised*: below about 0.5 the projected masks sit within the real spread,
# above 1 they are further from it than real masks are from each other). The
# statistics: area fraction, box height over width, vertical and horizontal centroid,
# box fill, orientation of the principal axis (degrees, > 0 when the top leans to the
# image's right) and convexity.

# %%
real = read_lung_masks(size)
projected = {side: dataset.masks_for(pa, [side])[:, 0] for side in fields}
real_sides = {"lung_field_left": real.left, "lung_field_right": real.right}
gap = pd.concat({side: shape_gap(shape_statistics(projected[side]), shape_statistics(real_sides[side]),
                                 n_boot=n_boot, seed=seed).rename(columns={"median_a": "median projected",
                                                                           "median_b": "median real"})
                 for side in fields}, names=["structure"])
gap.to_csv(out / "shape_gap.csv")
gap.round(3)

# %%
axes = plot_distributions({"projected (chapter 1, PA)": shape_statistics(projected["lung_field_right"]),
                           "real (torchxrayvision, V7 Labs)": shape_statistics(real.right)},
                          ["area_fraction", "box_aspect", "centroid_y", "orientation_deg", "convexity"])
axes[0].figure.suptitle("right lung field: projected against real", fontsize=10, y=1.03)
plt.show()

# %% [markdown]
# **Reading the gap.** Where the standardised distance is small, the projected fields
# sit within the spread of real ones; position (the centroids) is what chapter 1
# calibrated the cohort's framing on. Box fill and convexity say how solid an outline
# is. A projected lung field is the lung minus everything its ray also crosses —
# heart, mediastinum, the organs below the diaphragm — so it keeps a notch where the
# heart bulges into it and thin tails where the costophrenic recesses run down beside
# the liver, while a person drawing a lung field on a film draws one smooth, solid
# outline. A model trained on projected fields learns their outline; where these
# statistics stand far apart, its masks will differ from a real annotator's even when
# it finds the lung exactly.

# %% [markdown]
# ## Cardiothoracic ratio, from reference and predicted masks
#
# The cardiothoracic ratio (CTR) is the widest horizontal diameter of the heart over
# the widest internal diameter of the thorax; above 0.5 on a PA film it suggests
# cardiomegaly. It is measured here from masks (`chexanatomy_lib.evaluation.clinical`):
# the heart mask's horizontal extent over the widest row of the two lung fields
# together, each taken as its largest connected piece (a stray speck of a predicted
# mask would otherwise stretch the extent). On the PA images of the test split, from the reference masks and from
# each model's masks, with the error of each model (mean absolute error and its 95%
# bootstrap interval over images) and how often it makes the same cardiomegaly call.

# %%
test_pa = dataset.split_indices("test", "pa")
ids = dataset.index["image_id"].to_numpy()[test_pa]
needed = ["heart", *fields]
reference_ctr = cardiothoracic_ratio(dataset.masks_for(test_pa, ["heart"])[:, 0], dataset.masks_for(test_pa, fields))
predicted_masks = {}
for model, stage in (("VLM (chapter 3)", "03_vlm_finetune"), ("U-Net (chapter 4)", "04_unet_baseline")):
    path = stage_dir(run_dir, stage, create=False) / "predictions" / "test.npz"
    if path.is_file():
        pred = load_predictions(path)
        if all(s in pred.structures for s in needed):
            rows = pred.rows_of(ids)
            predicted_masks[model] = pred.masks[rows][:, [pred.channel(s) for s in needed]]
base = mean_mask_predictions(dataset, "test", structures=needed)
predicted_masks["mean-mask baseline"] = base.masks[base.rows_of(ids)]
ctr = {model: ctr_errors(reference_ctr, cardiothoracic_ratio(m[:, 0], m[:, 1:])) for model, m in predicted_masks.items()}
rows = []
for k, (model, e) in enumerate(ctr.items()):
    mae, lo, hi = bootstrap_ci(e["absolute_error"].to_numpy(), n_boot=n_boot, seed=seed + k)
    rows.append({"model": model, "images": int(e["absolute_error"].notna().sum()),
                 "reference CTR (median)": float(np.nanmedian(e["ctr_reference"])),
                 "predicted CTR (median)": float(np.nanmedian(e["ctr_predicted"])),
                 "mean absolute error": mae, "MAE lo": lo, "MAE hi": hi,
                 "bias (mean error)": float(np.nanmean(e["error"])),
                 "same cardiomegaly call": float(np.nanmean(e["same_call"]))})
ctr_table = pd.DataFrame(rows).set_index("model")
ctr_table.round(3)

# %%
ax = plot_agreement({model: (e["ctr_reference"], e["ctr_predicted"]) for model, e in ctr.items()},
                    label="cardiothoracic ratio", threshold=CARDIOMEGALY_CTR)
ax.set_title("CTR on the test split's PA films: predicted against reference", fontsize=9)
plt.show()

# %% [markdown]
# ## A real set
#
# The rest of the chapter needs real radiographs. With `real_manifest` set, the set is
# read (every file checked before any is used), letterboxed to the dataset's image size,
# and both saved models segment it.

# %%
have_real = real_manifest is not None
if have_real:
    from chexanatomy_lib.real.readers import read_real_set
    from chexanatomy_lib.unet.inference import load_segmenter
    from chexanatomy_lib.vlm.predict import VLMSegmenter

    rs = read_real_set(real_manifest, size=size, limit=real_limit)
    have_images = rs.images is not None  # a CheXmask set without its images holds masks only
    models = {"VLM": VLMSegmenter.load(stage_dir(run_dir, "03_vlm_finetune", create=False) / "checkpoint",
                                       device=device),
              "U-Net": load_segmenter(stage_dir(run_dir, "04_unet_baseline", create=False) / "checkpoint",
                                      device=device)}
    scored = [s for s in structures if s in rs.structures and all(s in m.structures for m in models.values())]
    if not scored:
        raise ValueError(f"{real_manifest}: the set annotates {rs.structures}, the models learnt "
                         f"{[list(m.structures) for m in models.values()]}; none of {structures} is in both")
    channels = [rs.structures.index(s) for s in scored]
    real_masks = rs.masks[:, channels]
    keep = rs.annotated[:, channels] & real_masks.reshape(len(rs), len(scored), -1).any(-1)
    print(f"{rs.name}: {len(rs)} images, {', '.join(rs.structures)} annotated; scored here: {', '.join(scored)}")
    for note in rs.notes:
        print(" -", note)
    if not have_images:
        print("This set holds masks only: the sections that need its images are skipped.")
else:
    have_images = False
    print("No real set given: the sections below are skipped. Give one with "
          "`chexanatomy run notebooks/06_real_radiographs.py -p real_manifest=data_manifests/real_jsrt.yaml`.")

# %% [markdown]
# ### Both models on real films
#
# Dice, HD95 (pixels at the dataset's image size) and box accuracy per structure, with
# 95% bootstrap intervals over images; the baseline predicts the cohort's mean PA
# training mask. Then the paired difference of the two models on the same images.

# %%
if have_images:
    template = mean_masks(dataset, scored, view="pa")  # bool [S, H, W]
    real_outputs = {name: m.predict(rs.images, scored, batch_size=batch_size, progress=False)
                    for name, m in models.items()}
    tb = masks_to_boxes(template).astype(np.float32)
    real_outputs["mean-mask baseline"] = (np.repeat(template[None], len(rs), 0), np.repeat(tb[None], len(rs), 0),
                                          np.repeat(template.reshape(len(scored), -1).any(-1)[None], len(rs), 0))
    absent = ~real_masks.reshape(len(rs), len(scored), -1).any(-1)
    real_scores = {name: score_images(m, b, v, real_masks, scored, rs.image_ids, ["real"] * len(rs), keep, absent)
                   for name, (m, b, v) in real_outputs.items()}
    real_summaries = {name: summarize(s, "structure", METRICS, n_boot=n_boot, seed=seed, groups=scored)
                      for name, s in real_scores.items()}
    real_paired = paired_difference(real_scores["VLM"], real_scores["U-Net"], scored, n_boot=n_boot, seed=seed,
                                    together={"lung fields": [s for s in fields if s in scored]})
    real_paired.to_csv(out / "real_paired_differences.csv")
    display(comparison_table(real_summaries, metrics=("dice", "hd95", "box_acc@0.5")))
    plot_summary(real_summaries, "dice", structures=scored, title=f"{rs.name}: Dice per structure (95% CI)")
    plt.show()
    display(real_paired.round(3))

# %% [markdown]
# ### Intensity and texture: DRRs against real films
#
# Histograms of display values (inside the letterbox only) and radially averaged power
# spectra of the test split's DRRs against the real films, with the Jensen-Shannon
# divergence of the mean histograms, the Wasserstein distance of the values and the
# mean difference of the log spectra, each with a 95% bootstrap interval over images.

# %%
if have_images:
    drr = np.asarray(dataset.images[dataset.split_indices("test", "pa")], dtype=np.float32)
    inside = np.stack([lb.content_mask() for lb in rs.letterboxes])  # bool [N, size, size]
    intensity = intensity_gap(drr, rs.images, masks_b=inside, n_boot=n_boot, seed=seed)
    intensity.to_csv(out / "intensity_gap.csv")
    display(intensity.round(4))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2))
    centres = (np.arange(64) + 0.5) / 64
    a1.plot(centres, intensity_histograms(drr).mean(0), label="DRR (test, PA)")
    a1.plot(centres, intensity_histograms(rs.images, masks=inside).mean(0), label=rs.name)
    a1.set_xlabel("display value (0 black, 1 white)")
    a1.set_ylabel("share of pixels")
    a1.legend(fontsize=8)
    freq, s_drr = radial_power_spectrum(drr)
    _, s_real = radial_power_spectrum(rs.images)
    a2.plot(freq, s_drr.mean(0), label="DRR (test, PA)")
    a2.plot(freq, s_real.mean(0), label=rs.name)
    a2.set_xlabel("spatial frequency (cycles per pixel)")
    a2.set_ylabel("log10 power")
    a2.legend(fontsize=8)
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ### The shape gap with the set's own annotations
#
# The same statistics as above, now between the projected masks and this set's
# reference masks, for every structure both have.

# %%
if have_real:
    real_gap = pd.concat({s: shape_gap(shape_statistics(dataset.masks_for(pa, [s])[:, 0]),
                                       shape_statistics(real_masks[keep[:, k], k]), n_boot=n_boot, seed=seed)
                          for k, s in enumerate(scored) if keep[:, k].sum() > 1}, names=["structure"])
    real_gap.to_csv(out / "real_shape_gap.csv")
    display(real_gap.round(3))

# %% [markdown]
# ### Image-space shifts of real films
#
# The image-space axes of chapter 5, applied to the real films (the masks follow the
# in-plane rotation; the appearance changes leave them as they are): how each model's
# Dice on real films moves with rotation, blur, contrast, gamma, inverted polarity and
# burned-in markers.

# %%
if have_images and real_axes:
    shift_scores = []
    for axis, mags in real_axes.items():
        sset = image_shifted_set(rs.images, real_masks, keep, rs.image_ids, ["real"] * len(rs), scored, axis,
                                 [float(m) for m in mags], seed=seed)
        for name, m in models.items():
            outputs = m.predict(sset.images, scored, batch_size=batch_size, progress=False)
            shift_scores.append(score_shifted(sset, *outputs).assign(model=name))
    shift_scores = pd.concat(shift_scores, ignore_index=True)
    curves = summarize(shift_scores, ["model", "axis", "magnitude", "structure"], ["dice"], n_boot=n_boot, seed=seed)
    fig = plot_curves(curves.xs(scored[0], level="structure"), panel="axis", x="magnitude", line="model",
                      metric="dice", columns=5)
    fig.suptitle(f"{rs.name}, {scored[0]}: Dice under image-space shift (95% CI)", fontsize=10, y=1.02)
    plt.show()

# %% [markdown]
# ### Failures
#
# For each structure, the real films on which the models' mean Dice is lowest, the
# VLM's masks filled, the U-Net's dotted, the reference as outlines. Below them, what
# the worst cases have in common: the median shape statistics of their reference
# masks against the other films'.

# %%
if have_images:
    per_image = pd.concat([real_scores[n].assign(model=n) for n in models], ignore_index=True)
    common = []
    for s in scored:
        mean = per_image[per_image["structure"] == s].groupby("image_id")["dice"].mean().sort_values()
        worst = list(mean.index[:n_worst])
        k = [rs.image_ids.index(i) for i in worst]
        fig = plot_overlays(rs.images[k], real_masks[k], {n: real_outputs[n][0][k] for n in models}, scored,
                            titles=[f"{s} worst {j + 1}: {i}\nmean Dice {mean[i]:.2f}" for j, i in enumerate(worst)],
                            columns=n_worst)
        plt.show()
        sk = scored.index(s)
        stats = shape_statistics(real_masks[:, sk])
        is_worst = np.isin(np.asarray(rs.image_ids), worst)
        common.append(pd.DataFrame({"worst": stats[is_worst].median(), "others": stats[~is_worst].median()})
                      .T.assign(structure=s))
    display(pd.concat(common).round(3))

# %% [markdown]
# ### Cardiothoracic ratio on real films
#
# Where the set annotates the heart and both lung fields: the CTR from the reference
# masks against each model's, as on the synthetic test split above.

# %%
if have_images and all(s in scored for s in needed):
    order = [scored.index(s) for s in needed]
    ok = keep[:, order].all(1)
    real_ref_ctr = cardiothoracic_ratio(real_masks[ok][:, order[0]], real_masks[ok][:, order[1:]])
    real_ctr = {n: ctr_errors(real_ref_ctr, cardiothoracic_ratio(o[0][ok][:, order[0]], o[0][ok][:, order[1:]]))
                for n, o in real_outputs.items()}
    display(pd.DataFrame({n: {"mean absolute error": e["absolute_error"].mean(),
                              "same cardiomegaly call": e["same_call"].mean()} for n, e in real_ctr.items()}).T)

# %%
headline = {}
for side in fields:
    for s in STATISTICS:
        headline[f"shape_gap_{side}_{s}_standardised"] = gap.at[(side, s), "standardised"]
        # the interval of the distance, in the same units (the real set's spread taken as known)
        w = gap.at[(side, s), "wasserstein"]
        per_unit = gap.at[(side, s), "standardised"] / w if w > 0 else np.nan
        headline[f"shape_gap_{side}_{s}_standardised_lo"] = gap.at[(side, s), "wasserstein_lo"] * per_unit
        headline[f"shape_gap_{side}_{s}_standardised_hi"] = gap.at[(side, s), "wasserstein_hi"] * per_unit
    headline[f"shape_gap_{side}_area_fraction_wasserstein_lo"] = gap.at[(side, "area_fraction"), "wasserstein_lo"]
for model, key in (("VLM (chapter 3)", "vlm"), ("U-Net (chapter 4)", "unet"), ("mean-mask baseline", "baseline")):
    if model in ctr_table.index:
        for col, name in (("mean absolute error", "mae"), ("MAE lo", "mae_lo"), ("MAE hi", "mae_hi")):
            headline[f"ctr_{key}_{name}"] = ctr_table.at[model, col]
if have_real:
    headline["real_images"] = len(rs)
if have_images:
    for name, key in (("VLM", "vlm"), ("U-Net", "unet"), ("mean-mask baseline", "baseline")):
        for s in scored:
            headline[f"real_{key}_dice_{s}"] = real_summaries[name].at[s, "dice"]
    for m in intensity.index:
        headline[f"intensity_gap_{m}"] = intensity.at[m, "value"]
write_metrics(run_dir, "06_real_radiographs", headline)
pd.Series(headline, name="value").to_frame()

# %% [markdown]
# ## What this shows, and what it cannot
#
# Without real images (the smoke build) the chapter measures two things. The *shape
# gap*: how far chapter 1's projected lung fields lie from real annotations, statistic
# by statistic, with intervals — chapter 1 calibrated the cohort's framing on some of
# these, so position and mean-mask agreement are close by construction, while the
# area (the single CT's lungs are smaller in the film than most real patients') and
# the shape statistics it was not calibrated on say where one patient's anatomy
# differs from a population's. And the *cardiothoracic ratio* read from masks: how
# well each model's masks support a clinical measurement on held-out DRRs. Both come
# from one patient's CT; the projected side of every comparison is that patient in
# many poses, so the gap mixes the difference between DRRs and films with the
# difference between one chest and many.
#
# With a real set the chapter scores both models on real films, measures the
# intensity and texture gap, applies chapter 5's appearance shifts to real films and
# draws the failures. What it cannot do in any profile is turn a gap into a cause: a
# large intensity divergence says DRRs look different, not that this is why a model
# fails on a film. The failures section puts the worst cases side by side with their
# shape statistics so that a reader can look for what they share.
