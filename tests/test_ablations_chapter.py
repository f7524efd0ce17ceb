"""Chapters 8 and 9 in the smoke book, and one ablation sweep end to end at micro scale:
cells executed, metrics and per-image scores gathered, the sweep recorded, chapter 8
rendering the record."""

from __future__ import annotations

import json

import pandas as pd
import yaml

from chexanatomy_lib.pipeline import read_metrics


def test_micro_sweep_is_gathered_recorded_and_rendered(smoke_run, tmp_path):
    from chexanatomy_lib.records import load_sweep_records, record_sweep
    from chexanatomy_lib.runner import run_stage
    from chexanatomy_lib.sweep import run_sweep, sweep_directory

    run = tmp_path / "run"
    run.mkdir()
    for stage in ("01_ct_projection", "02_token_codec"):  # the sweep's upstream, reused from the smoke book
        (run / stage).symlink_to(smoke_run.run_dir / stage, target_is_directory=True)
    sweep = tmp_path / "ablation_resolution.yaml"  # named like the real one, so chapter 8 reads it as C5's sweep
    sweep.write_text(yaml.safe_dump({
        "notebook": "notebooks/03_vlm_finetune.py", "per_image": "test_scores.csv",
        "metrics": ["dice/lung_field_left", "train_seconds"], "seeds": [0],
        "variants": {"smoke": {"profile": "smoke",
                               "base": {"steps": 2, "warmup_steps": 1, "save_every": 2, "train_control": False,
                                        "augment": 0.0, "n_boot": 50, "n_overlay": 2},
                               "grid": {"image_size": [64, 96]}}},
    }))
    table = run_sweep(sweep, run_dir=run, log=lambda m: None)
    assert list(table["image_size"]) == [64, 96] and table["dice/lung_field_left"].between(0, 1).all()
    sdir = sweep_directory(sweep, run_dir=run)
    assert sdir == run / "sweeps" / "ablation_resolution"
    for cell in ("image_size=64,seed=0", "image_size=96,seed=0"):
        assert (sdir / cell / "03_vlm_finetune" / "metrics.json").is_file(), cell
    per_image = pd.read_csv(sdir / "per_image.csv")
    assert set(per_image["image_size"]) == {64, 96} and set(per_image["method"]) == {"vlm", "baseline"}
    assert per_image.groupby("image_size")["image_id"].nunique().nunique() == 1  # the same held-out images

    records = tmp_path / "records"
    rec = record_sweep(sdir, records_dir=records)
    assert load_sweep_records(records) == {"ablation_resolution": rec}
    meta = json.loads((rec / "sweep.json").read_text())
    assert meta["varied"] == ["image_size"] and meta["revision"] and meta["device"]["cpu_count"] >= 1
    assert {p.name for p in rec.iterdir()} == {"sweep.json", "results.csv", "summary.csv", "per_image.csv"}

    (result,) = run_stage("notebooks/08_ablations.py", "smoke", run_dir=run, progress=False, log=lambda m: None,
                          overrides={"records_dir": str(records), "sweeps": ["ablation_resolution"], "n_boot": 50})
    m = read_metrics(run, "08_ablations")
    assert m["sweeps_found"] == 1  # the record and the run it was made from are one sweep
    assert m["ablation_resolution_lung_fields_difference_lo"] <= m["ablation_resolution_lung_fields_difference"] \
        <= m["ablation_resolution_lung_fields_difference_hi"]
    effects = pd.read_csv(run / "08_ablations" / "effects.csv")
    assert set(effects["claim"]) == {"C5"} and effects["contrast"].iloc[0] == "image_size: 96 − 64"
    executed = json.loads((run / "08_ablations" / "08_ablations.ipynb").read_text())
    outputs = [o for c in executed["cells"] for o in c.get("outputs", [])]
    sources = next("".join(o["data"]["text/plain"]) for o in outputs if "text/plain" in o.get("data", {}))
    assert "ablation_resolution" in sources and "recorded" in sources  # where the numbers come from
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # the curve and the effects


def test_book_chapters_8_and_9_read_the_recorded_sweeps_and_decide_every_claim(smoke_run):
    from chexanatomy_lib.evaluation.claims import CLAIM_VERDICTS, paper_claims

    m8 = read_metrics(smoke_run.run_dir, "08_ablations")
    assert m8["sweeps_found"] >= 3  # the committed records of make sweeps
    effects = pd.read_csv(smoke_run.run_dir / "08_ablations" / "effects.csv")
    assert {"C4", "C5", "C6"} <= set(effects["claim"])
    claims = pd.read_csv(smoke_run.run_dir / "09_claims" / "claims.csv")
    assert set(claims["claim"]) == set(paper_claims())
    assert set(claims["verdict"]) <= set(CLAIM_VERDICTS)
    measured = claims[claims["verdict"] != "not measured"]
    assert set(measured["claim"]) == set(paper_claims())  # the smoke book measures every claim
    assert ((measured["lo"] <= measured["value"]) & (measured["value"] <= measured["hi"])).all()
    m9 = read_metrics(smoke_run.run_dir, "09_claims")
    assert sum(m9[f"n_{v.replace(' ', '_')}"] for v in CLAIM_VERDICTS) == len(claims)
