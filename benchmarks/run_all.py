"""Run every benchmark in this folder (``bench_*.py``), one process each.

    .venv/bin/python benchmarks/run_all.py [NAME ...]

Each benchmark prints its table and writes a JSON record with the machine, the
command and the date to ``records/benchmarks/``. Run on an otherwise idle
machine: the numbers are wall-clock throughput.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if s.stem in names or s.stem.removeprefix("bench_") in names]
        if not scripts:
            print(f"no benchmark named {names}; have: {[s.stem for s in sorted(HERE.glob('bench_*.py'))]}")
            return 2
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    failed = []
    for s in scripts:
        print(f"== {s.name}", flush=True)
        if s.stem.endswith("_gpu") and not has_cuda:
            print("skipped: needs a CUDA device (its recorded results are in records/benchmarks/)")
            continue
        if subprocess.run([sys.executable, str(s)], cwd=HERE.parent).returncode != 0:
            failed.append(s.name)
    if failed:
        print(f"failed: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
