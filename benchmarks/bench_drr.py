"""DRR + all-structure masks: our ray marcher vs DiffDRR and nanodrr, speed, memory, agreement.

    .venv/bin/python benchmarks/bench_drr.py [--sizes 128 256] [--diffdrr-patch 64]
        [--renderers ours diffdrr nanodrr] [--nanodrr-samples 500] [--out FILE]

The renderers trace the same rays (``chexanatomy_lib.ct.geometry``, PA and
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
* nanodrr 0.1.7 (``backend="torch"``, its ``grid_sample`` renderer; the fused
  Triton kernel needs a GPU, see ``bench_drr_gpu.py``): full CT resolution,
  ``--nanodrr-samples`` samples per ray inside the volume, default torch
  threads. Per image, one DRR render (our attenuation, no labelmap) and one
  labelmap render of a volume of ones (one channel per label id: path lengths
  in mm, thresholded like ours). Its camera (``DRR.from_carm_intrinsics``,
  ``make_rt_inv`` with orientation ``"PA"``) is checked to cast exactly our rays
  (largest end-point distance recorded), and its masks are compared with
  DiffDRR's like ours.

Writes ``records/benchmarks/drr_cpu.json`` (or ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
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
RENDERERS = ("ours", "diffdrr", "nanodrr")
DISPLAY = {"ours": "ours", "diffdrr": "DiffDRR", "nanodrr": "nanodrr"}
#: largest distance (mm) allowed between nanodrr's ray end points and ours (float32 at ~2 m)
RAY_TOLERANCE_MM = 0.05


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


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
    res: dict = {"renderer": "diffdrr", "version": _version("diffdrr"), "torch_threads": torch.get_num_threads(),
                 "patch_size": patch_size, "per_size": {}}
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


def nanodrr_pose(view: str, sod: float = SOD_MM) -> tuple[list[float], list[float]]:
    """Arguments of nanodrr's ``make_rt_inv(rotation, translation, "PA", isocenter)`` for our
    nominal ``view`` (no patient rotation or shift) with the source ``sod`` mm from the isocentre.

    nanodrr's camera has the source at its origin and looks along its +z; image columns
    run along camera +x, rows along +y. Orientation ``"PA"`` maps these to patient -x, -z
    and +y: our PA view (columns towards the patient's left, rows towards the feet, beam
    posterior -> anterior). Our left lateral (beam -x, columns -y, rows -z) is that view
    turned by +90 degrees about the cranio-caudal axis (z). The translation is the
    source's offset from the isocentre before that rotation: ``(0, -sod, 0)``.
    Returns ZXY Euler angles (degrees, ``[3]``) and the translation (mm, ``[3]``).
    """
    rotations = {"pa": [0.0, 0.0, 0.0], "lateral": [90.0, 0.0, 0.0]}
    if view not in rotations:
        raise ValueError(f"no nanodrr pose for view {view!r}; expected one of {', '.join(rotations)}")
    return rotations[view], [0.0, -float(sod), 0.0]


def nanodrr_rt_inv(view: str, isocentre: np.ndarray, sod: float = SOD_MM, device: str = "cpu"):
    """nanodrr's camera-to-world matrix ``float32 [1, 4, 4]`` for :func:`nanodrr_pose`,
    ``isocentre`` ``[3]`` in the CT's world frame (mm)."""
    import torch
    from nanodrr.camera import make_rt_inv

    rotation, translation = nanodrr_pose(view, sod)
    f32 = dict(dtype=torch.float32, device=device)
    return make_rt_inv(torch.tensor([rotation], **f32), torch.tensor([translation], **f32), "PA",
                       torch.tensor(np.asarray(isocentre), **f32))


def nanodrr_subjects(case, mu: np.ndarray):
    """nanodrr ``Subject`` objects on the CT's own voxel grid and world frame (``case.affine``,
    RAS+ mm), so that world points mean the same to nanodrr and to us.

    Returns ``(drr, path)``: ``drr`` holds the attenuation ``mu`` (``float32 [X, Y, Z]``,
    1/mm, used as it is: ``convert_to_mu=False``) and no labelmap, so its render has one
    channel, the line integral; ``path`` holds a volume of ones with the labelmap, so
    channel ``k`` of its render is the path length (mm) through label id ``k``.
    """
    import torch
    from nanodrr.data import Subject
    from torchio import LabelMap, ScalarImage

    affine = np.asarray(case.affine, dtype=np.float64)
    image = ScalarImage(tensor=torch.from_numpy(np.ascontiguousarray(mu, dtype=np.float32))[None], affine=affine)
    ones = ScalarImage(tensor=torch.ones((1, *mu.shape)), affine=affine)
    labels = LabelMap(tensor=torch.from_numpy(np.ascontiguousarray(case.labelmap, dtype=np.int32))[None],
                      affine=affine)
    return (Subject.from_images(image, convert_to_mu=False),
            Subject.from_images(ones, labels, convert_to_mu=False))


def nanodrr_ray_error_mm(drr, rt_inv, source: np.ndarray, pixels: np.ndarray) -> float:
    """Largest distance (mm) between the rays nanodrr casts and ours.

    nanodrr's ray end points are its source and detector pixel centres (``drr.src``
    ``[1, 1, 3]``, ``drr.tgt`` ``[1, H*W, 3]``, camera frame) carried to the world frame
    by ``rt_inv`` ``[1, 4, 4]``; ours are ``source`` ``[3]`` and ``pixels`` ``[H*W, 3]``
    (world mm, :func:`~chexanatomy_lib.ct.geometry.patient_rays`).
    """
    from nanodrr.geometry import transform_point

    src = transform_point(rt_inv, drr.src)[0].double().cpu().numpy()  # [1, 3]
    tgt = transform_point(rt_inv, drr.tgt)[0].double().cpu().numpy()  # [H*W, 3]
    if tgt.shape != pixels.shape:
        raise ValueError(f"nanodrr casts {tgt.shape[0]} rays, ours {pixels.shape[0]}")
    return float(max(np.linalg.norm(src - source, axis=-1).max(), np.linalg.norm(tgt - pixels, axis=-1).max()))


def worker_nanodrr(sizes: list[int], out: Path, n_samples: int, ref_size: int, threshold: float) -> dict:
    """nanodrr's torch backend on the CPU: per image a DRR render and a labelmap render
    (path lengths of every label), timed together; masks (path length > ``threshold`` mm)
    and line integrals saved to ``out`` for the agreement with DiffDRR."""
    import torch
    from nanodrr.drr import DRR

    from chexanatomy_lib.ct.detector import hu_to_mu
    from chexanatomy_lib.ct.geometry import Detector, PatientPose, patient_rays
    from chexanatomy_lib.ct.io import load_example_case
    from chexanatomy_lib.ct.projector import masks_from_path_lengths
    from chexanatomy_lib.ct.synthesis import label_groups, structures_present

    case = load_example_case()
    # isocentre = the CT volume's centre, in world mm (as ours uses)
    shape = np.asarray(case.volume.shape)
    iso = case.affine[:3, :3] @ ((shape - 1) / 2.0) + case.affine[:3, 3]
    drr_subject, path_subject = nanodrr_subjects(case, hu_to_mu(case.volume))
    label_ids = np.unique(case.labelmap)
    names = structures_present(label_ids)
    groups = label_groups(names, label_ids)  # compact indices into label_ids
    channels = torch.as_tensor(label_ids, dtype=torch.long)  # nanodrr's channel k = label id k
    rt_inv = {view: nanodrr_rt_inv(view, iso) for view in VIEWS}
    res: dict = {"renderer": "nanodrr", "version": _version("nanodrr"), "backend": "torch",
                 "torch_threads": torch.get_num_threads(), "samples_per_ray": n_samples,
                 "n_channels": path_subject.n_classes, "volume_shape": list(case.volume.shape),
                 "make_rt_inv": {view: dict(zip(("rotation_zxy_deg", "translation_mm"), nanodrr_pose(view)),
                                            orientation="PA") for view in VIEWS},
                 "per_size": {}}
    arrays = {}
    ray_error = 0.0

    def render(drr, view: str):
        """``(line integral [1, 1, H, W], path lengths [1, C, H, W] mm, seconds of each)``."""
        t0 = time.perf_counter()
        line = drr(drr_subject, rt_inv[view], n_samples=n_samples, backend="torch")
        t1 = time.perf_counter()
        path = drr(path_subject, rt_inv[view], n_samples=n_samples, backend="torch")
        return line, path, (t1 - t0, time.perf_counter() - t1)

    with torch.no_grad():
        det = Detector.square(16, FIELD_MM)  # warm-up
        render(DRR.from_carm_intrinsics(det.sid, det.pixel_spacing, det.pixel_spacing, 0.0, 0.0, 16, 16,
                                        dtype=torch.float32), "pa")
        for size in sizes:
            det = Detector.square(size, FIELD_MM)
            drr = DRR.from_carm_intrinsics(det.sid, det.pixel_spacing, det.pixel_spacing, 0.0, 0.0, size, size,
                                           dtype=torch.float32)
            drr_times, label_times = [], []
            for view in VIEWS:
                src, pix = patient_rays(view, det, PatientPose(sod=SOD_MM), iso)
                ray_error = max(ray_error, nanodrr_ray_error_mm(drr, rt_inv[view], src, pix))
                if ray_error > RAY_TOLERANCE_MM:
                    raise SystemExit(f"nanodrr's {view} rays at {size} px lie up to {ray_error:.3g} mm from ours "
                                     f"(tolerance {RAY_TOLERANCE_MM} mm): its camera does not match our geometry")
                line, path, (t_drr, t_labels) = render(drr, view)
                drr_times.append(t_drr)
                label_times.append(t_labels)
                arrays[f"line_{view}_{size}"] = line[0, 0].numpy()
                if size == ref_size:
                    p = path[0].reshape(path.shape[1], -1)[channels].T  # [H*W, L] compact order
                    for name in DICE_STRUCTURES:
                        mask = masks_from_path_lengths(p, [groups[names.index(name)]], threshold)[0]
                        arrays[f"mask_{name}_{view}_{size}"] = mask.view(size, size).numpy()
                del line, path
            per_image = float(np.mean(drr_times) + np.mean(label_times))
            res["per_size"][str(size)] = {"seconds_per_image": per_image, "images_per_s": 1.0 / per_image,
                                          "drr_seconds": float(np.mean(drr_times)),
                                          "labels_seconds": float(np.mean(label_times))}
            del drr
    res["max_ray_error_mm"] = ray_error
    res["peak_rss_gb"] = _peak_rss_gb()
    np.savez(out, **arrays)
    return res


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def agreement(test, ref, size: int, prefix: str = "") -> dict[str, float]:
    """Masks and line integrals of one renderer (``test``) against DiffDRR's (``ref``), both
    the arrays a worker saved, at ``size`` px: Dice per structure and view, correlation and
    mean absolute difference of the line integrals, keys prefixed with ``prefix``. Without
    a prefix (ours), also the mean line integral of the reference, as recorded before."""
    out = {}
    for view in VIEWS:
        for name in DICE_STRUCTURES:
            out[f"{prefix}dice_{name}_{view}"] = dice(test[f"mask_{name}_{view}_{size}"],
                                                      ref[f"mask_{name}_{view}_{size}"])
        a, b = test[f"line_{view}_{size}"].ravel(), ref[f"line_{view}_{size}"].ravel()
        out[f"{prefix}drr_corr_{view}"] = float(np.corrcoef(a, b)[0, 1])
        out[f"{prefix}drr_mean_abs_diff_{view}"] = float(np.abs(a - b).mean())
        if not prefix:
            out[f"drr_mean_line_integral_{view}"] = float(b.mean())
    return out


def run_worker(name: str, args: argparse.Namespace, arrays: Path, threshold: float) -> dict:
    """Run renderer ``name`` in its own process; its result dict, with ``process_wall_s``."""
    cmd = [sys.executable, __file__, "--worker", name, "--arrays", str(arrays), "--sizes", *map(str, args.sizes),
           "--diffdrr-patch", str(args.diffdrr_patch), "--nanodrr-samples", str(args.nanodrr_samples),
           "--threshold", str(threshold)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"the {DISPLAY[name]} renderer failed (exit status {proc.returncode}):\n"
                         f"{proc.stdout}\n{proc.stderr}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = time.perf_counter() - t
    return res


def ratios(results: dict, num: str, den: str) -> dict[str, float]:
    """Images/s of ``num`` over ``den`` per size (``{}`` unless both ran in this run)."""
    if num not in results or den not in results:
        return {}
    return {s: results[num]["per_size"][s]["images_per_s"] / results[den]["per_size"][s]["images_per_s"]
            for s in results[num]["per_size"]}


def print_table(results: dict, speedup: dict, speedup_nano: dict, agree: dict, ref_size: int) -> None:
    """Images/s of each renderer side by side per size, with our speed-ups, then memory,
    threads and the mask agreement with DiffDRR."""
    names = [n for n in RENDERERS if n in results]
    sizes = list(results[names[0]]["per_size"])
    cols = [f"{DISPLAY[n]} im/s" for n in names] + (["ours/DiffDRR"] if speedup else []) \
        + (["ours/nanodrr"] if speedup_nano else [])
    print(f"{'size':>7} " + " ".join(f"{c:>13}" for c in cols))
    for s in sizes:
        cells = [f"{results[n]['per_size'][s]['images_per_s']:13.2f}" for n in names]
        cells += [f"{r[s]:12.1f}x" for r in (speedup, speedup_nano) if r]
        print(f"{s + ' px':>7} " + " ".join(cells))
    print(f"{'peak':>7} " + " ".join(f"{results[n]['peak_rss_gb']:10.2f} GB" for n in names))
    print(f"{'threads':>7} " + " ".join(f"{results[n]['torch_threads']:13d}" for n in names))
    if "ours" in results:
        print(f"ours: CT preparation {results['ours']['prepare_ct_s']:.1f} s, working volume "
              f"{results['ours']['working_volume_s']:.1f} s (once per deformed copy)")
    if "nanodrr" in results:
        r = results["nanodrr"]
        split = ", ".join(f"{s} px {v['drr_seconds']:.2f} s DRR + {v['labels_seconds']:.2f} s labels"
                          for s, v in r["per_size"].items())
        print(f"nanodrr {r['version']} ({r['backend']} backend, {r['samples_per_ray']} samples/ray, "
              f"{r['n_channels']} channels): {split}; rays within {r['max_ray_error_mm']:.1e} mm of ours")
    if not agree:
        return
    print(f"agreement with DiffDRR at {ref_size} px (masks: path length > threshold):")
    rows = sorted({k.removeprefix("nanodrr_") for k in agree}, key=list(agree).index)
    print(f"{'':>30} {'ours':>8} {'nanodrr':>8}")
    for k in rows:
        cells = [f"{agree[key]:8.4f}" if key in agree else f"{'':>8}" for key in (k, f"nanodrr_{k}")]
        print(f"{k:>30} " + " ".join(cells))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sizes (pixels)")
    ap.add_argument("--diffdrr-patch", type=int, default=64,
                    help="DiffDRR patch_size (0 = none; none at 256 px needs ~14 GB)")
    ap.add_argument("--renderers", nargs="+", choices=RENDERERS, default=list(RENDERERS),
                    help="renderers to run (default: all; a subset needs --out)")
    ap.add_argument("--nanodrr-samples", type=int, default=500, help="nanodrr samples per ray (default 500)")
    ap.add_argument("--out", type=Path, default=RECORD,
                    help=f"record to write (default {RECORD.relative_to(ROOT)})")
    ap.add_argument("--worker", choices=RENDERERS, help=argparse.SUPPRESS)
    ap.add_argument("--arrays", type=Path, help=argparse.SUPPRESS)  # a worker's images and masks (.npz)
    ap.add_argument("--threshold", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))  # NOTE: a benchmark script, run from a checkout
    patch = args.diffdrr_patch or None
    ref_size = max(args.sizes)
    if args.worker == "ours":
        print(json.dumps(worker_ours(args.sizes, args.arrays)))
        return 0
    if args.worker == "diffdrr":
        print(json.dumps(worker_diffdrr(args.sizes, args.arrays, patch, ref_size, args.threshold)))
        return 0
    if args.worker == "nanodrr":
        print(json.dumps(worker_nanodrr(args.sizes, args.arrays, args.nanodrr_samples, ref_size, args.threshold)))
        return 0
    renderers = [n for n in RENDERERS if n in args.renderers]
    if renderers != list(RENDERERS) and args.out.resolve() == RECORD.resolve():
        ap.error(f"{RECORD.relative_to(ROOT)} holds all of {', '.join(RENDERERS)} (the book reads them); "
                 f"a run of {', '.join(renderers)} needs --out FILE")
    for name in ("diffdrr", "nanodrr"):
        if name in renderers and importlib.util.find_spec(name) is None:
            ap.error(f"{DISPLAY[name]} is not installed: `make benchmarks` installs it (the Makefile's "
                     f"{name.upper()}_SPEC, with --no-deps); or leave it out: --renderers ... --out FILE")
    if args.nanodrr_samples < 2:
        ap.error(f"--nanodrr-samples must be at least 2, got {args.nanodrr_samples}")

    from chexanatomy_lib.ct.synthesis import RenderSettings
    from chexanatomy_lib.provenance import device_info, git_revision

    threshold = RenderSettings().mask_threshold_mm
    results, agree = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {name: Path(tmp) / f"{name}.npz" for name in renderers}
        for name in renderers:
            results[name] = run_worker(name, args, files[name], threshold)
        if "diffdrr" in results:
            ref = np.load(files["diffdrr"])
            if "ours" in results:
                agree |= agreement(np.load(files["ours"]), ref, ref_size)
            if "nanodrr" in results:
                agree |= agreement(np.load(files["nanodrr"]), ref, ref_size, prefix="nanodrr_")

    # every ratio from this run's own measurements
    speedup, speedup_nano = ratios(results, "ours", "diffdrr"), ratios(results, "ours", "nanodrr")
    sizes = [str(s) for s in args.sizes]
    metrics = {f"{name}_images_per_s_{s}px": results[name]["per_size"][s]["images_per_s"]
               for s in sizes for name in renderers}
    metrics |= {f"speedup_{s}px": v for s, v in speedup.items()}
    metrics |= {f"speedup_vs_nanodrr_{s}px": v for s, v in speedup_nano.items()}
    metrics |= {f"{name}_peak_rss_gb": results[name]["peak_rss_gb"] for name in renderers}
    metrics |= agree
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
                  "mask_threshold_mm": threshold, "diffdrr_patch_size": patch, "renderers": renderers,
                  "nanodrr_samples_per_ray": args.nanodrr_samples, "nanodrr_backend": "torch"},
        **{name: results[name] for name in ("ours", "diffdrr") if name in results},
        "speedup": speedup, "agreement": agree,
        **({"nanodrr": results["nanodrr"], "speedup_vs_nanodrr": speedup_nano} if "nanodrr" in results else {}),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))

    print_table(results, speedup, speedup_nano, agree, ref_size)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
