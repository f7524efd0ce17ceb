"""How far the mask VQ-VAE gets with more training, or with more than the token format allows.

    python benchmarks/codec_training_gpu.py --export runs/smoke codec_data.npz          # where chapters 1-2 ran
    python benchmarks/codec_training_gpu.py --data codec_data.npz --config paper --config smoke-widths   # GPU
    python benchmarks/codec_training_gpu.py --data codec_data.npz --config smoke --config smoke-k512 \
        --config smoke-k2048 --config smoke-autoencoder                                  # CPU, minutes

Chapter 2 trains its VQ-VAE for about half a minute on the CPU. This script
trains it with the ``02_token_codec`` settings of ``notebooks/profiles/paper.yaml``
(or other named configurations) on a GPU and scores the round trip on the same
held-out masks as chapter 2, so that the gap between the smoke run and the
issue's targets can be split into what training time buys and what it does not.
Two diagnostics go beyond the format, at the smoke profile's widths and budget:
codebooks of 512 and 2,048 entries (9 and 11 bits per grid cell instead of
PaliGemma's 7), and the same network trained and scored without quantisation
(the 4x4 latent passed on as it is), which bounds what any 128-entry codebook
on this encoder and decoder can reach.

``--export`` writes, from a run directory:

* the training crops of chapter 2: every present mask of the train split cropped
  with the aligned policy and resized to 64x64, stored as ``uint8`` (soft values
  quantised to 1/255);
* the held-out masks chapter 2 scores at 448 px: the same seeded sample of test
  images re-rendered from the CT, every structure present and untruncated, packed
  bits, with their structure names.

``--data`` trains each configuration, encodes and decodes the held-out masks
with the aligned crop, and writes one JSON record (mean round-trip Dice per
structure group, training time, configuration, device, revision) to
``records/benchmarks/codec_training_<device>.json`` and ``$OUT`` when set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from recording import revision, write_record  # noqa: E402

from chexanatomy_lib.provenance import device_info  # noqa: E402

#: named configurations: (VQVAEConfig kwargs, VQVAETrainConfig kwargs)
SMOKE_MODEL = {"enc_channels": (8, 16, 32, 64), "dec_channels": (64, 64, 32, 16, 8), "embedding_dim": 64}
SMOKE_TRAIN = {"steps": 500, "batch_size": 32, "lr": 0.006}
CONFIGS = {
    # notebooks/profiles/paper.yaml, 02_token_codec (embedding_dim and the loss as the notebook's defaults)
    "paper": ({"enc_channels": (16, 32, 64, 128), "dec_channels": (128, 128, 64, 32, 16), "embedding_dim": 64},
              {"steps": 20000, "batch_size": 256, "lr": 0.003}),
    # the smoke profile's widths, trained as long as the paper profile
    "smoke-widths": (SMOKE_MODEL, {"steps": 20000, "batch_size": 256, "lr": 0.003}),
    # the smoke profile itself (a check that this script reproduces chapter 2)
    "smoke": (SMOKE_MODEL, SMOKE_TRAIN),
    # ... trained twice as long (about a minute on two CPU cores)
    "smoke-1000": (SMOKE_MODEL, {**SMOKE_TRAIN, "steps": 1000}),
    # diagnostics beyond the token format (PaliGemma has 128 seg tokens): more bits per cell ...
    "smoke-k512": ({**SMOKE_MODEL, "num_embeddings": 512}, SMOKE_TRAIN),
    "smoke-k2048": ({**SMOKE_MODEL, "num_embeddings": 2048}, SMOKE_TRAIN),
    # ... and no quantisation at all: a plain autoencoder with the same 4x4 latent
    "smoke-autoencoder": (SMOKE_MODEL, {**SMOKE_TRAIN, "ae_warmup": 1.0}),
}
COMMON_TRAIN = {"commitment": 0.25, "dice_weight": 1.0, "restart_every": 25}
SIZE = 448


def export(run_dir: str, out: str, seed: int = 0, n_images: int = 4) -> None:
    from chexanatomy_lib.codec.geometry import masks_to_crops
    from chexanatomy_lib.ct.dataset import ProjectedDataset
    from chexanatomy_lib.ct.registry import group_of
    from chexanatomy_lib.ct.rerender import rerender_masks

    run = Path(run_dir)
    ds = ProjectedDataset(run / "01_ct_projection" / "dataset")
    _, crops = masks_to_crops(ds.present_masks(ds.split_indices("train"))[0], crop="aligned")
    # the chapter's sample of re-rendered test images (same seed, same draw)
    rng = np.random.default_rng(seed)
    test_idx = ds.split_indices("test")
    manifest = json.loads((run / "01_ct_projection" / "params.json").read_text())["manifest"]
    render_idx = np.sort(rng.choice(test_idx, min(n_images, len(test_idx)), replace=False))
    sized, rows = rerender_masks(ds, manifest, render_idx, [SIZE])
    groups = group_of(list(ds.structures))
    smoothing = float(ds.meta.get("render_settings", {}).get("mask_smoothing_mm", 0.0))
    np.savez_compressed(out, crops=np.round(crops * 255).astype(np.uint8), mask_smoothing_mm=smoothing,
                        masks=np.packbits(sized[SIZE], axis=-1), mask_shape=np.array(sized[SIZE].shape),
                        structures=np.array(rows["structure"].tolist()),
                        groups=np.array([groups[s] for s in rows["structure"]]))
    print(f"wrote {out}: {len(crops)} training crops, {len(rows)} held-out masks at {SIZE} px")


def autoencoder_roundtrip(codec, masks: np.ndarray) -> np.ndarray:
    """Masks bool [N, H, W] -> bool [N, H, W] through the codec's crop, encoder, decoder and paste,
    the 4x4 latent passed on unquantised (location bins as the codec's round trip)."""
    from chexanatomy_lib.codec.geometry import crop_boxes, crop_masks, paste_maps, quantise_boxes

    m = torch.from_numpy(masks).to(codec.device)
    boxes = crop_boxes(m, codec.crop, codec.pad_px)
    with torch.no_grad():
        crops = crop_masks(m, boxes, codec.crop, codec.resize)
        maps = codec.vqvae.decode_latent(codec.vqvae.encode_latent(crops)).clamp(-1, 1)
    return paste_maps(maps.cpu(), quantise_boxes(boxes.cpu()), masks.shape[1], masks.shape[2])


def train_and_score(data: dict, name: str, device: str) -> dict:
    import pandas as pd

    from chexanatomy_lib.codec import MaskCodec, VQVAEConfig, VQVAETrainConfig, train_vqvae
    from chexanatomy_lib.evaluation.evaluate import score_masks
    from chexanatomy_lib.evaluation.metrics import dice

    model_kw, train_kw = CONFIGS[name]
    crops = data["crops"].astype(np.float32) / 255.0
    t = time.perf_counter()
    vqvae, record = train_vqvae(crops, VQVAEConfig(**model_kw), VQVAETrainConfig(**train_kw, **COMMON_TRAIN),
                                device=device, progress=False)
    train_s = time.perf_counter() - t
    masks = np.unpackbits(data["masks"], axis=-1, count=int(data["mask_shape"][-1])).astype(bool)
    table = pd.DataFrame({"structure": data["structures"], "group": data["groups"]})
    codec = MaskCodec(vqvae, crop="aligned")
    quantised = train_kw.get("ae_warmup", 0.0) < 1.0
    if quantised:
        ours = score_masks(codec.roundtrip(masks), masks, table)
    else:
        ours = table.assign(dice=dice(autoencoder_roundtrip(codec, masks), masks))
    by_group = ours.groupby("group")["dice"].mean()
    res = {"config": name, "model": {k: list(v) if isinstance(v, tuple) else v for k, v in model_kw.items()},
           "train": {**train_kw, **COMMON_TRAIN}, "train_s": train_s, "quantised": quantised,
           "codebook_size": int(model_kw.get("num_embeddings", 128)) if quantised else None,
           "n_parameters": int(sum(p.numel() for p in vqvae.parameters())),
           "codebook_perplexity": record.get("codebook_perplexity"),
           "roundtrip_dice_448": {g: float(v) for g, v in by_group.items()},
           "n_masks": {g: int(v) for g, v in ours.groupby("group").size().items()}}
    print(json.dumps(res), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--export", nargs=2, metavar=("RUN_DIR", "OUT_NPZ"), help="write the data file and exit")
    ap.add_argument("--data", help="data file written by --export")
    ap.add_argument("--config", action="append", choices=sorted(CONFIGS), help="configurations to train (repeat)")
    ap.add_argument("--out", help="record to write (default: records/benchmarks/codec_training_<device>.json)")
    args = ap.parse_args()
    if args.export:
        export(*args.export)
        return
    if not args.data:
        ap.error("--data or --export is required")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    data = dict(np.load(args.data))
    results = [train_and_score(data, c, device) for c in (args.config or ["paper"])]
    rec = {"name": "codec_training", "kind": "recorded run", "date": dt.date.today().isoformat(),
           "command": "python benchmarks/codec_training_gpu.py " + " ".join(sys.argv[1:]), "device": name,
           "revision": revision(), "torch": torch.__version__, "machine": device_info(),
           "mask_smoothing_mm": float(data.get("mask_smoothing_mm", 0.0)),
           "targets_448": {"lungs": 0.97, "heart": 0.97, "ribs": 0.90}, "results": results}
    write_record(rec, "codec_training", args.out)

if __name__ == "__main__":
    main()
