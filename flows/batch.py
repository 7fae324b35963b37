"""`batch_inference`: the flow `ossbatch run` runs (and label/synth/eval run as a subflow).

plan shards -> one task per pending shard (pipeline.driver: read, infer, commit;
retried) -> finalize the manifest.  Prefect keeps state and retries; the stages
are pipeline functions, so the same job also runs without Prefect.
"""

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NONE

from ossbatch.flows.progress import Progress
from ossbatch.pipeline.config import Job
from ossbatch.pipeline.cost import record_cost
from ossbatch.pipeline.driver import job_spec, run_shard
from ossbatch.pipeline.infer import ShardInferencer
from ossbatch.pipeline.job import JobPlan, finalize_job, pending_shards, plan_job, releasing_output

__all__ = ["batch_inference", "shard_task"]


@task(name="run-shard", retries=2, retry_delay_seconds=1, cache_policy=NONE)
def shard_task(plan: JobPlan, shard_index: int, infer: ShardInferencer) -> dict:
    # run_shard is looked up here at call time, so tests can make it fail.
    return run_shard(plan, shard_index, infer)


def _progress_artifact(plan: JobPlan, rows_to_do: int):
    """Publishes the share of this run's rows done (the terminal's counts) as the flow run's
    progress artifact."""
    logger = get_run_logger()

    def percent(done: int, total: int) -> float:
        return round(100.0 * done / total, 2) if total else 100.0

    try:
        artifact_id = create_progress_artifact(
            progress=percent(0, rows_to_do),
            description=f"rows of {plan.output} done in this run ({rows_to_do} of {plan.total_rows} to do, "
                        f"{plan.num_shards} shards)",
        )
    except Exception as err:  # progress is a nicety: never fail a job over it
        logger.warning("no progress artifact: %s", err)
        return None

    def publish(done: int, total: int) -> None:
        try:
            update_progress_artifact(artifact_id, progress=percent(done, total))
        except Exception as err:
            logger.warning("progress artifact not updated: %s", err)

    return publish


@flow(name="batch-inference", log_prints=True)
def batch_inference(job: Job, quiet: bool = False, progress_seconds: float | None = None) -> dict:
    """Runs ``job`` (its storage options show as ********** among the flow run's parameters).
    Progress shows on a terminal, or as a log line every ``progress_seconds`` (default 30), and
    in the flow run's progress artifact. Returns the manifest."""
    started = time.monotonic()
    plan = plan_job(job_spec(job))  # holds the output's lease until finalize_job releases it
    with releasing_output(plan):  # or until the flow fails: the next run need not wait for it to lapse
        pending = pending_shards(plan)
        rows_to_do = sum(plan.shards[i]["rows"] for i in pending)
        logger = get_run_logger()
        progress = Progress(plan.total_rows, plan.num_shards, len(pending), quiet=quiet, rows_to_do=rows_to_do,
                            publish=_progress_artifact(plan, rows_to_do), interval=progress_seconds,
                            emit=lambda line: logger.info("%s", line))
        logger.info("%d shards, %d pending, %d rows", plan.num_shards, len(pending), plan.total_rows)
        try:
            if job.options.runner == "ray":
                from ossbatch.flows.ray_runner import run_shards_on_ray

                run_shards_on_ray(plan, pending, job, progress)
            else:
                infer = ShardInferencer(job)  # the model loads with the first pending shard
                infer.on_progress = progress.rows_done
                for shard_index in pending:
                    progress.committed(shard_task(plan, shard_index, infer))
        finally:
            progress.close()
        return record_cost(finalize_job(plan, time.monotonic() - started), job.options.cost, job.storage)
