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
# # The paper's claims, measured
#
# The book ends where a reader of the paper wants it to: each claim of the paper, and
# each objection of its referee, as a statement that a measured interval can decide.
#
# * **C1** the VLM is comparable to a U-Net in distribution (chapter 4);
# * **C2** it is more robust than the U-Net under geometric shift (chapter 5);
# * **C3** anatomy pretraining makes it a better few-shot learner (chapter 7);
# * **C4** larger models help, **C5** higher resolution helps, **C6** fine-tuning the
#   vision encoder changes little (chapter 8's ablations);
# * **R1** the referee asks how far synthetic films are from real ones (chapter 6);
# * **R2** the referee asks for failure modes: we test whether the VLM keeps its accuracy
#   under every shift of chapter 5, and name the shift under which it keeps least.
#
# **How a verdict is made.** Each claim is a test of its measure's 95% interval, never
# of the point value: a claim that something is larger (C3, C4, C5) is *supported* when
# the interval lies above zero and *contradicted* when it lies below; C2 the other way
# round; a claim that two things are comparable or that a change does little (C1, C6) is
# an equivalence test: supported when the whole interval lies within a stated margin,
# contradicted when it lies wholly outside; R1 and R2 compare the interval with a stated
# level. Anything else is *not decided at this scale*. The margins and levels are this
# chapter's parameters, shown beside each verdict.
#
# **Where the numbers come from.** This run's chapters (`metrics.json` of chapters 4 to
# 8, labelled with the run's profile), recorded runs of those chapters on a GPU
# (`records/<name>/record.json`, written by `chexanatomy record`), and chapter 8's
# ablation effects (recorded sweeps and this run's).

# %% tags=["parameters"]
run_dir = "runs/default"  # run directory holding every stage's folder
seed = 0  # unused (nothing is resampled here); kept for the profile's common seed
records_dir = "records"  # recorded runs (relative to the project root)
c1_margin = 0.05  # C1: |VLM − U-Net| lung-field Dice within which the two are comparable
c6_margin = 0.02  # C6: |trained − frozen| lung-field Dice within which the change is "little"
r1_gap = 1.0  # R1: largest shape gap (standard deviations of the real set) at which films count as realistic
r2_keep = 0.8  # R2: share of its unshifted Dice the VLM must keep under every shift
c3_k = 4  # C3: labelled examples at which sample efficiency is read

# %%
from pathlib import Path

import json

import matplotlib.pyplot as plt
import pandas as pd

from chexanatomy_lib.evaluation.claims import claims_table, evidence_from_effects, evidence_from_metrics, paper_claims
from chexanatomy_lib.evaluation.figures import plot_claims
from chexanatomy_lib.pipeline import PROJECT_ROOT, read_metrics, stage_dir, write_metrics
from chexanatomy_lib.records import load_records

CHAPTERS = ("04_unet_baseline", "05_shift", "06_real_radiographs", "07_few_shot")
out = stage_dir(run_dir, "09_claims")
records = Path(records_dir) if Path(records_dir).is_absolute() else PROJECT_ROOT / records_dir
claims = paper_claims(c1_margin=c1_margin, c6_margin=c6_margin, r1_gap=r1_gap, r2_keep=r2_keep, c3_k=c3_k)


def profile_of(stage: str) -> str:
    prov = stage_dir(run_dir, stage, create=False) / "provenance.json"
    return json.loads(prov.read_text()).get("profile", "?") if prov.is_file() else "?"


this_run = {s: read_metrics(run_dir, s) for s in CHAPTERS}
profile = profile_of("04_unet_baseline")
evidence = evidence_from_metrics(this_run, f"this run ({profile} profile)", c3_k=c3_k)
recorded = [r for r in load_records(records) if r.get("kind") == "stage_run" and r.get("stage") in CHAPTERS]
for r in recorded:
    evidence += evidence_from_metrics({r["stage"]: r["metrics"]},
                                      f"recorded {r['device']} run {r['name']} ({str(r['revision'])[:7]})",
                                      c3_k=c3_k)
effects_path = stage_dir(run_dir, "08_ablations", create=False) / "effects.csv"
try:
    effects = pd.read_csv(effects_path)
except (FileNotFoundError, pd.errors.EmptyDataError):  # chapter 8 found no sweep
    effects = None
evidence += evidence_from_effects(effects)
table = claims_table(evidence, claims)
table.to_csv(out / "claims.csv", index=False)
print(f"{len(evidence)} measurements: this run's chapters ({profile} profile), {len(recorded)} recorded chapter "
      f"runs, {0 if effects is None else effects['sweep'].nunique()} ablation sweeps")

# %% [markdown]
# ## The table

# %%
(table[["claim", "statement", "measure", "interval", "rule", "from", "detail", "verdict"]]
 .rename(columns={"interval": "value [95% CI]", "rule": "supported if"})
 .style.apply(lambda col: [{"supported": "background-color: #dff0d8", "contradicted": "background-color: #f2dede"}
                           .get(v, "") for v in col], subset=["verdict"])
 .hide(axis="index"))

# %% [markdown]
# One row per measurement of a claim: what is measured, its value with the 95%
# interval, the rule that would support the claim, where the number comes from, and the
# verdict computed from the interval. A claim measured by several sources (this run, a
# recorded GPU run, a recorded sweep) has one row per source; a claim nothing measured
# says so.

# %%
fig = plot_claims(table, {c.id: (c.test, c.level) for c in claims.values()})
plt.show()

# %% [markdown]
# Each panel is one claim: every measurement as its value and 95% interval (green:
# supported, red: contradicted, grey: not decided), over the shaded region in which it
# would support the claim; dotted lines mark the level or the margin.

# %%
headline = {}
for verdict in ("supported", "contradicted", "not decided", "not measured"):
    headline[f"n_{verdict.replace(' ', '_')}"] = int((table["verdict"] == verdict).sum())
for _, r in table[table["from"].str.startswith("this run")].iterrows():
    key = f"{r['claim'].lower()}_{r['detail'].split(':')[0].replace(' ', '_')}" if r["claim"] == "C3" \
        else r["claim"].lower()
    headline[f"{key}_value"], headline[f"{key}_lo"], headline[f"{key}_hi"] = r["value"], r["lo"], r["hi"]
    headline[f"{key}_supported"] = float(r["verdict"] == "supported")
write_metrics(run_dir, "09_claims", headline)
pd.Series(headline, name="value").to_frame()

# %% [markdown]
# ## What each profile can decide
#
# * **smoke** (this book on 2 CPU cores): one patient's CT, tiny models trained from
#   scratch for minutes. Its verdicts are verdicts *about that run*: they show that each
#   claim is measurable and how, and they can contradict a claim only for these tiny
#   models. C1 compares a two-minute VLM with a U-Net given the same data; C2 and C3 rest
#   on ten to twenty test films of the same patient; C4 to C6 on recorded smoke sweeps of
#   random models; R1 compares one patient's projected lung fields with 435 real
#   annotations, so it measures the projection and framing, not a cohort.
# * **gpu** (one GPU for ten minutes, the same CT): a VLM trained a few hundred times
#   longer can be compared with the U-Net (C1) and under shift (C2); the data is still
#   one patient, so nothing carries to real radiographs.
# * **paper** (a GPU, CT-RATE-scale cohorts, PaliGemma 2 checkpoints, a real radiograph
#   set): the profile at which C1 to C6 are the paper's claims; R1 and R2 then measure the
#   gap to the user's real set and the failure modes of the paper's model.
#
# Recorded runs appear in the table with their device and revision; a verdict from a
# record is as good as the run it records, and the record says which run that was.
