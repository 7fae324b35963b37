"""`--runner ray`: shards run on Ray actors, Prefect stays in the driver.

One actor per worker (one GPU each where the cluster has GPUs) loads the model
once and runs shard after shard.  Each shard is a Prefect task in the driver
that hands it to an idle actor and waits; retries, states and logs stay
Prefect's, and no Prefect code ever runs inside Ray (it would start a Prefect
server per worker).  Commits happen in the actors, straight to the output
store, so a cluster needs the output on shared storage (S3, NFS) and the
ossbatch package installed on every node.
"""

from __future__ import annotations

import math
import os

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.futures import as_completed

from ossbatch.flows.progress import Progress
from ossbatch.pipeline.config import Job
from ossbatch.pipeline.job import JobPlan

# Workers of a cluster we start inherit the driver's environment; these also
# reach the nodes of one we connect to.
FORWARDED_ENV = ("TIKTOKEN_ENCODINGS_BASE",)


@task(name="run-shard-on-ray", retries=2, retry_delay_seconds=1, cache_policy=NONE)
def ray_shard_task(plan: JobPlan, shard_index: int, actor) -> dict:
    import ray

    return ray.get(actor.run_shard.remote(plan, shard_index))


def actor_plan(resources: dict, nodes: list[dict], workers: int | None, pending: int) -> tuple[int, dict]:
    """(actor count, actor resource options): a GPU per actor where there are GPUs, else the
    CPUs of a node shared by the actors placed on it."""
    gpus = int(resources.get("GPU", 0))
    if gpus >= 1:  # never more actors than GPUs: the rest would wait for one forever
        return max(1, min(workers or gpus, gpus, pending)), {"num_gpus": 1}
    alive = [n for n in nodes if n.get("Alive", True)] or [{"Resources": resources}]
    count = max(1, min(workers or len(alive), pending))
    per_node = math.ceil(count / len(alive))
    node_cpus = min(int(n.get("Resources", {}).get("CPU", 1)) for n in alive)
    return count, {"num_cpus": max(1, node_cpus // per_node)}


def _connect(ray_address: str | None, quiet: bool):
    import ray

    runtime_env = {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
    if ray_address:
        ray.init(address=ray_address, runtime_env=runtime_env, log_to_driver=not quiet)
    else:
        ray.init(include_dashboard=False, runtime_env=runtime_env, log_to_driver=not quiet)


def run_shards_on_ray(plan: JobPlan, pending: list[int], job: Job, progress: Progress) -> list[dict]:
    """Runs ``pending`` shards on actors; returns their markers in commit order.

    Connects to the job's ``ray_address`` (or the cluster already initialised in
    this process), else starts a local cluster for the job and stops it after.
    """
    if not pending:
        return []
    import ray

    from ossbatch.flows.ray_worker import ShardWorker

    logger = get_run_logger()
    started_here = not ray.is_initialized()
    if started_here:
        _connect(job.options.ray_address, progress.quiet)
    actors = []
    try:
        count, options = actor_plan(ray.cluster_resources(), ray.nodes(), job.options.ray_workers, len(pending))
        # A crashed actor comes back (reloading the model) for the task's retry.
        remote = ray.remote(max_restarts=2, max_task_retries=0, **options)(ShardWorker)
        actors = [remote.remote(job) for _ in range(count)]
        logger.info("%d Ray actors (%s each) for %d shards", count, options, len(pending))
        return _run_on_actors(plan, pending, actors, progress)
    finally:
        for actor in actors:
            ray.kill(actor)
        if started_here:
            ray.shutdown()


def _run_on_actors(plan: JobPlan, pending: list[int], actors: list, progress: Progress) -> list[dict]:
    """Keeps every actor busy with one shard task at a time until all shards are done.

    A shard that fails for good (after its retries) stops new submissions; the
    running ones finish and commit, then the error is raised (a re-run resumes).
    """
    waiting, idle = list(pending), list(actors)
    running: dict = {}  # future -> actor
    markers, failure = [], None
    while running or (waiting and failure is None):
        while waiting and idle and failure is None:
            actor = idle.pop()
            running[ray_shard_task.submit(plan, waiting.pop(0), actor)] = actor
        done = next(as_completed(list(running)))
        idle.append(running.pop(done))
        try:
            marker = done.result()
        except Exception as err:
            failure = failure or err
            continue
        markers.append(marker)
        progress.committed(marker)
    if failure is not None:
        raise failure
    return markers
