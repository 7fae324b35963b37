"""``--orchestrator none``: a job run by the shard driver's plain loop, without Prefect.

The same stages as the Prefect flow (plan, read/infer/commit each pending shard, finalize), with
the same progress display; nothing here imports Prefect, so such a run starts in the time it takes
to load the model.
"""

from __future__ import annotations

from ossbatch.flows.progress import Progress
from ossbatch.pipeline.config import Job


def run_job_plain(job: Job, quiet: bool = False, progress_seconds: float | None = None) -> dict:
    """Runs ``job`` to the end in this process, showing its progress (see flows.progress);
    returns its manifest."""
    from ossbatch.pipeline.cost import record_cost
    from ossbatch.pipeline.driver import job_spec, run_job
    from ossbatch.pipeline.infer import ShardInferencer

    if job.options.runner != "local":
        from ossbatch.pipeline.storage import InputError

        raise InputError("--runner ray needs --orchestrator prefect (shards are Prefect tasks)")
    progress: list[Progress] = []
    infer = ShardInferencer(job)  # the model loads on the first pending shard, not for a finished job

    def report(event: dict) -> None:
        if event["event"] == "planned":
            progress.append(Progress(event["rows"], event["shards"], event["pending"], quiet=quiet,
                                     interval=progress_seconds))
            infer.on_progress = progress[0].rows_done
        else:
            progress[0].committed(event["marker"])

    try:
        manifest = run_job(job_spec(job), infer, report)
    finally:
        if progress:
            progress[0].close()
    return record_cost(manifest, job.options.cost, job.storage)
