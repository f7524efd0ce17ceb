"""The runner: parameter checks, reuse, recomputation, provenance, sweeps, records."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from chexanatomy_lib import runner
from chexanatomy_lib.cli import main as cli_main
from chexanatomy_lib.pipeline import BOOK_ORDER, STAGES, read_metrics, stage_for_notebook
from chexanatomy_lib.records import RecordError, load_records, record_stage_run
from chexanatomy_lib.runner import ParameterError, StageFailedError, run_stage
from chexanatomy_lib.sweep import SweepError, load_sweep, run_sweep

TOY = '''\
# %% [markdown]
# # Toy stage

# %% tags=["parameters"]
run_dir = "runs/default"  # run directory
seed = 0  # random seed
n = 3  # an integer
rate = 0.5  # a float
name = "a"  # a string
data_file = None  # optional input file
limit: int | None = 4  # an optional integer
fail = False  # raise on purpose

# %%
import json
from pathlib import Path
from chexanatomy_lib.pipeline import stage_dir, write_metrics

out = stage_dir(run_dir, "{stem}")
if fail:
    raise ValueError("failing on purpose")
(out / "result.json").write_text(json.dumps({{"n": n, "rate": rate, "name": name, "seed": seed}}))
write_metrics(run_dir, "{stem}", {{"score": n * rate + seed}})
'''


def make_toy(tmp_path: Path, stem: str = "toy") -> Path:
    nb = tmp_path / f"{stem}.py"
    nb.write_text(TOY.format(stem=stem))
    return nb


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    p = tmp_path / "toyprofile.yaml"
    p.write_text(f"name: toy\nrun_dir: {tmp_path / 'runs'}\ncommon: {{seed: 0, not_declared_here: 1}}\nstages: {{}}\n")
    return p


# ---------------------------------------------------------------- parameters (no kernel)


def test_read_parameters_types(tmp_path):
    params = runner.read_parameters(make_toy(tmp_path))
    assert params == {"run_dir": "runs/default", "seed": 0, "n": 3, "rate": 0.5, "name": "a", "data_file": None, "fail": False, "limit": 4}


def test_parameters_cell_rules(tmp_path):
    nb = tmp_path / "bad.py"
    nb.write_text('# %% tags=["parameters"]\nseed = 0\nx = 1\n')
    with pytest.raises(ParameterError, match="run_dir"):
        runner.read_parameters(nb)
    nb.write_text('# %% tags=["parameters"]\nrun_dir = "r"\nseed = 0\nx = len("a")\n')
    with pytest.raises(ParameterError, match="'x'.*literal"):
        runner.read_parameters(nb)
    nb.write_text('# %% tags=["parameters"]\nrun_dir = "r"\nseed = 0\n\n# %% tags=["parameters"]\ny = 1\n')
    with pytest.raises(ParameterError, match="exactly one"):
        runner.read_parameters(nb)


def test_unknown_key_and_wrong_type_are_errors(tmp_path):
    defaults = runner.read_parameters(make_toy(tmp_path))
    with pytest.raises(ParameterError, match=r"unknown parameter 'rat'.*did you mean 'rate'"):
        runner.validate_parameters(defaults, {"rat": 1.0}, "toy.py")
    with pytest.raises(ParameterError, match=r"'n' expects int .* got str 'many'"):
        runner.validate_parameters(defaults, {"n": "many"}, "toy.py")
    with pytest.raises(ParameterError, match=r"'n' expects int"):
        runner.validate_parameters(defaults, {"n": 2.5}, "toy.py")
    with pytest.raises(ParameterError, match=r"'fail' expects bool"):
        runner.validate_parameters(defaults, {"fail": 1}, "toy.py")
    optional = runner.optional_parameters(make_toy(tmp_path))
    assert optional == {"limit"}
    assert runner.validate_parameters(defaults, {"limit": None}, "t", optional)["limit"] is None
    with pytest.raises(ParameterError, match=r"'n' expects int .* got None"):
        runner.validate_parameters(defaults, {"n": None}, "t", optional)
    ok = runner.validate_parameters(defaults, runner.parse_assignments(["rate=2", "n=7", "name=b", "data_file=x.txt"]), "t")
    assert ok["rate"] == 2.0 and isinstance(ok["rate"], float) and ok["n"] == 7 and ok["data_file"] == "x.txt"
    # YAML reads 1e-4 as a string: a float parameter still accepts it.
    assert runner.validate_parameters(defaults, runner.parse_assignments(["rate=1e-4"]), "t")["rate"] == 1e-4


def test_cli_reports_bad_parameter_in_one_line_before_any_kernel(tmp_path, profile, capsys):
    nb = make_toy(tmp_path)
    code = cli_main(["run", str(nb), "--profile", str(profile), "-p", "nn=4"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "unknown parameter 'nn'" in err and "did you mean 'n'" in err
    assert not (tmp_path / "runs").exists(), "nothing may run when a parameter is wrong"


def test_profile_errors(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("stages: {not_a_stage: {x: 1}}\n")
    with pytest.raises(runner.ProfileError, match="unknown stage 'not_a_stage'"):
        runner.load_profile(p)
    with pytest.raises(runner.ProfileError, match="no such profile"):
        runner.load_profile("does_not_exist")


# ---------------------------------------------------------------- execution (kernels)


def test_reuse_recompute_and_provenance(tmp_path, profile):
    nb = make_toy(tmp_path)
    rd = tmp_path / "runs"
    (first,) = run_stage(nb, profile, overrides={"n": 4}, log=lambda m: None, progress=False)
    assert not first.reused
    out = rd / "toy"
    assert json.loads((out / "result.json").read_text()) == {"n": 4, "rate": 0.5, "name": "a", "seed": 0}
    assert (out / "toy.ipynb").exists() and json.loads((out / "params.json").read_text())["n"] == 4

    prov = json.loads((out / "provenance.json").read_text())
    assert prov["status"] == "ok" and prov["stage"] == "toy" and prov["profile"] == "toy"
    assert prov["params"]["n"] == 4 and prov["params"]["run_dir"] == str(rd.resolve())
    assert "torch" in prov["versions"] and "python" in prov["versions"] and "papermill" in prov["versions"]
    assert prov["device"]["cpu_count"] >= 1 and "cpu" in prov["device"]
    assert set(prov["git"]) == {"revision", "dirty"}
    assert len(prov["inputs"]["notebook_sha256"]) == 64
    assert prov["wall_time_s"] > 0 and prov["started"] <= prov["finished"]
    assert "result.json" in prov["artifacts"] and "metrics.json" in prov["artifacts"]

    # Unchanged parameters and inputs: reused, nothing executed.
    stamp = (out / "result.json").stat().st_mtime_ns
    (again,) = run_stage(nb, profile, overrides={"n": 4}, log=lambda m: None, progress=False)
    assert again.reused and (out / "result.json").stat().st_mtime_ns == stamp
    assert again.provenance["key"] == prov["key"]

    # A parameter change recomputes, and stale artifacts of the old run are gone.
    (out / "stale.txt").write_text("from the old run")
    (changed,) = run_stage(nb, profile, overrides={"n": 5}, log=lambda m: None, progress=False)
    assert not changed.reused and changed.provenance["key"] != prov["key"]
    assert json.loads((out / "result.json").read_text())["n"] == 5
    assert not (out / "stale.txt").exists()
    assert read_metrics(rd, "toy") == {"score": 2.5}

    # An input file named by a parameter is hashed: new content, new run.
    data = tmp_path / "input.txt"
    data.write_text("one")
    (r1,) = run_stage(nb, profile, overrides={"n": 5, "data_file": str(data)}, log=lambda m: None, progress=False)
    assert not r1.reused and r1.provenance["inputs"]["files"] == {str(data): runner.prov.sha256_file(data)}
    data.write_text("two")
    (r2,) = run_stage(nb, profile, overrides={"n": 5, "data_file": str(data)}, log=lambda m: None, progress=False)
    assert not r2.reused


def test_failed_cell_is_reported_and_not_reused(tmp_path, profile):
    nb = make_toy(tmp_path)
    with pytest.raises(StageFailedError, match=r"stage toy failed in cell \d+ with ValueError: failing on purpose"):
        run_stage(nb, profile, overrides={"fail": True}, log=lambda m: None, progress=False)
    prov = json.loads((tmp_path / "runs" / "toy" / "provenance.json").read_text())
    assert prov["status"] == "failed" and "failing on purpose" in prov["error"]
    with pytest.raises(RecordError, match="did not finish"):
        record_stage_run(tmp_path / "runs" / "toy", "x", records_dir=tmp_path / "records")


def test_sweep_gathers_metrics_and_records(tmp_path, profile):
    nb = make_toy(tmp_path, "toysweep")
    sw = tmp_path / "sw.yaml"
    sw.write_text(
        f"notebook: {nb}\nprofile: {profile}\nbase: {{rate: 2.0}}\ngrid: {{n: [1, 2]}}\nseeds: [0, 10]\nmetrics: [score]\n"
    )
    plan = run_sweep(sw, run_dir=tmp_path / "runs", dry_run=True, log=lambda m: None)
    assert len(plan) == 4 and set(plan["n"]) == {1, 2} and set(plan["seed"]) == {0, 10}
    table = run_sweep(sw, run_dir=tmp_path / "runs", log=lambda m: None)
    assert sorted(zip(table["n"], table["seed"], table["score"])) == [(1, 0, 2.0), (1, 10, 12.0), (2, 0, 4.0), (2, 10, 14.0)]
    sdir = tmp_path / "runs" / "sweeps" / "sw"
    assert (sdir / "results.csv").exists() and (sdir / "summary.csv").exists()

    bad = tmp_path / "bad.yaml"
    bad.write_text(f"notebook: {nb}\nprofile: {profile}\ngrid: {{m: [1]}}\n")
    with pytest.raises(SweepError, match="unknown parameter 'm'"):
        load_sweep(bad)

    # A finished run can be recorded; the record carries metrics, device, command, revision.
    cell = next(p for p in sdir.iterdir() if p.is_dir())
    rec_dir = record_stage_run(cell / "toysweep", "toy_record", records_dir=tmp_path / "records", note="test")
    (rec,) = load_records(tmp_path / "records")
    assert rec["name"] == "toy_record" and rec["metrics"]["score"] > 0 and rec["device"]
    assert "revision" in rec and rec["params"]["rate"] == 2.0 and rec_dir.name == "toy_record"


# ---------------------------------------------------------------- the book's own stages


def test_every_stage_notebook_has_valid_parameters_under_every_profile():
    for name in BOOK_ORDER:
        assert stage_for_notebook(STAGES[name].notebook) is STAGES[name]
    for prof in sorted((Path(runner.PROFILE_DIR)).glob("*.yaml")):
        p = runner.load_profile(prof)
        for stage in STAGES.values():
            params = runner.stage_parameters(stage, p)
            assert "run_dir" in params and "seed" in params


def test_sweep_files_are_valid():
    files = sorted((runner.PROJECT_ROOT / "notebooks" / "sweeps").glob("*.yaml"))
    assert files, "no sweep files"
    for f in files:
        sw = load_sweep(f)
        assert sw.cells and sw.seeds and sw.metrics, f


def test_manifest_command_scans_case_folders(tmp_path, capsys):
    from ct_phantoms import make_phantom_case

    from chexanatomy_lib.ct.manifest import load_manifest

    for cid in ("p1", "p2"):
        (tmp_path / "cohort" / cid).mkdir(parents=True)
        ct, labels = make_phantom_case(tmp_path / "cohort" / cid)
        ct.rename(tmp_path / "cohort" / cid / "ct.nii.gz")
        labels.rename(tmp_path / "cohort" / cid / "labels.nii.gz")
    (tmp_path / "cohort" / "notes").mkdir()  # a folder without a CT is skipped
    out = tmp_path / "m.yaml"
    code = cli_main(["manifest", str(tmp_path / "cohort"), "--out", str(out), "--labels-name", "labels.nii.gz", "--checksums"])
    assert code == 0 and "2 cases (2 with labels)" in capsys.readouterr().out
    specs = load_manifest(out)
    assert [s.case_id for s in specs] == ["p1", "p2"] and all(s.labels is not None for s in specs)
    specs[0].verify()  # the recorded checksums match the files
    assert cli_main(["manifest", str(tmp_path / "cohort" / "notes"), "--out", str(tmp_path / "x.yaml")]) == 2


def test_benchmark_records_are_normalised_and_checked(tmp_path):
    bench = tmp_path / "records" / "benchmarks"
    bench.mkdir(parents=True)
    (bench / "b.json").write_text(json.dumps({
        "benchmark": "b", "date": "2026-01-01", "command": "python benchmarks/bench_b.py",
        "device": {"cpu": "X", "cpu_count": 2}, "git": {"revision": "abc", "dirty": False}, "ours": {"s": 1},
    }))
    (rec,) = load_records(tmp_path / "records")
    assert (rec["name"], rec["kind"], rec["device"], rec["revision"]) == ("b", "benchmark", "2 x X", "abc")
    (bench / "c.json").write_text(json.dumps({"benchmark": "c", "date": "2026-01-01", "machine": {"cpu": "X"}}))
    with pytest.raises(RecordError, match=r"c\.json: record lacks \['command', 'revision'\]"):
        load_records(tmp_path / "records")


def test_files_a_stage_reads_count_as_its_inputs(tmp_path):
    stage = STAGES["08_ablations"]  # reads <run_dir>/sweeps/*/sweep.json besides the records
    run = tmp_path / "run"
    (run / "sweeps" / "x").mkdir(parents=True)
    params = {"run_dir": str(run)}
    k0, _ = runner.stage_key(stage, params, {})
    (run / "sweeps" / "x" / "sweep.json").write_text("{}")
    k1, inputs = runner.stage_key(stage, params, {})
    assert k1 != k0 and "sweeps/x/sweep.json" in inputs["reads"]
    (run / "sweeps" / "x" / "sweep.json").write_text('{"date": "later"}')
    assert runner.stage_key(stage, params, {})[0] not in (k0, k1)
    # a stage that reads nothing keeps the key it had before stages could read files
    assert "reads" not in runner.stage_key(STAGES["02_token_codec"], params, {})[1]


SLEEPY = '''\
# %% tags=["parameters"]
run_dir = "runs/default"  # run directory
seed = 0  # random seed

# %%
import time
for _ in range(600):
    time.sleep(0.1)
'''


def test_ctrl_c_during_a_chapter_is_one_line_and_marks_it_interrupted(tmp_path):
    """What a user's Ctrl-C does (SIGINT to the whole foreground process group: the command
    and its kernel): one line saying the chapter was interrupted and how to resume it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    nb = tmp_path / "sleepy.py"
    nb.write_text(SLEEPY)
    cmd = [sys.executable, "-m", "chexanatomy_lib.cli", "run", str(nb), "--run-dir", str(tmp_path / "runs")]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), cwd=runner.PROJECT_ROOT)
    executed = tmp_path / "runs" / "sleepy" / "sleepy.ipynb"
    deadline = time.time() + 120
    while time.time() < deadline and not executed.exists():  # papermill writes it once the kernel runs
        time.sleep(0.5)
    time.sleep(3)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=120)
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and "Executing" not in x]
    assert p.returncode == 130, err
    assert lines == [f"chexanatomy run: chapter sleepy was interrupted; run the same command again to resume it "
                     f"from its last saved step (its folder: {tmp_path / 'runs' / 'sleepy'})"], err
    assert json.loads((tmp_path / "runs" / "sleepy" / "provenance.json").read_text())["status"] == "interrupted"


def test_an_interrupted_chapter_resumes_in_its_folder_and_a_linked_one_is_not_replaced(tmp_path, profile):
    nb = make_toy(tmp_path)
    (r,) = run_stage(nb, profile, log=lambda m: None, progress=False)
    prov = json.loads((r.directory / "provenance.json").read_text())
    (r.directory / "provenance.json").write_text(json.dumps({**prov, "status": "interrupted"}))
    (r.directory / "saved_state.txt").write_text("what the interrupted run saved")
    logged = []
    run_stage(nb, profile, log=logged.append, progress=False)
    assert any("resuming" in m for m in logged)
    assert (r.directory / "saved_state.txt").exists()  # kept for the chapter to resume from
    # a stage folder linked from elsewhere is read, never deleted through the link
    other = tmp_path / "other_runs"
    other.mkdir()
    (other / "toy").symlink_to(r.directory, target_is_directory=True)
    with pytest.raises(StageFailedError, match="linked stage folder is read, never replaced"):
        run_stage(nb, profile, run_dir=other, overrides={"n": 9}, log=lambda m: None, progress=False)
    assert (r.directory / "saved_state.txt").exists()
