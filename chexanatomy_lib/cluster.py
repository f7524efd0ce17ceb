"""Synthesis of a CT cohort across a cluster, through submitit (SLURM) or local processes.

``chexanatomy synthesize --executor slurm --shards N`` submits one job per shard of
chapter 1's dataset (deformed copies ``k`` with ``k % N == i``), waits for all of them
and merges the shards into one dataset, equal to the one the chapter renders itself;
``--executor local`` runs the same jobs as local processes (a workstation, a test).
submitit writes each job's log, pickled call and result under ``--log-dir``; a failed
job is reported with its shard and its log, and nothing is merged.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

EXECUTORS = ("local", "slurm")


class ClusterError(RuntimeError):
    """A cluster run that cannot start or did not finish; the message names the shard and its log."""


@dataclass(frozen=True)
class JobResources:
    """What each shard's job asks for. ``partition`` applies to SLURM only."""

    timeout_min: int = 60
    mem_gb: float = 16.0
    cpus_per_task: int = 4
    gpus_per_node: int = 0
    partition: str | None = None


def render_shard(manifest: str, out: str, shard: tuple[int, int], params: dict[str, Any]) -> str:
    """One job: render shard ``shard`` of chapter 1's dataset with ``params`` (chapter 1's
    parameters) into ``out``. Runs in the job's process; returns ``out``."""
    from .ct.manifest import load_manifest
    from .ct.synthesis import synthesis_arguments, synthesize_dataset

    synthesize_dataset(load_manifest(manifest), out, shard=shard, overwrite=True, progress=False,
                       **synthesis_arguments(params))
    return out


def make_executor(kind: str, log_dir: str | Path, resources: JobResources):
    """A submitit executor (``"local"`` processes or ``"slurm"`` jobs) with ``resources``."""
    import submitit

    if kind not in EXECUTORS:
        raise ClusterError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    executor = submitit.AutoExecutor(folder=str(log_dir), cluster=kind)
    options: dict[str, Any] = {"timeout_min": int(resources.timeout_min), "mem_gb": float(resources.mem_gb),
                               "cpus_per_task": int(resources.cpus_per_task), "name": "chexanatomy-synthesize"}
    if resources.gpus_per_node:
        options["gpus_per_node"] = int(resources.gpus_per_node)
    if kind == "slurm" and resources.partition:
        options["slurm_partition"] = resources.partition
    executor.update_parameters(**options)
    return executor


def synthesize_on_executor(manifest: str | Path, params: dict[str, Any], out: str | Path, shards: int,
                           executor: str = "local", resources: JobResources | None = None,
                           log_dir: str | Path | None = None, overwrite: bool = False,
                           log: Callable[[str], None] = print) -> Path:
    """Render chapter 1's dataset in ``shards`` jobs on ``executor`` and merge it into ``out``.

    manifest: the CT manifest; params: chapter 1's parameters (a profile's, see
    ``chexanatomy synthesize``); log_dir: submitit's folder (default ``<out>.jobs``).
    The shard datasets are written beside ``out`` (``<out>.shards/``) and removed once
    merged. Returns ``out``.
    """
    from .ct.dataset import merge_shards

    out = Path(out).resolve()
    if int(shards) < 1:
        raise ClusterError(f"--shards must be at least 1, got {shards}")
    if out.exists() and not overwrite:
        raise ClusterError(f"{out}: exists; pass --overwrite to replace it")
    jobs_dir = Path(log_dir).resolve() if log_dir else out.with_name(out.name + ".jobs")
    parts = out.with_name(out.name + ".shards")
    ex = make_executor(executor, jobs_dir, resources or JobResources())
    targets = [str(parts / f"shard_{i:03d}_of_{shards:03d}") for i in range(shards)]
    with ex.batch():
        jobs = [ex.submit(render_shard, str(manifest), t, (i, int(shards)), dict(params))
                for i, t in enumerate(targets)]
    log(f"submitted {len(jobs)} {executor} jobs (logs: {jobs_dir})")
    failed = []
    for i, job in enumerate(jobs):
        try:
            job.result()
        except Exception as err:  # noqa: BLE001  NOTE: submitit re-raises the job's own error, of any type
            failed.append(f"shard {i}/{shards} (job {job.job_id}, log {job.paths.stderr}): "
                          f"{str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}")
        else:
            log(f"shard {i}/{shards} done")
    if failed:
        raise ClusterError("jobs failed, nothing merged:\n  " + "\n  ".join(failed))
    merged = merge_shards(targets, out, overwrite=overwrite)
    shutil.rmtree(parts, ignore_errors=True)
    return Path(merged)
