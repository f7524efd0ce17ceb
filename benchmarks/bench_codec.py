"""Token codec throughput on the CPU: masks per second, encode and decode.

    .venv/bin/python benchmarks/bench_codec.py [--vqvae DIR] [--size 448] [--batch 1024] [--repeats 3]

Two levels are timed, each way:

* the VQ-VAE alone (64x64 soft crops -> 16 codes; 16 codes -> 64x64 map), batched;
* the whole codec at ``--size`` px (mask -> tight box, crop, antialiased resize,
  VQ-VAE; and codes -> VQ-VAE decoder, bilinear paste into the box, threshold),
  and its encoding with code search (4 entries per cell, 2 passes; 64 masks).

Widths: ours (chapter 2's default, or the VQ-VAE saved in ``--vqvae``) and the
official architecture's widths (random weights: speed does not depend on them).
Writes ``records/benchmarks/codec_cpu.json`` (machine, command, date, load
average) and prints a table. The numbers are wall-clock throughput: run on an
otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "records" / "benchmarks" / "codec_cpu.json"
OURS = dict(enc_channels=(8, 16, 32, 64), embedding_dim=64, dec_channels=(64, 64, 32, 16, 8))


def ellipse_masks(n: int, size: int, seed: int = 0) -> np.ndarray:
    """bool [n, size, size] random ellipses (thin and compact), never empty."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((n, size, size), bool)
    for k in range(n):
        cy, cx = rng.uniform(0.2, 0.8, 2) * size
        ry, rx = rng.uniform(0.01, 0.25, 2) * size + 1
        out[k] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return out


def rate(fn, n: int, repeats: int) -> float:
    """Best-of-``repeats`` items per second of ``fn()`` processing ``n`` items."""
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def bench(model, size: int, batch: int, repeats: int) -> dict:
    from chexanatomy_lib.codec import MaskCodec

    crops = torch.from_numpy(ellipse_masks(batch, 64, seed=1).astype(np.float32))
    codes = model.encode(crops)
    res = {
        "vqvae_encode_masks_per_s": rate(lambda: model.encode(crops), batch, repeats),
        "vqvae_decode_masks_per_s": rate(lambda: model.decode(codes), batch, repeats),
    }
    n_full = min(batch, 512)
    masks = ellipse_masks(n_full, size, seed=2)
    codec = MaskCodec(model, batch_size=256)
    boxes, full_codes = codec.encode(masks)
    res[f"codec_encode_masks_per_s_{size}px"] = rate(lambda: codec.encode(masks), n_full, repeats)
    res[f"codec_decode_masks_per_s_{size}px"] = rate(lambda: codec.decode(boxes, full_codes, size, size),
                                                     n_full, repeats)
    # encoding with code search (MaskVQVAE.search_codes): 4 entries per cell, 2 passes, on fewer masks
    n_search = min(n_full, 64)
    searching = MaskCodec(model, batch_size=256, code_search=4, search_passes=2)
    res[f"codec_encode_search4_masks_per_s_{size}px"] = rate(lambda: searching.encode(masks[:n_search]), n_search,
                                                             repeats)
    res["parameters"] = int(sum(p.numel() for p in model.parameters()))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vqvae", type=Path, default=None, help="a VQ-VAE folder saved by chapter 2 (default: ours, untrained)")
    ap.add_argument("--size", type=int, default=448, help="image size for the whole-codec timings (px)")
    ap.add_argument("--batch", type=int, default=1024, help="masks per call")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (best is kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()

    from chexanatomy_lib.codec import MaskVQVAE, VQVAEConfig
    from chexanatomy_lib.provenance import device_info, git_revision

    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    models = {
        "ours": MaskVQVAE.load(args.vqvae) if args.vqvae else MaskVQVAE(VQVAEConfig(**OURS)),
        "official_widths": MaskVQVAE(VQVAEConfig(embedding_dim=512)),
    }
    results = {}
    with torch.inference_mode():
        for name, model in models.items():
            model.eval()
            results[name] = {"config": model.config.to_json(), **bench(model, args.size, args.batch, args.repeats)}
    machine = {**device_info(), "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
               "load_average_1min_at_start": round(load_start, 2),
               "load_average_1min_at_end": round(os.getloadavg()[0], 2)}
    metrics = {f"{name}_{k}": v for name, r in results.items() for k, v in r.items() if k.endswith("_per_s")
               or k.endswith(f"_{args.size}px")}
    record = {
        "name": "codec_cpu", "kind": "benchmark", "benchmark": "codec_cpu",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "benchmarks/bench_codec.py", *sys.argv[1:]]),
        "device": machine, "machine": machine, "revision": git_revision(),
        "setup": {"size": args.size, "batch": args.batch, "repeats": args.repeats,
                  "masks": "random ellipses (thin and compact)", "vqvae": str(args.vqvae) if args.vqvae else "ours, untrained"},
        "metrics": metrics, "results": results,
    }
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps(record, indent=2, default=str))
    print(f"{'model':>16} {'VQ enc/s':>9} {'VQ dec/s':>9} {f'enc/s@{args.size}':>11} {f'dec/s@{args.size}':>11} "
          f"{'enc+search/s':>12}")
    for name, r in results.items():
        print(f"{name:>16} {r['vqvae_encode_masks_per_s']:9.0f} {r['vqvae_decode_masks_per_s']:9.0f} "
              f"{r[f'codec_encode_masks_per_s_{args.size}px']:11.0f} {r[f'codec_decode_masks_per_s_{args.size}px']:11.0f} "
              f"{r[f'codec_encode_search4_masks_per_s_{args.size}px']:12.0f}")
    print(f"load average (1 min): {load_start:.2f} at start, {os.getloadavg()[0]:.2f} at end; wrote {RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
