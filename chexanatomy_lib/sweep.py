"""Parameter sweeps: one notebook, many parameter sets and seeds, one table.

A sweep file (``notebooks/sweeps/NAME.yaml``)::

    notebook: notebooks/03_vlm_finetune.py   # the stage that varies
    profile: smoke                           # base parameters of every stage
    base: {train_steps: 200}                 # overrides shared by every cell
    grid: {image_size: [128, 224]}           # the cartesian product of these ...
    cases: []                                # ... or / and an explicit list of override dicts
    seeds: [0, 1, 2]                         # every cell runs once per seed
    metrics: [lung_dice, lung_box_acc50]     # keys of the stage's metrics.json to gather
    per_image: test_scores.csv               # optional: a per-image table in the stage folder to gather
    requires: [03_vlm_finetune]              # optional: stages run once in the base run directory first
    variants:                                # optional: named variants, each overriding the keys above
      smoke: {grid: {model: [tiny, small]}}
      paper: {profile: paper, grid: {model: [google/paligemma2-3b-pt-224]}}

A string override may hold ``{base_run_dir}``: the base run directory, so that a
cell can start from what a required stage wrote there (chapter 3's saved model).

Each cell runs in ``<run_dir>/sweeps/<NAME>/<cell>/`` (cells are named by the
values that vary, ``model=small,seed=1``); the stages upstream of the swept one
are shared with the profile's run directory (run there once, linked into every
cell), so a sweep over the VLM does not re-project the CTs. The gathered table is
written to ``<run_dir>/sweeps/<NAME>/results.csv``, ``summary.csv`` (mean,
standard deviation and count over seeds per cell), ``per_image.csv`` (every
cell's per-image table, with the cell's values and seed) and ``sweep.json`` (the
plan, the device, the revision and the command); :func:`chexanatomy_lib.records.record_sweep`
copies them to ``records/sweeps/``.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

from .pipeline import PROJECT_ROOT, STAGES, read_metrics, stage_for_notebook, upstream_closure
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
    variant: str | None = None  # the variant chosen (None: the file has none)
    varied: tuple[str, ...] = ()  # parameters that differ between cells (grid and case keys)
    per_image: str | None = None  # per-image table (in the stage folder) gathered from each cell
    requires: tuple[str, ...] = ()  # stages run in the base run directory before the cells
    description: str = ""

    @property
    def record_name(self) -> str:
        """Name of the sweep's record: the file's stem, with the variant unless it is smoke."""
        return self.name if self.variant in (None, "smoke") else f"{self.name}.{self.variant}"


def _cell_name(overrides: dict[str, Any], seed: int) -> str:
    def show(v: Any) -> str:
        return "-".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    parts = [f"{k}={show(v)}" for k, v in sorted(overrides.items())] + [f"seed={seed}"]
    name = ",".join(parts)
    return "".join(c if c.isalnum() or c in "=,._-" else "_" for c in name)[:150]


SWEEP_KEYS = {"notebook", "profile", "base", "grid", "cases", "seeds", "metrics", "description", "per_image",
              "requires", "variants"}


def load_sweep(path: str | Path, variant: str | None = None) -> Sweep:
    """Parse and check a sweep file: every cell's parameters are validated here.

    ``variant``: one of the file's ``variants`` (default: ``smoke`` where the file has
    variants); a file without variants accepts only None.
    """
    p = Path(path)
    if not p.exists():
        raise SweepError(f"{p}: no such sweep file")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise SweepError(f"{p}: not valid YAML: {e}") from None
    unknown = set(raw) - SWEEP_KEYS
    if unknown:
        raise SweepError(f"{p}: unknown keys {sorted(unknown)}")
    variants = raw.pop("variants", None) or {}
    if variants:
        variant = variant or "smoke"
        if variant not in variants:
            raise SweepError(f"{p}: no variant {variant!r}; the file has {sorted(variants)}")
        extra = variants[variant] or {}
        bad = set(extra) - (SWEEP_KEYS - {"variants", "notebook"})
        if bad:
            raise SweepError(f"{p}: variant {variant!r} has unknown keys {sorted(bad)}")
        raw = {**raw, **extra}
    elif variant is not None:
        raise SweepError(f"{p}: the file has no variants (asked for {variant!r})")
    if "notebook" not in raw:
        raise SweepError(f"{p}: 'notebook' is required")
    nb = Path(raw["notebook"])
    nb = nb if nb.is_absolute() else PROJECT_ROOT / nb
    base = raw.get("base") or {}
    grid = raw.get("grid") or {}
    if not all(isinstance(v, list) and v for v in grid.values()):
        raise SweepError(f"{p}: every 'grid' entry must be a non-empty list of values")
    cases = raw.get("cases") or []
    cells = [dict(base, **dict(zip(grid, combo))) for combo in itertools.product(*grid.values())] if grid else []
    cells += [dict(base, **c) for c in cases]
    if not cells:
        cells = [dict(base)]
    varied = tuple(dict.fromkeys([*grid, *(k for c in cases for k in c)]))
    seeds = raw.get("seeds") or [0]
    if not all(isinstance(s, int) for s in seeds):
        raise SweepError(f"{p}: 'seeds' must be a list of integers")
    metrics = raw.get("metrics") or []
    profile = load_profile(raw.get("profile", "smoke"))
    stage = stage_for_notebook(nb)
    requires = tuple(raw.get("requires") or ())
    for r in requires:
        if r not in STAGES:
            raise SweepError(f"{p}: 'requires' names an unknown stage {r!r}")
    for c in cells:
        if "seed" in c:
            raise SweepError(f"{p}: set seeds with 'seeds', not inside a cell")
        try:
            stage_parameters(stage, profile, c)
        except ParameterError as e:
            raise SweepError(f"{p}: {e}") from None
    return Sweep(p.stem, p.resolve(), nb, profile, cells, list(seeds), list(metrics), variant=variant,
                 varied=varied, per_image=raw.get("per_image"), requires=requires,
                 description=str(raw.get("description", "")))


def _resolve(cell: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Fill ``{base_run_dir}`` in a cell's string values."""
    return {k: v.replace("{base_run_dir}", str(base_dir)) if isinstance(v, str) else v for k, v in cell.items()}


def run_sweep(
    path: str | Path,
    *,
    variant: str | None = None,
    run_dir: str | Path | None = None,
    force: bool = False,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
):
    """Run every cell of a sweep (unchanged cells are reused) and gather the metrics.

    Returns a pandas DataFrame with one row per cell and seed: the varied values, the
    seed, the wall time and every metric (missing metrics are NaN). With
    ``dry_run`` only the plan is returned (no metrics).
    """
    import time

    import pandas as pd

    from . import provenance as prov

    sw = load_sweep(path, variant)
    stage = stage_for_notebook(sw.notebook)
    base_dir = Path(run_dir).resolve() if run_dir else sw.profile.run_dir
    sweep_dir = base_dir / "sweeps" / sw.name
    plan = [(c, s) for c in sw.cells for s in sw.seeds]

    def shown(cell: dict[str, Any]) -> dict[str, Any]:
        return {k: cell[k] for k in sw.varied}

    if dry_run:
        return pd.DataFrame([{**c, "seed": s, "cell": _cell_name(shown(c), s)} for c, s in plan])

    started = time.perf_counter()
    # Upstream and required stages run once, in the base run directory, with the profile's parameters.
    upstream: dict[str, dict[str, Any]] = {}
    needed = list(dict.fromkeys([*(u.name for u in upstream_closure(stage)[:-1]),
                                 *(x.name for r in sw.requires for x in upstream_closure(STAGES[r]))]))
    for s in (STAGES[n] for n in STAGES if n in needed):
        params = stage_parameters(s, sw.profile)
        r = execute_stage(s, params, base_dir, {u: upstream[u] for u in s.upstream}, profile=sw.profile.name, log=log)
        upstream[s.name] = r.provenance

    rows, per_image = [], []
    for i, (cell, seed) in enumerate(plan, 1):
        name = _cell_name(shown(cell), seed)
        cell_dir = sweep_dir / name
        cell_dir.mkdir(parents=True, exist_ok=True)
        for u in stage.upstream:
            link = cell_dir / u
            if not link.exists():
                os.symlink(base_dir / u, link, target_is_directory=True)
        log(f"[sweep {sw.name}] cell {i}/{len(plan)}: {name}")
        params = stage_parameters(stage, sw.profile, {**_resolve(cell, base_dir), "seed": seed})
        r = execute_stage(
            stage, params, cell_dir, {u: upstream[u] for u in stage.upstream}, force=force, profile=sw.profile.name, log=log
        )
        metrics = read_metrics(cell_dir, stage.name)
        values = {k: _show_value(v) for k, v in shown(cell).items()}
        rows.append({**values, "seed": seed, "cell": name, "wall_time_s": r.wall_time_s,
                     **{m: metrics.get(m) for m in sw.metrics}})
        if sw.per_image:
            f = cell_dir / stage.name / sw.per_image
            if not f.is_file():
                raise SweepError(f"{f}: the cell wrote no per-image table {sw.per_image!r}")
            per_image.append(pd.read_csv(f).assign(**values, seed=seed, cell=name))
    table = pd.DataFrame(rows)
    table.to_csv(sweep_dir / "results.csv", index=False)
    keys = list(sw.varied)
    if sw.metrics:
        grouped = table.groupby(keys, dropna=False, sort=False) if keys else table.groupby(lambda _: "all")
        summary = grouped[sw.metrics].agg(["mean", "std", "count"])
        summary.columns = [f"{m}_{stat}" for m, stat in summary.columns]
        summary.reset_index().to_csv(sweep_dir / "summary.csv", index=False)
    if per_image:
        pd.concat(per_image, ignore_index=True).to_csv(sweep_dir / "per_image.csv", index=False)
    git = prov.git_revision()
    (sweep_dir / "sweep.json").write_text(json.dumps({
        "name": sw.record_name, "sweep": _project_path(sw.path),
        "description": sw.description, "variant": sw.variant, "notebook": _project_path(stage.notebook),
        "profile": sw.profile.name, "varied": keys, "cells": [_resolve(c, base_dir) for c in sw.cells],
        "seeds": sw.seeds, "metrics": sw.metrics, "per_image": sw.per_image,
        "device": prov.device_info(), "revision": git.get("revision"), "dirty": git.get("dirty"),
        "versions": prov.package_versions(), "command": prov.command_line(),
        "wall_time_s": round(time.perf_counter() - started, 1),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }, indent=2, default=str))
    log(f"[sweep {sw.name}] results: {sweep_dir / 'results.csv'}")
    return table


def _project_path(p: Path) -> str:
    return str(p.relative_to(PROJECT_ROOT) if p.is_relative_to(PROJECT_ROOT) else p)


def _show_value(v: Any) -> Any:
    """A varied value as it appears in the gathered tables (lists joined, paths shortened)."""
    if isinstance(v, (list, tuple)):
        return "-".join(map(str, v))
    return v


def sweep_directory(path: str | Path, variant: str | None = None, run_dir: str | Path | None = None) -> Path:
    """Where :func:`run_sweep` writes the sweep of file ``path``."""
    sw = load_sweep(path, variant)
    base_dir = Path(run_dir).resolve() if run_dir else sw.profile.run_dir
    return base_dir / "sweeps" / sw.name
