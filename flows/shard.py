"""One shard, start to end: read, infer, commit.  No Prefect here, so Ray actors
(and any other worker process) can import it without pulling Prefect in."""

import time

from ossbatch.flows.engine_spec import EngineSpec, inferencer
from ossbatch.pipeline.job import JobPlan, commit_shard, default_worker, read_shard


def run_one_shard(plan: JobPlan, shard_index: int, engine: EngineSpec, worker: str | None = None) -> dict:
    """Read, infer and commit one shard; returns its marker."""
    requests = read_shard(plan, shard_index)
    started = time.monotonic()
    results, stats = inferencer(engine)(requests)
    return commit_shard(plan, shard_index, results, stats, worker or default_worker(), time.monotonic() - started)
