"""The Ray actor that runs shards: the model loaded once, reused for every shard it gets.

Prefect-free on purpose: this module is what Ray workers import, and Prefect
code run in a worker would start a Prefect server of its own.
"""

import socket
from dataclasses import replace

from ossbatch.flows.engine_spec import EngineSpec, inferencer
from ossbatch.flows.shard import run_one_shard
from ossbatch.pipeline.job import JobPlan


class ShardWorker:
    def __init__(self, engine: dict):
        import ray

        self.spec = self._placed(EngineSpec(**engine))
        # Markers name the worker that committed them: host and actor.
        self.name = f"ray:{socket.gethostname()}:{ray.get_runtime_context().get_actor_id()}"
        inferencer(self.spec)  # load now, so the first shard does not pay for it

    @staticmethod
    def _placed(spec: EngineSpec) -> EngineSpec:
        """An actor Ray gave a GPU runs on it (Ray sets CUDA_VISIBLE_DEVICES to that GPU)."""
        import ray

        return replace(spec, device="cuda") if spec.device == "auto" and ray.get_gpu_ids() else spec

    def run_shard(self, plan_data: dict, shard_index: int, engine: dict) -> dict:
        spec = self._placed(EngineSpec(**engine))  # the same spec as at load: the cached model is reused
        return run_one_shard(JobPlan.from_dict(plan_data), shard_index, spec, worker=self.name)
