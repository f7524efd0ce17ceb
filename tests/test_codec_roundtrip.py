"""Chapter 2's codebook, as the smoke book trained it: round-trip quality and loading."""

import json

import numpy as np
import pandas as pd
import pytest

from chexanatomy_lib.codec import MaskCodec, MaskVQVAE
from chexanatomy_lib.ct.dataset import ProjectedDataset


# Targets of the codec issue at 448 px (untruncated held-out masks): lungs and heart
# 0.97, single ribs and clavicles 0.90. Measured 2026-11-23 on an idle 2-core machine
# (4 re-rendered test images, 270 masks per size, anti-aliased masks, 1,500 steps) with
#   .venv/bin/chexanatomy run notebooks/02_token_codec.py --profile smoke
# lungs 0.976, heart group 0.973 (heart 0.964, left atrial appendage 0.981), ribs 0.903
# (95% CI 0.896-0.910); clavicles: none untruncated in the sample (no score). The
# floors sit a little under those, so that a change of numerics on another CPU does
# not fail the suite while a real regression does; the book's `met` column reports
# the targets themselves. With 2 re-rendered images (the smoke default since 2026-11-29,
# for chapter 2's time budget): lungs 0.971, heart 0.977, ribs 0.925.
# Targets since the speed issue: lungs 0.98, the heart (group and structure alone)
# 0.97, single ribs 0.93. With code search (4 entries per cell, 2 passes) on the same
# 2 images (2026-11-29, the codebook of the smoke book): lungs 0.976, heart 0.977,
# ribs 0.936, against 0.972, 0.973, 0.923 for the nearest entries.
TARGETS = {"lungs": 0.98, "heart": 0.97, "ribs": 0.93, "clavicles": 0.90}
SMOKE_FLOORS = {"lungs": 0.97, "heart": 0.965, "ribs": 0.895}
SEARCH_FLOORS = {"lungs": 0.972, "heart": 0.97, "ribs": 0.925}


def test_our_codec_roundtrip_dice_at_448(smoke_run):
    out = smoke_run.run_dir / "02_token_codec"
    table = pd.read_csv(out / "roundtrip_by_size.csv")
    assert set(table["size"]) == {224, 448, 896}
    # the table scores masks rendered again from the CT at each size, the same masks at every size
    assert (table["source"] == "re-rendered").all()
    n = table[table["route"] == "ours"].pivot(index="group", columns="size", values="n")
    assert (n.nunique(axis=1) == 1).all() and n[448].sum() > 0
    ours = table[(table["route"] == "ours") & (table["size"] == 448)].set_index("group")["dice"]
    box = table[(table["route"] == "box only") & (table["size"] == 448)].set_index("group")["dice"]
    template = table[(table["route"] == "mean template") & (table["size"] == 448)].set_index("group")["dice"]
    for g, target in TARGETS.items():
        if g not in ours:  # clavicles: truncated (left out) in most smoke images
            continue
        assert ours[g] >= min(target, SMOKE_FLOORS.get(g, target)), (g, ours[g])
    # the aligned crop beats big_vision's tight crop on ribs (the same codebook), and
    # the crop alone (no VQ-VAE) bounds the codec from above
    policies = pd.read_csv(out / "crop_policies.csv", index_col=0)
    aligned, tight = (policies.index[policies.index.str.startswith(p)][0] for p in ("aligned box, antialiased",
                                                                                     "tight box, antialiased"))
    assert policies.loc[aligned, "ribs"] > policies.loc[tight, "ribs"]
    ceiling = policies.loc[policies.index.str.contains("no VQ-VAE")].iloc[0]
    assert (ceiling[["lungs", "heart", "ribs"]] >= policies.loc[aligned, ["lungs", "heart", "ribs"]]).all()
    # far above what the location tokens alone, or with an average shape, give
    assert (ours["ribs"] - box["ribs"]) > 0.3 and (ours["ribs"] - template["ribs"]) > 0.3
    assert ours["lungs"] > template["lungs"] and ours["heart"] > template["heart"]
    # the headline metrics are the 448 px column of this table
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["roundtrip_masks_rerendered"] == 1.0
    for g in ("lungs", "heart", "ribs"):
        assert metrics[f"roundtrip_dice_448_{g}"] == pytest.approx(ours[g])
    targets = pd.read_csv(out / "targets_448.csv", index_col=0)
    assert targets.loc["ribs", "met"] == (ours["ribs"] >= TARGETS["ribs"])
    # code search: the same masks, the same codebook, codes the decoder chose
    searched = targets["ours, code search"]
    for g, floor in SEARCH_FLOORS.items():
        assert searched[g] >= floor, (g, searched[g])
        assert metrics[f"roundtrip_dice_448_search_{g}"] == pytest.approx(searched[g])
    assert searched["ribs"] > ours["ribs"] + 0.005
    assert targets.loc["ribs", "met with code search"] == (searched["ribs"] >= TARGETS["ribs"])
    heart_alone = targets.index[targets.index.str.startswith("heart (")][0]
    assert targets.loc[heart_alone, "ours"] == pytest.approx(metrics["roundtrip_dice_448_structure_heart"])
    # the heart group is reported by structure too; its mean lies between theirs
    parts = [metrics[f"roundtrip_dice_448_structure_{n}"] for n in ("heart", "atrial_appendage_left")]
    assert min(parts) <= ours["heart"] <= max(parts)


def test_saved_codebook_loads_and_reproduces_its_tokens(smoke_run):
    out = smoke_run.run_dir / "02_token_codec"
    codec = MaskCodec.ours(out / "vqvae")
    record = MaskVQVAE.training_record(out / "vqvae")
    assert record["codebook_used"] > 16 and record["n_train_crops"] > 0
    # the codec encodes with the crop policy its codebook was trained on
    assert (codec.crop, codec.resize) == (record["crop"], record["resize"])
    ds = ProjectedDataset(smoke_run.run_dir / "01_ct_projection" / "dataset")
    i = int(ds.split_indices("test")[0])
    masks = ds.masks_for([i], ["heart"])[0]
    boxes, codes = codec.encode(masks)
    again = MaskCodec.ours(out / "vqvae").encode(masks)
    np.testing.assert_array_equal(codes, again[1])
    assert codes.min() >= 0 and codes.max() < 128
