"""Where the GPU benchmark scripts write their records (shared by them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def revision() -> str:
    """The code's revision: ``$BENCH_REVISION`` (set it where the tree travels without
    ``.git``, e.g. to a GPU machine), else ``git rev-parse`` of this checkout."""
    if os.environ.get("BENCH_REVISION"):
        return os.environ["BENCH_REVISION"]
    from chexanatomy_lib.provenance import git_revision

    return str(git_revision(ROOT).get("revision") or "")


def device_tag(device_name: str) -> str:
    """``"h100"``, ``"h200"``, or ``"gpu"`` / ``"cpu"`` for anything else."""
    for tag in ("H100", "H200"):
        if tag in device_name:
            return tag.lower()
    return "cpu" if device_name == "cpu" else "gpu"


def write_record(record: dict, stem: str, out: str | None = None) -> Path:
    """Write ``record`` to ``out`` (default ``records/benchmarks/<stem>_<device tag>.json``)
    and, when ``$OUT`` is set, a copy there; returns the path."""
    path = Path(out) if out else ROOT / "records" / "benchmarks" / f"{stem}_{device_tag(record['device'])}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2)
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(text)
    print(f"wrote {path}")
    return path
