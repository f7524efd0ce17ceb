"""Parameter sweeps: one notebook, many parameter sets and seeds, one table.

A sweep file (``notebooks/sweeps/NAME.yaml``)::

    notebook: notebooks/03_vlm_finetune.py   # the stage that varies
    profile: smoke                           # base parameters of every stage
    base: {train_steps: 200}                 # overrides shared by every cell
    grid: {image_size: [128, 224]}           # the cartesian product of these ...
    cases: []                                # ... or / and an explicit list of override dicts
    seeds: [0, 1, 2]                         # every cell runs once per seed
    metrics: [lung_dice, lung_box_acc50]     # keys of the stage's metrics.json to gather

Each cell runs in ``<run_dir>/sweeps/<NAME>/<cell>/``; the stages upstream of the
swept one are shared with the profile's run directory (run there once, linked
into every cell), so a sweep over the VLM does not re-project the CTs. The
gathered table is written to ``<run_dir>/sweeps/<NAME>/results.csv`` and
``summary.csv`` (mean, standard deviation and count over seeds per cell).
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from .pipeline import PROJECT_ROOT, read_metrics, stage_for_notebook, upstream_closure
from .runner import (
    ParameterError,
    Profile,
    execute_stage,
    load_profile,
    stage_parameters,
)


class SweepError(ValueError):
    """A sweep file that cannot be used."""


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str  # the file's stem
    path: Path  # the YAML file
    notebook: Path  # the swept notebook
    profile: Profile  # base profile
    cells: list[dict[str, Any]]  # one override dict per cell (seed excluded)
    seeds: list[int]  # seeds every cell runs with
    metrics: list[str]  # metrics gathered from each run


def _cell_name(overrides: dict[str, Any], seed: int) -> str:
    parts = [f"{k}={v}" for k, v in sorted(overrides.items())] + [f"seed={seed}"]
    name = ",".join(parts)
    return "".join(c if c.isalnum() or c in "=,._-" else "_" for c in name)[:150]


def load_sweep(path: str | Path) -> Sweep:
    """Parse and check a sweep file: every cell's parameters are validated here."""
    p = Path(path)
    if not p.exists():
        raise SweepError(f"{p}: no such sweep file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{p}: not valid YAML: {e}") from None
    unknown = set(raw) - {"notebook", "profile", "base", "grid", "cases", "seeds", "metrics", "description"}
    if unknown:
        raise SweepError(f"{p}: unknown keys {sorted(unknown)}")
    if "notebook" not in raw:
        raise SweepError(f"{p}: 'notebook' is required")
    nb = Path(raw["notebook"])
    nb = nb if nb.is_absolute() else PROJECT_ROOT / nb
    base = raw.get("base") or {}
    grid = raw.get("grid") or {}
    if not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"{p}: every 'grid' entry must be a non-empty list of values")
    cells = [dict(base, **dict(zip(grid, combo))) for combo in itertools.product(*grid.values())] if grid else []
    cells += [dict(base, **c) for c in (raw.get("cases") or [])]
    if not cells:
        cells = [dict(base)]
    seeds = raw.get("seeds") or [0]
    if not all(isinstance(s, int) for s in seeds):
        raise SweepError(f"{p}: 'seeds' must be a list of integers")
    metrics = raw.get("metrics") or []
    profile = load_profile(raw.get("profile", "smoke"))
    stage = stage_for_notebook(nb)
    for c in cells:
        if "seed" in c:
            raise SweepError(f"{p}: set seeds with 'seeds', not inside a cell")
        try:
            stage_parameters(stage, profile, c)
        except ParameterError as e:
            raise SweepError(f"{p}: {e}") from None
    return Sweep(p.stem, p.resolve(), nb, profile, cells, list(seeds), list(metrics))


def run_sweep(
    path: str | Path,
    *,
    run_dir: str | Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
):
    """Run every cell of a sweep (unchanged cells are reused) and gather the metrics.

    Returns a pandas DataFrame with one row per cell and seed: the overrides, the
    seed, the wall time and every metric (missing metrics are NaN). With
    ``dry_run`` only the plan is returned (no metrics).
    """
    import pandas as pd

    sw = load_sweep(path)
    stage = stage_for_notebook(sw.notebook)
    base_dir = Path(run_dir).resolve() if run_dir else sw.profile.run_dir
    sweep_dir = base_dir / "sweeps" / sw.name
    plan = [(c, s) for c in sw.cells for s in sw.seeds]
    if dry_run:
        return pd.DataFrame([{**c, "seed": s, "cell": _cell_name(c, s)} for c, s in plan])

    # Upstream stages run once, in the base run directory, with the profile's parameters.
    upstream: dict[str, dict[str, Any]] = {}
    for s in upstream_closure(stage)[:-1]:
        params = stage_parameters(s, sw.profile)
        r = execute_stage(s, params, base_dir, {u: upstream[u] for u in s.upstream}, profile=sw.profile.name, log=log)
        upstream[s.name] = r.provenance

    rows = []
    for i, (cell, seed) in enumerate(plan, 1):
        name = _cell_name(cell, seed)
        cell_dir = sweep_dir / name
        cell_dir.mkdir(parents=True, exist_ok=True)
        for u in upstream:
            link = cell_dir / u
            if not link.exists():
                os.symlink(base_dir / u, link, target_is_directory=True)
        log(f"[sweep {sw.name}] cell {i}/{len(plan)}: {name}")
        params = stage_parameters(stage, sw.profile, {**cell, "seed": seed})
        r = execute_stage(
            stage, params, cell_dir, {u: upstream[u] for u in stage.upstream}, force=force, profile=sw.profile.name, log=log
        )
        metrics = read_metrics(cell_dir, stage.name)
        rows.append({**cell, "seed": seed, "cell": name, "wall_time_s": r.wall_time_s, **{m: metrics.get(m) for m in sw.metrics}})
    table = pd.DataFrame(rows)
    table.to_csv(sweep_dir / "results.csv", index=False)
    keys = sorted({k for c in sw.cells for k in c})
    if sw.metrics:
        grouped = table.groupby(keys, dropna=False) if keys else table.groupby(lambda _: "all")
        summary = grouped[sw.metrics].agg(["mean", "std", "count"])
        summary.columns = [f"{m}_{stat}" for m, stat in summary.columns]
        summary.reset_index().to_csv(sweep_dir / "summary.csv", index=False)
    (sweep_dir / "sweep.json").write_text(
        json.dumps({"sweep": str(sw.path), "cells": sw.cells, "seeds": sw.seeds, "metrics": sw.metrics}, indent=2)
    )
    log(f"[sweep {sw.name}] results: {sweep_dir / 'results.csv'}")
    return table
