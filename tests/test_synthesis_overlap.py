"""Synthesis with its steps overlapped (``prefetch``): the same dataset, byte for byte, as
one step after another, and a failure or Ctrl-C in any step leaves no dataset behind."""

from __future__ import annotations

import _thread
import signal
import threading
import time

import numpy as np
import pytest
import yaml

import chexanatomy_lib.ct.synthesis as synthesis
from chexanatomy_lib.cli import main
from chexanatomy_lib.ct.cohort import PoseRanges
from chexanatomy_lib.ct.dataset import DatasetWriter, ProjectedDataset
from chexanatomy_lib.ct.io import CTCase
from chexanatomy_lib.ct.synthesis import RenderSettings, synthesize_dataset
from ct_phantoms import make_phantom, make_phantom_case

SPACING = (2.0, 2.0, 2.5)
SETTINGS = RenderSettings(field_mm=220.0, working_spacing_mm=2.0, step_mm=1.0)
RANGES = PoseRanges(translation_mm=(15.0, 10.0, 15.0), rotation_deg=(3.0, 5.0, 5.0), sod_mm=(1500.0, 1700.0))
FILES = ("images.npy", "masks.npy", "absent.npy", "truncated.npy", "index.csv", "splits.json", "dataset.json")


def _case(case_id: str, shape: tuple[int, int, int]) -> CTCase:
    ph = make_phantom(shape, SPACING)
    return CTCase(case_id=case_id, volume=ph.volume, labelmap=ph.labelmap.astype(np.int16),
                  affine=ph.affine, spacing=np.asarray(SPACING))


@pytest.fixture(scope="module")
def cases():
    # two cases, so that the preparation thread also moves from one CT to the next
    return [_case("alpha", (48, 48, 40)), _case("beta", (52, 44, 40))]


def _synth(cases, path, **kw):
    args = dict(image_size=64, n_copies=2, poses_per_copy=2, views=["pa", "lateral"], seed=7, settings=SETTINGS,
                pose_ranges=RANGES, progress=False)
    return synthesize_dataset(cases, path, **{**args, **kw})


@pytest.fixture(scope="module")
def sequential(cases, tmp_path_factory):
    return _synth(cases, tmp_path_factory.mktemp("overlap") / "sequential", prefetch=0)


def _no_dataset_left(tmp_path, name: str) -> bool:
    return not list(tmp_path.glob(f"{name}*"))  # neither the folder nor its ".partial"


@pytest.mark.parametrize("prefetch", [1, 2])
def test_overlapped_synthesis_writes_the_same_dataset(cases, sequential, tmp_path, prefetch):
    overlapped = _synth(cases, tmp_path / "overlapped", prefetch=prefetch)
    for name in FILES:  # images, packed masks, flags, rows, splits and meta
        assert (overlapped / name).read_bytes() == (sequential / name).read_bytes(), name
    ds = ProjectedDataset(overlapped)
    assert len(ds) == 2 * 2 * 2 * 2  # cases x copies x views x poses
    assert list(ds.index["copy_id"].drop_duplicates()) == ["alpha_c000", "alpha_c001", "beta_c000", "beta_c001"]
    # with Poisson noise on: equal images mean equal draws, each seeded by its row
    assert SETTINGS.detector.photons_per_pixel is not None and ds.index["noise_seed"].is_unique


@pytest.mark.parametrize("prefetch", [0, 1])
def test_failed_preparation_surfaces_and_leaves_no_dataset(cases, tmp_path, monkeypatch, prefetch):
    real, calls = synthesis.make_working_volume, []

    def fails_on_the_second_copy(*args, **kw):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise RuntimeError("deformation of copy 2 failed")
        return real(*args, **kw)

    monkeypatch.setattr(synthesis, "make_working_volume", fails_on_the_second_copy)
    with pytest.raises(RuntimeError, match="^deformation of copy 2 failed$"):
        _synth(cases, tmp_path / "ds", prefetch=prefetch)
    assert _no_dataset_left(tmp_path, "ds")
    # with prefetch the copies were prepared off the calling thread
    assert (calls[0] == threading.current_thread().name) == (prefetch == 0)


def test_failed_write_surfaces_and_leaves_no_dataset(cases, tmp_path, monkeypatch):
    real, written = DatasetWriter.add_packed, []

    def fails_on_the_third_image(self, *args, **kw):
        written.append(threading.current_thread().name)
        if len(written) == 3:
            raise OSError("disk full")
        return real(self, *args, **kw)

    monkeypatch.setattr(DatasetWriter, "add_packed", fails_on_the_third_image)
    with pytest.raises(OSError, match="^disk full$"):
        _synth(cases, tmp_path / "ds", prefetch=1)
    assert _no_dataset_left(tmp_path, "ds")
    assert written[0] != threading.current_thread().name  # written by the writer thread


def test_ctrl_c_while_a_copy_is_prepared_stops_at_once(cases, tmp_path, monkeypatch):
    """Ctrl-C while the rendering waits for a slow preparation: the synthesis stops within
    a fraction of a second (not when the preparation ends), leaving no dataset."""
    real, calls, release = synthesis.make_working_volume, [], threading.Event()

    def slow_second_copy(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            threading.Timer(0.3, _thread.interrupt_main).start()  # the user presses Ctrl-C
            release.wait(30.0)
        return real(*args, **kw)

    monkeypatch.setattr(synthesis, "make_working_volume", slow_second_copy)
    # NOTE: Python's own SIGINT handler, as `chexanatomy synthesize` runs with: an earlier
    # test in the same process may leave another one behind (an asyncio runner's, which
    # cancels a task instead of raising), and interrupt_main calls whatever is installed.
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    t = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            _synth(cases, tmp_path / "ds", prefetch=1)
        seconds = time.perf_counter() - t
    finally:
        release.set()
        signal.signal(signal.SIGINT, handler)
    assert seconds < 10.0, seconds  # the preparation was still held at 30 s
    assert _no_dataset_left(tmp_path, "ds")
    for thread in threading.enumerate():  # the threads end once released, as daemons would anyway
        if thread.name.startswith("synthesis-"):
            thread.join(30.0)
            assert not thread.is_alive()


def test_prefetch_must_be_a_count():
    with pytest.raises(ValueError, match="prefetch"):
        synthesize_dataset([_case("a", (32, 32, 24))], "unused", image_size=32, prefetch=-1, progress=False)


def test_cli_prefetch_option(tmp_path, capsys):
    ct, lab = make_phantom_case(tmp_path, (40, 40, 32), name="p")
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"name": "phantom", "cases": [{"case_id": "p", "ct": str(ct), "labels": str(lab)}]}))
    tiny = {"image_size": 40, "field_mm": 260.0, "n_copies": 2, "poses_per_copy": 1, "views": ["pa"],
            "translation_mm": [10.0, 10.0, 10.0], "sod_range_mm": [1500.0, 1700.0], "device": "cpu",
            "manifest": str(manifest)}
    profile = tmp_path / "tiny.yaml"
    profile.write_text(yaml.safe_dump({"name": "tiny", "run_dir": str(tmp_path / "runs"), "common": {"seed": 3},
                                       "stages": {"01_ct_projection": tiny}}))
    for name, extra in (("sequential", ["--prefetch", "0"]), ("default", [])):
        assert main(["synthesize", "--profile", str(profile), "--out", str(tmp_path / name), *extra]) == 0
    for name in FILES:
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "sequential" / name).read_bytes(), name
    assert main(["synthesize", "--profile", str(profile), "--out", str(tmp_path / "jobs"), "--executor", "local",
                 "--prefetch", "0"]) == 2
    assert "--prefetch" in capsys.readouterr().err and not (tmp_path / "jobs").exists()
    with pytest.raises(SystemExit):  # argparse: a count >= 0
        main(["synthesize", "--profile", str(profile), "--out", str(tmp_path / "x"), "--prefetch", "-1"])
