"""Chapter 9's verdicts and chapter 8's ablation statistics, on inputs whose answers are known."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from chexanatomy_lib.evaluation.ablations import (
    SweepReadError, ablation_curve, ablation_difference, find_sweeps, read_sweep, sweep_effects,
)
from chexanatomy_lib.evaluation.claims import (
    Claim, claim_verdict, claims_table, evidence_from_effects, evidence_from_metrics, paper_claims,
)
from chexanatomy_lib.evaluation.metrics import difference_verdict


@pytest.mark.parametrize("lo, hi, test, level, expected", [
    (0.01, 0.05, "above", 0.0, "supported"),
    (-0.05, -0.01, "above", 0.0, "contradicted"),
    (-0.01, 0.05, "above", 0.0, "not decided"),
    (-0.05, -0.01, "below", 0.0, "supported"),
    (0.2, 0.3, "below", 0.0, "contradicted"),
    (-0.01, 0.01, "within", 0.02, "supported"),
    (0.03, 0.09, "within", 0.02, "contradicted"),
    (-0.09, -0.03, "within", 0.02, "contradicted"),
    (0.01, 0.05, "within", 0.02, "not decided"),
    (0.7, 0.9, "above", 0.8, "not decided"),
    (float("nan"), 0.1, "above", 0.0, "not measured"),
    (None, None, "within", 0.05, "not measured"),
])
def test_verdict_is_read_from_the_interval(lo, hi, test, level, expected):
    assert claim_verdict(lo, hi, test, level) == expected


def test_bad_claims_and_intervals_are_refused():
    with pytest.raises(ValueError, match="test must be one of"):
        Claim("X", "s", "m", "bigger", 0.0)
    with pytest.raises(ValueError, match="margin must be positive"):
        Claim("X", "s", "m", "within", 0.0)
    with pytest.raises(ValueError, match="low end"):
        claim_verdict(0.3, 0.1, "above", 0.0)
    assert difference_verdict(0.1, 0.2) == "A better" and difference_verdict(np.nan, 0.2) == "n/a"


def _chapter_metrics(unet_minus_vlm=(0.10, 0.07, 0.13)):
    d, lo, hi = unet_minus_vlm
    return {
        "04_unet_baseline": {"lung_fields_unet_minus_vlm_dice_difference": d,
                             "lung_fields_unet_minus_vlm_dice_difference_lo": lo,
                             "lung_fields_unet_minus_vlm_dice_difference_hi": hi},
        "05_shift": {"c2_geometric_vlm_minus_unet_drop_difference": -0.01,
                     "c2_geometric_vlm_minus_unet_drop_difference_lo": -0.03,
                     "c2_geometric_vlm_minus_unet_drop_difference_hi": 0.004, "n_images": 10.0,
                     **{f"shift_{a}_vlm_lung_fields_robustness{s}": v + dv
                        for a, v in (("oblique", 0.7), ("invert", 0.95), ("shift_2d", 0.35))
                        for s, dv in (("", 0.0), ("_lo", -0.05), ("_hi", 0.05))}},
        "06_real_radiographs": {f"shape_gap_lung_field_left_{st}_standardised{s}": v + dv
                                for st, v in (("convexity", 7.6), ("area_fraction", 1.3))
                                for s, dv in (("", 0.0), ("_lo", -0.4), ("_hi", 0.4))},
        "07_few_shot": {"c3_trachea_k4_difference": 0.43, "c3_trachea_k4_difference_lo": 0.33,
                        "c3_trachea_k4_difference_hi": 0.53, "c3_trachea_k1_difference": -0.5,
                        "c3_trachea_k1_difference_lo": -0.6, "c3_trachea_k1_difference_hi": -0.4},
    }


def test_claims_table_from_chapter_metrics():
    claims = paper_claims()
    table = claims_table(evidence_from_metrics(_chapter_metrics(), "this run (smoke profile)"), claims)
    v = table.set_index("claim")["verdict"]
    assert v["C1"] == "contradicted"  # VLM − U-Net = −0.10 [−0.13, −0.07]: outside ±0.05
    c1 = table.set_index("claim").loc["C1"]
    assert (c1["value"], c1["lo"], c1["hi"]) == pytest.approx((-0.10, -0.13, -0.07))
    assert v["C2"] == "not decided"
    assert v["C3"] == "supported"  # read at k = 4, not k = 1
    r2 = table.set_index("claim").loc["R2"]
    assert r2["verdict"] == "contradicted" and "shift 2d" in r2["detail"]  # the worst shift is named
    r1 = table.set_index("claim").loc["R1"]
    assert r1["verdict"] == "contradicted" and "convexity" in r1["detail"]
    for cid in ("C4", "C5", "C6"):  # nothing measured them: one row each that says so
        assert v[cid] == "not measured"
    assert list(dict.fromkeys(table["claim"])) == list(claims)


def test_changing_one_input_metric_changes_its_claims_verdict():
    claims = paper_claims(c1_margin=0.05)
    before = claims_table(evidence_from_metrics(_chapter_metrics((0.10, 0.07, 0.13)), "run"), claims)
    after = claims_table(evidence_from_metrics(_chapter_metrics((0.01, -0.02, 0.03)), "run"), claims)
    b, a = before.set_index("claim")["verdict"], after.set_index("claim")["verdict"]
    assert b["C1"] == "contradicted" and a["C1"] == "supported"
    assert (b.drop("C1") == a.drop("C1")).all()  # the other claims are untouched
    # and the margin is a parameter, not a constant: a tighter one undecides the same interval
    tight = claims_table(evidence_from_metrics(_chapter_metrics((0.01, -0.02, 0.03)), "run"),
                         paper_claims(c1_margin=0.025))
    assert tight.set_index("claim").at["C1", "verdict"] == "not decided"


def _fake_sweep(folder, values, effect, key="model", n_images=12, seeds=(0, 1), noise=0.01, name=None):
    """A finished sweep folder: every image scores 0.6 + effect[value] (+ seed noise)."""
    rng = np.random.default_rng(0)
    rows = []
    for v in values:
        for s in seeds:
            for i in range(n_images):
                for st in ("lung_field_left", "lung_field_right", "heart"):
                    base = 0.6 + 0.01 * (i % 5)
                    rows.append({key: v, "seed": s, "cell": f"{key}={v},seed={s}", "method": "vlm",
                                 "image_id": f"img{i:02d}", "structure": st,
                                 "dice": base + effect[v] + noise * rng.standard_normal()})
                    rows.append({key: v, "seed": s, "cell": f"{key}={v},seed={s}", "method": "baseline",
                                 "image_id": f"img{i:02d}", "structure": st, "dice": 0.5})
    folder.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "per_image.csv", index=False)
    (folder / "sweep.json").write_text(json.dumps({
        "name": name or folder.name, "varied": [key], "cells": [{key: v} for v in values], "seeds": list(seeds),
        "profile": "smoke", "device": {"cpu": "test cpu"}, "revision": "abcdef0123", "date": "2026-11-29T00:00:00",
        "wall_time_s": 60.0}))
    return folder


def test_ablation_curve_and_difference_find_a_known_effect(tmp_path):
    sw = read_sweep(_fake_sweep(tmp_path / "ablation_model_scale", ["tiny", "small", "base"],
                                {"tiny": 0.0, "small": 0.05, "base": 0.1}))
    assert sw.source.startswith("recorded 2026-11-29, abcdef0, test cpu")
    curve = ablation_curve(sw, ["lung fields", "heart"], n_boot=200)
    assert len(curve) == 6 and list(curve["value"][:3]) == ["tiny", "small", "base"]
    lf = curve[curve["structure"] == "lung fields"].set_index("value")
    assert lf.at["base", "dice"] - lf.at["tiny", "dice"] == pytest.approx(0.1, abs=0.01)
    assert (lf["dice_lo"] <= lf["dice"]).all() and (lf["dice"] <= lf["dice_hi"]).all()
    assert (lf["baseline"] == 0.5).all() and (lf["seeds"] == 2).all() and (lf["images"] == 12).all()
    d = ablation_difference(sw, "base", "tiny", "lung fields", n_boot=300)
    assert d["verdict"] == "A better" and d["difference_lo"] > 0.05 and d["images"] == 12
    assert ablation_difference(sw, "tiny", "tiny", "heart", n_boot=300)["verdict"] == "not distinguishable"


def test_sweep_effects_feed_claims_c4_to_c6(tmp_path):
    scale = read_sweep(_fake_sweep(tmp_path / "r" / "sweeps" / "ablation_model_scale", ["tiny", "small", "base"],
                                   {"tiny": 0.0, "small": 0.0, "base": 0.0}))
    vision = read_sweep(_fake_sweep(tmp_path / "r" / "sweeps" / "ablation_vision_finetuning", [True, False],
                                    {True: 0.0, False: 0.003}, key="finetune_vision", noise=0.001))
    effects = sweep_effects([scale, vision], ["lung fields"], n_boot=300)
    assert set(effects["claim"]) == {"C4", "C6"}
    assert effects.set_index("claim").at["C6", "contrast"] == "finetune_vision: True − False"
    table = claims_table(evidence_from_effects(effects), paper_claims(c6_margin=0.02)).set_index("claim")
    assert table.at["C4", "verdict"] == "not decided"  # no effect: the interval contains zero
    assert table.at["C6", "verdict"] == "supported"  # −0.003 with a tight interval, inside ±0.02
    assert table.at["C5", "verdict"] == "not measured"


def test_find_sweeps_reads_records_and_run_directory_once(tmp_path):
    rec = _fake_sweep(tmp_path / "records" / "sweeps" / "ablation_resolution", [64, 128], {64: 0.0, 128: 0.1},
                      key="image_size")
    run = tmp_path / "run"
    (run / "sweeps").mkdir(parents=True)
    import shutil

    shutil.copytree(rec, run / "sweeps" / "ablation_resolution")  # the run the record was made from
    found = find_sweeps(["ablation_resolution", "ablation_model_scale"], tmp_path / "records", run)
    assert len(found) == 1 and found[0].source.startswith("recorded")
    meta = json.loads((run / "sweeps" / "ablation_resolution" / "sweep.json").read_text())
    meta["date"] = "2026-11-30T00:00:00"  # a newer run of the same sweep is shown beside the record
    (run / "sweeps" / "ablation_resolution" / "sweep.json").write_text(json.dumps(meta))
    found = find_sweeps(["ablation_resolution"], tmp_path / "records", run)
    assert [f.source for f in found][1] == "this run's sweep"
    (tmp_path / "broken").mkdir()
    with pytest.raises(SweepReadError, match="broken: no sweep.json"):
        read_sweep(tmp_path / "broken")
