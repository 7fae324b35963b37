"""The shard driver: read ahead, infer, commit. The one loop every way of running a job goes through.

`run_shards` runs a list of a plan's shards: while the engine infers one, a thread reads and
validates the next (from object storage that is mostly waiting on the network), and each shard's
results are committed before the next is inferred. `run_job` plans, drives every pending shard and
finalizes (``--orchestrator none``); the Prefect flow gives each shard task, and the Ray runner each
actor, its shards through the same `run_shards`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ossbatch.pipeline.config import Job
from ossbatch.pipeline.job import (
    JobPlan, JobSpec, commit_shard, default_worker, finalize_job, pending_shards, plan_job, read_shard,
)

InferShard = Callable[[list[dict]], tuple[list[dict], dict]]  # requests -> (results, stats)
OnCommit = Callable[[dict, float], None]  # (marker, seconds) after each commit


def job_spec(job: Job) -> JobSpec:
    """What the planner needs of a job: its inputs, output, storage and identity (the model's
    content hash and the settings that change outputs). Refuses a bad model before any work."""
    from ossbatch.engine.config import read_config
    from ossbatch.engine.weights import checkpoint_fingerprint

    config = read_config(job.model)
    return JobSpec(
        inputs=list(job.inputs),
        output=job.output,
        storage=job.storage,
        shard_rows=job.options.shard_rows,
        overwrite=job.options.overwrite,
        model_fingerprint=checkpoint_fingerprint(job.model) | {"config": config.to_hf_json()},
        settings=job.options.identity(),
    )


def run_shards(plan: JobPlan, shards: list[int], infer_shard: InferShard, worker: str | None = None,
               on_commit: OnCommit | None = None) -> list[dict]:
    """Read, infer and commit ``shards`` of ``plan`` in order, reading each next shard ahead;
    returns their markers. A read error surfaces when that shard's turn comes."""
    worker = worker or default_worker()
    markers = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ossbatch-read") as reader:
        upcoming = reader.submit(read_shard, plan, shards[0]) if shards else None
        for position, shard_index in enumerate(shards):
            requests = upcoming.result()
            if position + 1 < len(shards):
                upcoming = reader.submit(read_shard, plan, shards[position + 1])
            started = time.monotonic()
            results, stats = infer_shard(requests)
            seconds = time.monotonic() - started
            markers.append(commit_shard(plan, shard_index, results, stats, worker, seconds))
            if on_commit:
                on_commit(markers[-1], seconds)
    return markers


def run_shard(plan: JobPlan, shard_index: int, infer_shard: InferShard, worker: str | None = None) -> dict:
    """One shard (a Prefect task's or a Ray actor's unit of work); its marker."""
    return run_shards(plan, [shard_index], infer_shard, worker)[0]


def run_job(spec: JobSpec, infer_shard: InferShard, progress: Callable[[dict], None] | None = None,
            worker: str | None = None) -> dict:
    """Plan, run every pending shard through ``infer_shard`` and commit it, finalize; the manifest.

    ``progress`` receives dicts: {"event": "planned", "shards", "pending", "rows"} once, then
    {"event": "committed", "shard", "rows", "seconds", "done", "shards", "marker"} after each commit.
    A job that already finished is not redone: its manifest is returned as it is.
    """
    started = time.monotonic()
    plan = plan_job(spec)
    pending = pending_shards(plan)
    if progress:
        progress({"event": "planned", "shards": plan.num_shards, "pending": len(pending), "rows": plan.total_rows})
    done = plan.num_shards - len(pending)

    def committed(marker: dict, seconds: float) -> None:
        nonlocal done
        done += 1
        if progress:
            progress({"event": "committed", "shard": marker["shard"], "rows": marker["rows"], "seconds": seconds,
                      "done": done, "shards": plan.num_shards, "marker": marker})

    run_shards(plan, pending, infer_shard, worker, committed)
    return finalize_job(plan, time.monotonic() - started)
