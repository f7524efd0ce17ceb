"""DRR + all-structure masks: our ray marcher vs DiffDRR, speed, memory, agreement.

    .venv/bin/python benchmarks/bench_drr.py [--sizes 128 256] [--diffdrr-patch 64]

Both renderers trace the same rays (``chexanatomy_lib.ct.geometry``, PA and
left lateral, nominal pose, SID 1800 mm, SOD 1650 mm, 430 mm detector) through
the bundled CT (``load_example_case``). Each renderer runs in its own process so
its peak memory (max RSS) is its own.

* ours: ``make_working_volume`` (2 mm grid, once, timed separately) then
  ``render_view`` per image: DRR (detector model, noise) and a mask for every
  structure (95 for the bundled CT), one torch thread.
* DiffDRR 0.6.1: ``DRR(subject, sdd, height, delx, renderer="siddon")`` at full
  CT resolution, rays passed to ``DRR.render(..., mask_to_channels=True)`` (the
  call ``DRR.forward`` makes after building rays from a pose), default torch
  threads. Timed with attenuation as density (its channels sum to the line
  integral), then rendered again with density = 1 so each channel is a path
  length in mm: that is the reference for the mask Dice.

Writes ``records/benchmarks/drr_cpu.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "records" / "benchmarks" / "drr_cpu.json"
VIEWS = ("pa", "lateral")
SOD_MM = 1650.0
FIELD_MM = 430.0
DICE_STRUCTURES = ("lungs", "lung_left", "lung_right", "heart")


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def worker_ours(sizes: list[int], out: Path) -> dict:
    from chexanatomy_lib.ct.cohort import SourceCT, make_working_volume
    from chexanatomy_lib.ct.geometry import PatientPose, patient_rays
    from chexanatomy_lib.ct.io import load_example_case
    from chexanatomy_lib.ct.projector import RayMarcher, torch_threads
    from chexanatomy_lib.ct.synthesis import RenderSettings, label_groups, render_view, structures_present

    case = load_example_case()
    res: dict = {"renderer": "ours", "torch_threads": 1, "per_size": {}}
    arrays = {}
    with torch_threads(1):
        t = time.perf_counter()
        source = SourceCT.from_case(case)
        res["prepare_ct_s"] = time.perf_counter() - t
        t = time.perf_counter()
        volume = make_working_volume(source, 2.0)
        res["working_volume_s"] = time.perf_counter() - t
        names = structures_present(source.label_ids)
        groups = label_groups(names, source.label_ids)
        res["n_structures"] = len(names)
        for size in sizes:
            settings = RenderSettings(image_size=size, field_mm=FIELD_MM)
            marcher = RayMarcher(volume.mu, volume.labels, volume.affine, len(volume.label_ids), settings.step_mm)
            render_view(volume, "pa", PatientPose(sod=SOD_MM), settings, groups, 0, marcher)  # warm-up
            times = []
            for view in VIEWS:
                t = time.perf_counter()
                _, masks, _, _ = render_view(volume, view, PatientPose(sod=SOD_MM), settings, groups, 0, marcher)
                times.append(time.perf_counter() - t)
                src, pix = patient_rays(view, settings.detector_geometry(), PatientPose(sod=SOD_MM), volume.isocentre)
                line, _ = marcher.project(src, pix)
                arrays[f"line_{view}_{size}"] = line.view(size, size).numpy()
                for name in DICE_STRUCTURES:
                    arrays[f"mask_{name}_{view}_{size}"] = masks[names.index(name)]
            res["per_size"][str(size)] = {"seconds_per_image": float(np.mean(times)),
                                          "images_per_s": float(1.0 / np.mean(times))}
    res["threshold_mm"] = RenderSettings().mask_threshold_mm
    res["peak_rss_gb"] = _peak_rss_gb()
    np.savez(out, **arrays)
    return res


def worker_diffdrr(sizes: list[int], out: Path, patch_size: int | None, ref_size: int, threshold: float) -> dict:
    import torch
    from diffdrr.data import read
    from diffdrr.drr import DRR

    from chexanatomy_lib.ct.detector import hu_to_mu
    from chexanatomy_lib.ct.geometry import Detector, PatientPose, patient_rays
    from chexanatomy_lib.ct.io import diffdrr_data_dir, load_example_case
    from chexanatomy_lib.ct.projector import masks_from_path_lengths
    from chexanatomy_lib.ct.synthesis import label_groups, structures_present

    data = diffdrr_data_dir()
    # NOTE: center_volume=False keeps DiffDRR's world frame = the CT's own frame,
    # so our world-space rays mean the same thing to both renderers.
    subject = read(data / "cxr.nii.gz", data / "mask.nii.gz", orientation="AP", center_volume=False)
    case = load_example_case()
    # isocentre = the CT volume's centre, in world mm (as ours uses)
    shape = np.asarray(case.volume.shape)
    iso = case.affine[:3, :3] @ ((shape - 1) / 2.0) + case.affine[:3, 3]
    # attenuation on DiffDRR's own voxel grid (its affine may differ from ours by a flip)
    hu = subject.volume.data.squeeze().float().numpy()
    mu = torch.from_numpy(hu_to_mu(hu))
    res: dict = {"renderer": "diffdrr", "torch_threads": torch.get_num_threads(), "patch_size": patch_size,
                 "per_size": {}}
    label_ids = np.unique(subject.mask.data.numpy())
    names = structures_present(label_ids)
    groups = label_groups(names, label_ids)  # compact indices into label_ids
    arrays = {}
    for size in sizes:
        det = Detector.square(size, FIELD_MM)
        drr = DRR(subject, sdd=det.sid, height=size, delx=det.pixel_spacing, patch_size=patch_size)
        times = []
        for view in VIEWS:
            src, pix = patient_rays(view, det, PatientPose(sod=SOD_MM), iso)
            s = torch.tensor(src, dtype=torch.float32)[None, None]
            p = torch.tensor(pix, dtype=torch.float32)[None]
            with torch.no_grad():
                t = time.perf_counter()
                img = drr.render(mu, s, p, mask_to_channels=True)  # [1, C, H*W]
                times.append(time.perf_counter() - t)
                arrays[f"line_{view}_{size}"] = img[0].sum(0).view(size, size).numpy()
                if size == ref_size:
                    t = time.perf_counter()
                    path = drr.render(torch.ones_like(mu), s, p, mask_to_channels=True)[0]  # [C, H*W] mm
                    times.append(time.perf_counter() - t)
                    path = path[torch.as_tensor(label_ids, dtype=torch.long)].T  # [H*W, L] compact order
                    for name in DICE_STRUCTURES:
                        mask = masks_from_path_lengths(path, [groups[names.index(name)]], threshold)[0]
                        arrays[f"mask_{name}_{view}_{size}"] = mask.view(size, size).numpy()
            del img
        res["per_size"][str(size)] = {"seconds_per_image": float(np.mean(times)),
                                      "images_per_s": float(1.0 / np.mean(times))}
        del drr
    res["peak_rss_gb"] = _peak_rss_gb()
    np.savez(out, **arrays)
    return res


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sizes (pixels)")
    ap.add_argument("--diffdrr-patch", type=int, default=64,
                    help="DiffDRR patch_size (0 = none; none at 256 px needs ~14 GB)")
    ap.add_argument("--worker", choices=["ours", "diffdrr"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--threshold", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))  # NOTE: a benchmark script, run from a checkout
    patch = args.diffdrr_patch or None
    ref_size = max(args.sizes)
    if args.worker == "ours":
        print(json.dumps(worker_ours(args.sizes, args.out)))
        return 0
    if args.worker == "diffdrr":
        print(json.dumps(worker_diffdrr(args.sizes, args.out, patch, ref_size, args.threshold)))
        return 0

    from chexanatomy_lib.provenance import device_info, git_revision

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in ("ours", "diffdrr"):
            files[name] = Path(tmp) / f"{name}.npz"
            cmd = [sys.executable, __file__, "--worker", name, "--out", str(files[name]),
                   "--sizes", *map(str, args.sizes), "--diffdrr-patch", str(args.diffdrr_patch)]
            if name == "diffdrr":
                cmd += ["--threshold", str(results["ours"]["threshold_mm"])]
            t = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr, sep="\n")
                return 1
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name]["process_wall_s"] = time.perf_counter() - t
        ours, ref = np.load(files["ours"]), np.load(files["diffdrr"])
        agreement = {}
        for view in VIEWS:
            for name in DICE_STRUCTURES:
                agreement[f"dice_{name}_{view}"] = dice(ours[f"mask_{name}_{view}_{ref_size}"],
                                                        ref[f"mask_{name}_{view}_{ref_size}"])
            a, b = ours[f"line_{view}_{ref_size}"].ravel(), ref[f"line_{view}_{ref_size}"].ravel()
            agreement[f"drr_corr_{view}"] = float(np.corrcoef(a, b)[0, 1])
            agreement[f"drr_mean_abs_diff_{view}"] = float(np.abs(a - b).mean())
            agreement[f"drr_mean_line_integral_{view}"] = float(b.mean())

    speedup = {s: results["ours"]["per_size"][s]["images_per_s"] / results["diffdrr"]["per_size"][s]["images_per_s"]
               for s in results["ours"]["per_size"]}
    metrics = {f"{name}_images_per_s_{s}px": results[name]["per_size"][s]["images_per_s"]
               for s in results["ours"]["per_size"] for name in ("ours", "diffdrr")}
    metrics |= {f"speedup_{s}px": v for s, v in speedup.items()}
    metrics |= {"ours_peak_rss_gb": results["ours"]["peak_rss_gb"],
                "diffdrr_peak_rss_gb": results["diffdrr"]["peak_rss_gb"], **agreement}
    machine = {**device_info(), "platform": platform.platform(),
               "load_average_1min_at_end": round(os.getloadavg()[0], 2)}
    record = {
        "name": "drr_cpu",
        "kind": "benchmark",
        "benchmark": "drr_cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_drr.py", *sys.argv[1:]]),
        "device": machine,
        "machine": machine,
        "revision": git_revision(),
        "metrics": metrics,
        "setup": {"ct": "bundled DiffDRR example, 512x512x133, 0.703x0.703x2.5 mm", "views": list(VIEWS),
                  "sid_mm": 1800.0, "sod_mm": SOD_MM, "field_mm": FIELD_MM, "reference_size": ref_size,
                  "mask_threshold_mm": results["ours"]["threshold_mm"], "diffdrr_patch_size": patch},
        "ours": results["ours"], "diffdrr": results["diffdrr"], "speedup": speedup, "agreement": agreement,
    }
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=2))

    print(f"{'size':>5} {'renderer':>8} {'s/image':>8} {'images/s':>9} {'peak GB':>8}")
    for s in results["ours"]["per_size"]:
        for name in ("ours", "diffdrr"):
            r = results[name]
            print(f"{s:>5} {name:>8} {r['per_size'][s]['seconds_per_image']:8.2f} "
                  f"{r['per_size'][s]['images_per_s']:9.2f} {r['peak_rss_gb']:8.2f}")
        print(f"{s:>5} speed-up {speedup[s]:.1f}x")
    print(f"ours: CT preparation {results['ours']['prepare_ct_s']:.1f} s, working volume "
          f"{results['ours']['working_volume_s']:.1f} s (once per deformed copy)")
    for k, v in agreement.items():
        print(f"{k}: {v:.4f}")
    print(f"wrote {RECORD.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
