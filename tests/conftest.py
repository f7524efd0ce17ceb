"""Shared fixtures.

``smoke_run`` executes every chapter once with the smoke profile and builds the
HTML book from those executions (warnings are errors). Every test that needs a
chapter's output reads it from there, so no notebook runs twice in one test run.
Set ``CHEXANATOMY_SMOKE_RUN=DIR`` to reuse an existing run directory instead
(unchanged chapters are then reused, changed ones executed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:  # lets tests import shared helpers such as ct_phantoms
    sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    from chexanatomy_lib.book import build_book

    given = os.environ.get("CHEXANATOMY_SMOKE_RUN")
    run_dir = Path(given).resolve() if given else tmp_path_factory.mktemp("smoke_run")
    output = run_dir / "_html"
    return build_book("smoke", run_dir=run_dir, output=output, progress=False)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "smoke_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.book)
