"""The Ray actor that runs shards: the model loaded once, reused for every shard it gets.

Prefect-free on purpose: this module is what Ray workers import, and Prefect
code run in a worker would start a Prefect server of its own.
"""

import socket

from ossbatch.pipeline.config import Job
from ossbatch.pipeline.driver import run_shard
from ossbatch.pipeline.infer import ShardInferencer
from ossbatch.pipeline.job import JobPlan


class ShardWorker:
    def __init__(self, job: Job):
        import ray

        # An actor Ray gave a GPU runs on it (Ray sets CUDA_VISIBLE_DEVICES to that GPU).
        if job.options.device == "auto" and ray.get_gpu_ids():
            job = job.on_device("cuda")
        self.infer = ShardInferencer(job)
        # Markers name the worker that committed them: host and actor.
        self.name = f"ray:{socket.gethostname()}:{ray.get_runtime_context().get_actor_id()}"
        self.infer.model  # load now, so the first shard does not pay for it

    def run_shard(self, plan: JobPlan, shard_index: int) -> dict:
        return run_shard(plan, shard_index, self.infer, worker=self.name)
