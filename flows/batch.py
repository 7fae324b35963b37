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
from ossbatch.pipeline.driver import job_spec, run_shard
from ossbatch.pipeline.infer import ShardInferencer
from ossbatch.pipeline.job import JobPlan, finalize_job, pending_shards, plan_job, releasing_output

__all__ = ["batch_inference", "shard_task"]


@task(name="run-shard", retries=2, retry_delay_seconds=1, cache_policy=NONE)
def shard_task(plan: JobPlan, shard_index: int, infer: ShardInferencer) -> dict:
    # run_shard is looked up here at call time, so tests can make it fail.
    return run_shard(plan, shard_index, infer)


def _progress_artifact(plan: JobPlan, pending: list[int]):
    """Publishes the share of committed shards as the flow run's progress artifact."""
    logger = get_run_logger()

    def percent(done: int) -> float:
        return round(100.0 * done / plan.num_shards, 2) if plan.num_shards else 100.0

    try:
        artifact_id = create_progress_artifact(
            progress=percent(plan.num_shards - len(pending)),
            description=f"shards of {plan.output} committed ({plan.num_shards} in all)",
        )
    except Exception as err:  # progress is a nicety: never fail a job over it
        logger.warning("no progress artifact: %s", err)
        return None

    def publish(done: int, shards: int) -> None:
        try:
            update_progress_artifact(artifact_id, progress=percent(done))
        except Exception as err:
            logger.warning("progress artifact not updated: %s", err)

    return publish


@flow(name="batch-inference", log_prints=True)
def batch_inference(job: Job, quiet: bool = False) -> dict:
    """Runs ``job`` (its storage options show as ********** among the flow run's parameters).
    Returns the manifest."""
    started = time.monotonic()
    plan = plan_job(job_spec(job))  # holds the output's lease until finalize_job releases it
    with releasing_output(plan):  # or until the flow fails: the next run need not wait for it to lapse
        pending = pending_shards(plan)
        progress = Progress(plan.total_rows, plan.num_shards, len(pending), quiet=quiet,
                            publish=_progress_artifact(plan, pending))
        get_run_logger().info("%d shards, %d pending, %d rows", plan.num_shards, len(pending), plan.total_rows)
        if job.options.runner == "ray":
            from ossbatch.flows.ray_runner import run_shards_on_ray

            run_shards_on_ray(plan, pending, job, progress)
        else:
            infer = ShardInferencer(job)  # the model loads with the first pending shard
            for shard_index in pending:
                progress.committed(shard_task(plan, shard_index, infer))
        manifest = finalize_job(plan, time.monotonic() - started)
    progress.close(manifest)
    return manifest
