"""``chexanatomy``: the command line, a thin layer over the Python API.

    chexanatomy run NOTEBOOK [--profile P] [-p key=value ...] [--force] [--run-dir DIR]
    chexanatomy book [--profile P] [--force] [--run-dir DIR] [--no-html]
    chexanatomy sweep notebooks/sweeps/NAME.yaml ... [--variant paper] [--record] [--run-dir DIR] [--dry-run] [--force]
    chexanatomy params NOTEBOOK [--profile P]
    chexanatomy record STAGE_DIR --name NAME [--figure F ...] [--note TEXT]
    chexanatomy manifest ROOT --out data_manifests/NAME.yaml
    chexanatomy synthesize --out DIR [--profile P] [-p key=value ...] [--shard i/n] [--device D] [--prefetch N]
    chexanatomy merge-shards DIR_0 DIR_1 ... --out DIR
    chexanatomy segment IMAGE --checkpoint DIR --structures "left lung;heart" [--out DIR]

Errors the user can fix (a wrong parameter, a missing file, a failed cell) are
printed as one message and exit with status 2; nothing else is swallowed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chexanatomy", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="execute one chapter (and the chapters it reads) with a profile")
    r.add_argument("notebook", help="notebooks/NN_stage.py or a stage name")
    r.add_argument("--profile", default="smoke", help="profile name or YAML path (default: smoke)")
    r.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="override a parameter of this notebook")
    r.add_argument("--run-dir", help="run directory (default: the profile's)")
    r.add_argument("--force", action="store_true", help="execute this chapter even if an equal run exists")
    r.add_argument("--force-upstream", action="store_true", help="also re-execute the chapters it reads")

    b = sub.add_parser("book", help="execute every chapter and build the HTML book")
    b.add_argument("--profile", default="smoke")
    b.add_argument("--run-dir")
    b.add_argument("--output", help="folder that receives _build/html (default: the project root)")
    b.add_argument("--force", action="store_true", help="re-execute every chapter")
    b.add_argument("--no-html", action="store_true", help="execute only; do not render")

    s = sub.add_parser("sweep", help="run parameter sweeps and gather their metrics")
    s.add_argument("sweep", nargs="+", help="notebooks/sweeps/NAME.yaml (several run one after another)")
    s.add_argument("--variant", help="the sweep file's variant (smoke, paper; default smoke where it has variants)")
    s.add_argument("--record", action="store_true", help="record each finished sweep under records/sweeps/")
    s.add_argument("--run-dir")
    s.add_argument("--force", action="store_true")
    s.add_argument("--dry-run", action="store_true", help="print the cells without running them")

    q = sub.add_parser("params", help="show a notebook's parameters as a profile would set them")
    q.add_argument("notebook")
    q.add_argument("--profile", default="smoke")

    c = sub.add_parser("record", help="record a finished chapter run, or every chapter of a run directory, under records/")
    c.add_argument("stage_dir", help="a chapter's folder (runs/paper/03_vlm_finetune) or a run directory (runs/gpu)")
    c.add_argument("--name", required=True, help="record name (a run directory's chapters: NAME.<stage>)")
    c.add_argument("--figure", action="append", help="small figure inside the stage folder to keep")
    c.add_argument("--figures", type=int, default=None,
                   help="keep this many figures of each executed notebook (default: 4 for a run directory, 0 for a chapter)")
    c.add_argument("--replace", action="store_true", help="replace records of the same name")
    c.add_argument("--note", default="")

    m = sub.add_parser("manifest", help="write a CT manifest for a folder with one sub-folder per case")
    m.add_argument("root", help="folder holding <case_id>/ct.nii.gz and <case_id>/segmentations")
    m.add_argument("--out", required=True, help="manifest YAML to write, e.g. data_manifests/mine.yaml")
    m.add_argument("--name", help="manifest name (default: the folder's name)")
    m.add_argument("--ct-name", default="ct.nii.gz")
    m.add_argument("--labels-name", default="segmentations")
    m.add_argument("--licence", default="state the terms your data is used under")
    m.add_argument("--checksums", action="store_true", help="record SHA-256 of every file")

    y = sub.add_parser("synthesize", help="render chapter 1's projected dataset, or one shard of it, outside the book")
    y.add_argument("--out", required=True, help="dataset folder to write")
    y.add_argument("--profile", default="smoke", help="profile whose chapter-1 parameters to use (default: smoke)")
    y.add_argument("-p", "--param", action="append", metavar="KEY=VALUE", help="override a chapter-1 parameter")
    y.add_argument("--shard", metavar="i/n", help="render only deformed copies k with k %% n == i (0 <= i < n)")
    y.add_argument("--device", help="cpu, cuda or auto (default: the chapter's parameter)")
    y.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    y.add_argument("--prefetch", type=_count, metavar="N",
                   help="deformed copies whose CT and working volume a background thread prepares while one "
                        "renders, the writing also in a thread of its own (default 1; 0: one step after "
                        "another); the dataset is the same either way. Not with --executor (its jobs use 1)")
    y.add_argument("--executor", choices=("local", "slurm"),
                   help="render --shards jobs through submitit (SLURM jobs or local processes) and merge them")
    y.add_argument("--shards", type=int, default=2, help="jobs of --executor (default 2)")
    y.add_argument("--partition", help="SLURM partition of each job")
    y.add_argument("--time", type=int, default=60, metavar="MIN", help="time limit of each job (minutes)")
    y.add_argument("--mem", type=float, default=16.0, metavar="GB", help="memory of each job")
    y.add_argument("--cpus", type=int, default=4, help="CPU cores of each job")
    y.add_argument("--gpus", type=int, default=0, help="GPUs of each job (set device with -p device=cuda)")
    y.add_argument("--log-dir", help="submitit's folder for job logs (default: <out>.jobs)")

    j = sub.add_parser("merge-shards", help="merge datasets written by synthesize --shard i/n into one")
    j.add_argument("shards", nargs="+", help="shard dataset folders")
    j.add_argument("--out", required=True, help="merged dataset folder to write")
    j.add_argument("--overwrite", action="store_true")

    g = sub.add_parser("segment", help="segment structures on any chest radiograph with a trained checkpoint")
    g.add_argument("image", help="PNG, JPEG or DICOM file, or a folder of them (one CSV row per file)")
    g.add_argument("--checkpoint", required=True, help="checkpoint folder (VLM or U-Net) with model_card.json")
    g.add_argument("--structures", required=True, help='e.g. "left lung;heart"')
    g.add_argument("--out", default="segment_out", help="output folder (masks, overlay, JSON; DICOM-SEG for DICOM input)")
    g.add_argument("--device", default="auto")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:  # outside a chapter (a chapter's own interruption is a StageInterruptedError)
        print(f"chexanatomy {args.command}: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"chexanatomy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        # Every error class this package defines is written for the user: print its
        # message alone. Anything else is a bug and keeps its traceback.
        if type(e).__module__.startswith("chexanatomy_lib"):
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            interrupted = type(e).__name__ == "StageInterruptedError"
            print(f"chexanatomy {args.command}: {'' if interrupted else 'error: '}{msg}", file=sys.stderr)
            return 130 if interrupted else 2
        raise


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from .runner import parse_assignments, run_stage

        results = run_stage(
            args.notebook,
            args.profile,
            run_dir=args.run_dir,
            overrides=parse_assignments(args.param),
            force=args.force,
            force_upstream=args.force_upstream,
        )
        print(f"executed notebook: {results[-1].directory / (results[-1].stage + '.ipynb')}")
    elif args.command == "book":
        from .book import build_book

        res = build_book(args.profile, run_dir=args.run_dir, output=args.output, force=args.force, html=not args.no_html)
        if res.html_dir:
            print(f"book: {res.html_dir / 'index.html'}")
    elif args.command == "sweep":
        from .records import record_sweep
        from .sweep import load_sweep, run_sweep, sweep_directory

        for f in args.sweep:  # every file is checked before the first cell runs
            load_sweep(f, args.variant)
        for f in args.sweep:
            table = run_sweep(f, variant=args.variant, run_dir=args.run_dir, force=args.force, dry_run=args.dry_run)
            print(table.to_string(index=False))
            if args.record and not args.dry_run:
                print(f"recorded: {record_sweep(sweep_directory(f, args.variant, args.run_dir))}")
    elif args.command == "params":
        from .pipeline import stage_for_notebook
        from .runner import load_profile, stage_parameters

        prof = load_profile(args.profile)
        params = stage_parameters(stage_for_notebook(args.notebook), prof)
        print(json.dumps(params, indent=2))
    elif args.command == "record":
        from .records import record_run, record_stage_run

        target = Path(args.stage_dir)
        if (target / "provenance.json").is_file():
            out = record_stage_run(target, args.name, note=args.note, figures=args.figure, replace=args.replace,
                                   notebook_figures_limit=args.figures or 0)
            print(f"recorded: {out}")
        else:
            for out in record_run(target, args.name, note=args.note, replace=args.replace,
                                  figures=4 if args.figures is None else args.figures):
                print(f"recorded: {out}")
    elif args.command == "manifest":
        from .ct.manifest import scan_case_folders, write_manifest

        root = Path(args.root).resolve()
        cases = scan_case_folders(root, args.ct_name, args.labels_name, checksums=args.checksums)
        out = write_manifest(args.out, cases, args.name or root.name, str(root), licence=args.licence)
        print(f"{out}: {len(cases)} cases ({sum('labels' in c for c in cases)} with labels)")
    elif args.command == "synthesize":
        from .ct.manifest import load_manifest
        from .ct.synthesis import synthesis_arguments, synthesize_dataset
        from .pipeline import PROJECT_ROOT, STAGES
        from .runner import load_profile, parse_assignments, stage_parameters

        overrides = parse_assignments(args.param)
        if args.device:
            overrides["device"] = args.device
        params = stage_parameters(STAGES["01_ct_projection"], load_profile(args.profile), overrides)
        manifest = Path(params["manifest"])
        if not manifest.is_absolute() and not manifest.exists():
            manifest = PROJECT_ROOT / manifest  # as the chapter reads it
        if args.executor:
            from .cluster import JobResources, synthesize_on_executor

            if args.shard:
                raise ShardError("--shard renders one shard here; --executor renders them all as jobs: use one")
            if args.prefetch not in (None, 1):
                raise ShardError("--prefetch applies to a render here; the jobs of --executor use prefetch 1")
            out = synthesize_on_executor(
                manifest, params, args.out, args.shards, executor=args.executor, log_dir=args.log_dir,
                overwrite=args.overwrite,
                resources=JobResources(timeout_min=args.time, mem_gb=args.mem, cpus_per_task=args.cpus,
                                       gpus_per_node=args.gpus, partition=args.partition))
            print(f"dataset: {out} ({args.shards} {args.executor} jobs, merged)")
            return 0
        shard = parse_shard(args.shard) if args.shard else None
        out = synthesize_dataset(load_manifest(manifest), args.out, shard=shard, overwrite=args.overwrite,
                                 prefetch=1 if args.prefetch is None else args.prefetch,
                                 **synthesis_arguments(params))
        print(f"dataset: {out}" + (f" (shard {shard[0]}/{shard[1]})" if shard else ""))
    elif args.command == "merge-shards":
        from .ct.dataset import ProjectedDataset, merge_shards

        out = merge_shards(args.shards, args.out, overwrite=args.overwrite)
        print(f"dataset: {out} ({len(ProjectedDataset(out))} images from {len(args.shards)} shards)")
    elif args.command == "segment":
        from .segment import main_segment

        main_segment(args.image, args.checkpoint, args.structures, args.out, device=args.device)
    return 0


def _count(text: str) -> int:
    """An integer >= 0 for argparse (anything else: a usage error that says so)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return n


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``; anything else is a :class:`ShardError` saying so."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ShardError(f"--shard must be i/n with integers, e.g. 0/4; got {text!r}") from None
    if not 0 <= i < n:
        raise ShardError(f"--shard i/n needs 0 <= i < n; got {text!r}")
    return i, n


class ShardError(ValueError):
    """A malformed ``--shard`` value."""


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
