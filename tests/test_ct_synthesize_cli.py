"""``chexanatomy synthesize --shard i/n`` and ``merge-shards``: shards rendered from a
profile's chapter-1 parameters merge into the dataset the chapter would render, and
the chapter accepts such a dataset only when its parameters match."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from chexanatomy_lib.cli import main, parse_shard
from chexanatomy_lib.ct.dataset import ProjectedDataset
from chexanatomy_lib.ct.errors import CTInputError
from chexanatomy_lib.ct.manifest import load_manifest
from chexanatomy_lib.ct.synthesis import synthesis_arguments, synthesize_dataset, use_rendered_dataset
from chexanatomy_lib.pipeline import STAGES
from chexanatomy_lib.runner import load_profile, stage_parameters
from ct_phantoms import make_phantom_case

TINY = {"image_size": 40, "field_mm": 260.0, "n_copies": 3, "poses_per_copy": 1, "views": ["pa"],
        "translation_mm": [10.0, 10.0, 10.0], "sod_range_mm": [1500.0, 1700.0], "n_boot": 10, "device": "cpu"}


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ct, lab = make_phantom_case(root, (40, 40, 32), name="p")
    manifest = root / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"name": "phantom", "cases": [
        {"case_id": "p", "ct": str(ct), "labels": str(lab)}]}))
    prof = root / "tiny.yaml"
    prof.write_text(yaml.safe_dump({"name": "tiny", "run_dir": str(root / "runs"), "common": {"seed": 3},
                                    "stages": {"01_ct_projection": {**TINY, "manifest": str(manifest)}}}))
    return prof


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "a/b", "1", "1/2/3"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad)


def test_cli_shards_merge_into_the_chapters_dataset(profile, tmp_path, capsys):
    for i in range(2):
        assert main(["synthesize", "--profile", str(profile), "--out", str(tmp_path / f"s{i}"),
                     "--shard", f"{i}/2"]) == 0
    assert main(["merge-shards", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "all")]) == 0
    merged = ProjectedDataset(tmp_path / "all")
    assert "3 images from 2 shards" in capsys.readouterr().out
    # what the chapter renders itself from the same parameters
    params = stage_parameters(STAGES["01_ct_projection"], load_profile(profile))
    args = synthesis_arguments(params)
    assert args["settings"].mask_smoothing_mm == params["mask_smoothing_mm"]
    assert synthesis_arguments({**params, "mask_smoothing_mm": 1.5})["settings"].mask_smoothing_mm == 1.5
    older = {k: v for k, v in params.items() if k != "mask_smoothing_mm"}  # parameters from before the setting
    assert synthesis_arguments(older)["settings"].mask_smoothing_mm == 0.0
    whole = ProjectedDataset(synthesize_dataset(load_manifest(params["manifest"]), tmp_path / "whole",
                                                progress=False, **args))
    a, b = whole.index.set_index("image_id"), merged.index.set_index("image_id")
    assert sorted(a.index) == sorted(b.index)
    for image_id in a.index:
        i, j = int(np.flatnonzero(whole.index["image_id"] == image_id)[0]), int(np.flatnonzero(merged.index["image_id"] == image_id)[0])
        assert np.array_equal(whole.images[i], merged.images[j])
        assert np.array_equal(whole.masks_for([i]), merged.masks_for([j]))
        assert a.at[image_id, "split"] == b.at[image_id, "split"]
    # the chapter takes the merged dataset in place of rendering, as a link
    link = use_rendered_dataset(tmp_path / "all", tmp_path / "run" / "dataset", args)
    assert link.is_symlink() and len(ProjectedDataset(link)) == len(merged)
    # ... but not one rendered with other parameters, nor a single shard
    with pytest.raises(CTInputError, match="render_settings.image_size"):
        use_rendered_dataset(tmp_path / "all", tmp_path / "run2" / "dataset", {**args, "image_size": 64})
    with pytest.raises(CTInputError, match="cohort.n_copies"):
        use_rendered_dataset(tmp_path / "all", tmp_path / "run2" / "dataset", {**args, "n_copies": 4})
    with pytest.raises(CTInputError, match="shard 0/2 only; merge"):
        use_rendered_dataset(tmp_path / "s0", tmp_path / "run2" / "dataset", args)


def test_cli_rejects_a_bad_shard_and_an_unknown_parameter(profile, tmp_path, capsys):
    assert main(["synthesize", "--profile", str(profile), "--out", str(tmp_path / "x"), "--shard", "2/2"]) == 2
    assert "0 <= i < n" in capsys.readouterr().err
    assert main(["synthesize", "--profile", str(profile), "--out", str(tmp_path / "x"), "-p", "image_sise=32"]) == 2
    assert "image_sise" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_local_executor_renders_the_shards_as_jobs_and_merges_them(profile, tmp_path, capsys):
    """chexanatomy synthesize --executor local: two submitit jobs, merged, equal to the
    unsharded dataset (the SLURM executor submits the same jobs to a cluster)."""
    assert main(["synthesize", "--profile", str(profile), "--out", str(tmp_path / "jobs"), "--executor", "local",
                 "--shards", "2", "--cpus", "1", "--mem", "2", "--time", "10"]) == 0
    assert "2 local jobs, merged" in capsys.readouterr().out
    merged = ProjectedDataset(tmp_path / "jobs")
    assert not (tmp_path / "jobs.shards").exists()  # the shard folders are removed once merged
    params = stage_parameters(STAGES["01_ct_projection"], load_profile(profile))
    whole = ProjectedDataset(synthesize_dataset(load_manifest(params["manifest"]), tmp_path / "whole",
                                                progress=False, **synthesis_arguments(params)))
    assert sorted(whole.index["image_id"]) == sorted(merged.index["image_id"])
    order = [int(np.flatnonzero(merged.index["image_id"] == i)[0]) for i in whole.index["image_id"]]
    assert np.array_equal(np.asarray(whole.images), np.asarray(merged.images)[order])
    assert np.array_equal(whole.masks_for(range(len(whole))), merged.masks_for(order))
    # a bad request is one line, before any job starts
    assert main(["synthesize", "--profile", str(profile), "--out", str(tmp_path / "x"), "--executor", "local",
                 "--shard", "0/2"]) == 2
    assert "use one" in capsys.readouterr().err
