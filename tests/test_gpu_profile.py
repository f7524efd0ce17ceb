"""The gpu profile against every notebook's parameters (no GPU needed), and recording a
whole run directory so that the chapters show it beside their own numbers."""

from __future__ import annotations

import base64
import json

import pytest
import yaml

from chexanatomy_lib import runner
from chexanatomy_lib.pipeline import STAGES
from chexanatomy_lib.records import RecordError, load_records, record_run, stage_records_table

# a 1x1 PNG
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_gpu_profile_sets_only_known_parameters_of_the_right_type(tmp_path):
    profile = runner.load_profile("gpu")
    assert profile.common["device"] == "cuda" and profile.run_dir.name == "gpu"
    for stage in STAGES.values():
        params = runner.stage_parameters(stage, profile)  # raises on an unknown key or a wrong type
        if "device" in params:
            assert params["device"] == "cuda", stage.name
    vlm = runner.stage_parameters(STAGES["03_vlm_finetune"], profile)
    assert vlm["model"] == "base" and vlm["mixed_precision"] == "bf16" and vlm["compile_layers"]
    films = runner.stage_parameters(STAGES["01_ct_projection"], profile)
    assert films["n_copies"] * films["poses_per_copy"] * len(films["views"]) >= 2000

    raw = yaml.safe_load(profile.path.read_text())
    typo = dict(raw, stages={**raw["stages"], "03_vlm_finetune": {**raw["stages"]["03_vlm_finetune"], "stpes": 10}})
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(typo))
    with pytest.raises(runner.ParameterError, match="unknown parameter 'stpes'"):
        runner.stage_parameters(STAGES["03_vlm_finetune"], runner.load_profile(tmp_path / "typo.yaml"))
    wrong = dict(raw, stages={**raw["stages"], "04_unet_baseline": {"epochs": "sixty"}})
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong))
    with pytest.raises(runner.ParameterError, match="epochs"):
        runner.stage_parameters(STAGES["04_unet_baseline"], runner.load_profile(tmp_path / "wrong.yaml"))


def _stage(run_dir, name, metrics, status="ok"):
    d = run_dir / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    (d / "provenance.json").write_text(json.dumps({
        "stage": name, "status": status, "profile": "gpu", "params": {"seed": 0},
        "device": {"cpu": "test cpu", "cuda_device": "NVIDIA H200"}, "git": {"revision": "0123456789abcdef"},
        "command": "chexanatomy book --profile gpu", "finished": "2026-11-29T12:00:00+00:00", "wall_time_s": 60.0}))
    png = base64.b64encode(PNG).decode()
    (d / f"{name}.ipynb").write_text(json.dumps({"cells": [{"outputs": [{"data": {"image/png": png}}]},
                                                           {"outputs": [{"data": {"image/png": png}}]}]}))
    return d


def test_a_run_directory_is_recorded_chapter_by_chapter(tmp_path):
    run, records = tmp_path / "runs" / "gpu", tmp_path / "records"
    _stage(run, "04_unet_baseline", {"unet_dice_lung_field": 0.93, "vlm_dice_lung_field": 0.90})
    _stage(run, "05_shift", {"n_images": 40.0})
    out = record_run(run, "gpu", figures=1, records_dir=records)
    assert [p.name for p in out] == ["gpu.04_unet_baseline", "gpu.05_shift"]
    assert (records / "gpu.04_unet_baseline" / "figure_00.png").read_bytes() == PNG
    assert not (records / "gpu.04_unet_baseline" / "figure_01.png").exists()  # figures=1
    recs = load_records(records)
    assert {r["stage"] for r in recs} == {"04_unet_baseline", "05_shift"} and recs[0]["device"] == "NVIDIA H200"

    table = stage_records_table("04_unet_baseline", ["unet_dice_lung_field", "vlm_dice_lung_field"],
                                current={"unet_dice_lung_field": 0.8, "vlm_dice_lung_field": 0.6}, records=recs)
    assert list(table.index) == ["this run", "recorded: gpu.04_unet_baseline on NVIDIA H200, 2026-11-29, 0123456"]
    assert table.loc[table.index[1], "vlm_dice_lung_field"] == 0.90

    with pytest.raises(RecordError, match="exists"):  # a record is not overwritten by accident ...
        record_run(run, "gpu", records_dir=records)
    record_run(run, "gpu", replace=True, records_dir=records)  # ... only when asked
    _stage(run, "07_few_shot", {}, status="failed")
    with pytest.raises(RecordError, match="did not finish: 07_few_shot"):
        record_run(run, "again", records_dir=records)
    assert not (records / "again.04_unet_baseline").exists()  # nothing written
