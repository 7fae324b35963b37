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
    release_output,
)
from ossbatch.pipeline.storage import InputError, StorageError, storage_error

# A store that stops answering mid-job (an endpoint gone, a network cut) is retried this many
# times, waiting RETRY_FIRST_WAIT_SECONDS and doubling; then the run stops with one line. What
# was committed stays, and re-running the command resumes from there.
STORE_ATTEMPTS = 4
RETRY_FIRST_WAIT_SECONDS = 2.0

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
        error_output=job.options.error_output,
        model_fingerprint=checkpoint_fingerprint(job.model) | {"config": config.to_hf_json()},
        settings=job.options.identity(),
    )


def _unreachable(err: BaseException) -> bool:
    """An error of a store that did not answer (worth a retry), not one that answered no."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    names = {cls.__name__ for cls in type(err).__mro__}
    # botocore's and aiohttp's connection errors are not OSErrors; named so as not to import them.
    return bool(names & {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError",
                         "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
                         "ClientOSError", "ServerTimeoutError"})


def with_store_retries(action: Callable, plan: JobPlan, doing: str):
    """``action()``, retried with backoff while the store does not answer; then StorageError."""
    wait = RETRY_FIRST_WAIT_SECONDS
    for attempt in range(1, STORE_ATTEMPTS + 1):
        try:
            return action()
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001 - sorted below
            if not _unreachable(err):
                if isinstance(err, OSError):
                    raise storage_error(err, plan.output, doing) from err
                raise
            if attempt == STORE_ATTEMPTS:
                raise StorageError(
                    f"{doing} {plan.output}: the store stopped answering ({str(err).strip()[:200]}) after "
                    f"{STORE_ATTEMPTS} attempts; the shards committed so far are kept: re-run the same command "
                    "to resume") from err
            time.sleep(wait)
            wait *= 2


def run_shards(plan: JobPlan, shards: list[int], infer_shard: InferShard, worker: str | None = None,
               on_commit: OnCommit | None = None) -> list[dict]:
    """Read, infer and commit ``shards`` of ``plan`` in order, reading each next shard ahead;
    returns their markers. A read error surfaces when that shard's turn comes."""
    worker = worker or default_worker()
    markers = []

    def read(shard_index: int) -> list[dict]:
        return with_store_retries(lambda: read_shard(plan, shard_index), plan, f"reading shard {shard_index} for")

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ossbatch-read") as reader:
        upcoming = reader.submit(read, shards[0]) if shards else None
        for position, shard_index in enumerate(shards):
            requests = upcoming.result()
            if position + 1 < len(shards):
                upcoming = reader.submit(read, shards[position + 1])
            started = time.monotonic()
            results, stats = infer_shard(requests)
            seconds = time.monotonic() - started
            markers.append(with_store_retries(
                lambda: commit_shard(plan, shard_index, results, stats, worker, seconds), plan,
                f"committing shard {shard_index} to"))
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
    plan = plan_job(spec)  # holds the output's lease until finalize_job (or a failure) releases it
    try:
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
        return with_store_retries(lambda: finalize_job(plan, time.monotonic() - started), plan, "finalizing")
    finally:
        release_output(plan)  # a no-op after finalize; after a failure, the next run need not wait
