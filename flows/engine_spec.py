"""What a worker needs to build the engine for a job, as plain data.

Flows pass an `EngineSpec` to tasks and Ray actors; each process builds the
`ShardInferencer` once per spec and reuses it across shards.
"""

import json
from dataclasses import asdict, dataclass
from functools import lru_cache

from ossbatch.pipeline.infer import RunSettings, ShardInferencer


@dataclass(frozen=True)
class EngineSpec:
    model: str
    dtype: str = "float32"
    backend: str = "torch"
    settings_json: str = "{}"
    expert_cache_bytes: int = 1 << 30
    device: str = "auto"  # see pipeline.infer.resolve_device; a Ray actor given a GPU uses "cuda"
    fp32_matmul: str = "auto"  # see engine.precision

    @classmethod
    def build(cls, model: str, settings: RunSettings, dtype: str, backend: str, expert_cache_bytes: int = 1 << 30,
              device: str = "auto", fp32_matmul: str = "auto") -> "EngineSpec":
        return cls(model, dtype, backend, json.dumps(settings.to_dict(), sort_keys=True), expert_cache_bytes, device, fp32_matmul)

    @property
    def settings(self) -> RunSettings:
        return RunSettings(**json.loads(self.settings_json))

    def to_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=2)
def inferencer(spec: EngineSpec) -> ShardInferencer:
    return ShardInferencer(spec.model, spec.settings, spec.dtype, spec.backend, spec.expert_cache_bytes, spec.device,
                           spec.fp32_matmul)
