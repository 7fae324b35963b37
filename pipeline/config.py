"""A job's settings, declared once, typed and validated.

`JobOptions` holds every setting of a batch job but what it reads and writes: it is the
`ossbatch run` flags (one field per flag, same name with ``-`` for ``_``, same default) and the
``options`` parameter of the Prefect flows. Its fields are declared in parts, by who reads them:

- `EngineOptions`: how the model is loaded; with the model path it is `EngineConfig`, the key of
  the engine cache (so jobs that differ only in sampling share one loaded model).
- `SamplingOptions`: job-wide defaults that a row's own fields override.
- `PipelineOptions`: shards, batch packing, storage, overwrite.
- `RunnerOptions`: where the shards run (in-process or on Ray actors).
- `CostOptions`: token and GPU-hour prices, for the cost in the manifest.

`Job` is one job: model, inputs, output and options; it is what `batch_inference` takes and what the
shard driver runs. To add a setting: a field in its part (type, default, bounds), its flag in
flows/cli.py (which takes default and choices from here), and, for an engine or pipeline setting
that changes results, its name in OUTPUT_SETTINGS (sampling settings join the job identity anyway).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ossbatch.pipeline.storage import LOCAL, InputError, Storage

Dtype = Literal["float32", "bfloat16"]
Backend = Literal["torch", "triton"]
Device = Literal["auto", "cpu", "cuda"]  # auto: the GPU for the triton backend when there is one, else the CPU
Float32Mode = Literal["auto", "ieee", "bf16"]  # see engine.precision
ReasoningEffort = Literal["low", "medium", "high"]
Runner = Literal["local", "ray"]
LogprobsDistribution = Literal["raw", "masked"]

# Engine and pipeline settings that change a job's results (batching changes the float sums).
OUTPUT_SETTINGS = ("batch_tokens", "max_batch_rows", "dtype", "backend", "fp32_matmul")
IDENTITY_KEYS = {"response_schema": "schema"}
# Settings added since outputs were first written: at these defaults they stay out of the identity,
# so a job that does not use them keeps its key (and resumes its earlier output).
ADDED_SETTINGS = {"top_logprobs": 0, "logprobs_distribution": "raw", "label_field": None}
# Fields whose flag is not ``--`` + the field name with dashes.
FLAG_NAMES = {"storage": "--storage-options", "response_schema": "--schema", "prefix_sharing": "--no-prefix-sharing"}


def flag_of(field: str) -> str:
    return FLAG_NAMES.get(field, "--" + field.replace("_", "-"))


class _Settings(BaseModel):
    # NaN or infinite numbers are refused: a NaN temperature passes every bound check.
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @classmethod
    def fields_of(cls) -> list[str]:
        return list(cls.model_fields)

    def pick(self, part: type[_Settings], **extra) -> Any:
        return part(**{name: getattr(self, name) for name in part.model_fields if name not in extra}, **extra)


class EngineOptions(_Settings):
    dtype: Dtype = "float32"
    backend: Backend = "torch"
    device: Device = "auto"
    fp32_matmul: Float32Mode = "auto"
    expert_cache_bytes: int = Field(1 << 30, ge=0)  # at most this many bytes of unpacked experts (torch backend)
    # Anonymous memory the job may use on the host (the mapped checkpoint aside); sizes the expert
    # cache (engine/host_memory.py). None: what the machine or its memory cgroup leaves.
    memory_budget: int | None = Field(None, gt=0)


class EngineConfig(EngineOptions):
    """A loaded model's identity: the engine cache's key."""

    model: str


class SamplingOptions(_Settings):
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    max_tokens: int = Field(1024, ge=1)
    max_reasoning_tokens: int | None = Field(None, ge=0)
    reasoning_effort: ReasoningEffort = "medium"
    response_schema: str | None = None  # JSON Schema text every row's answer follows (--schema)
    keep_token_ids: bool = False
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)  # per generated token, the K most likely alternatives
    logprobs_distribution: LogprobsDistribution = "raw"  # raw: the model's own; masked: renormalised over what a grammar allows
    # An enum property of the answer whose every allowed value is scored (label_probs, label_confidence).
    label_field: str | None = None


class PipelineOptions(_Settings):
    shard_rows: int = Field(10_000, ge=1)
    batch_tokens: int = Field(32768, ge=1)  # KV cache budget of one batch: rows x (prompt + max tokens)
    max_batch_rows: int = Field(256, ge=1)
    prefix_sharing: bool = True  # rows sharing a prompt prefix prefill and store it once (--no-prefix-sharing)
    overwrite: bool = False
    # Another name a Batch line's "model" may give besides the checkpoint folder's and its family's.
    served_model_name: str | None = Field(None, min_length=1)
    error_output: str | None = Field(None, min_length=1)  # a Batch output's failed lines (default: OUTPUT.errors.jsonl)
    storage: Storage = LOCAL  # credentials: shown as ********** in Prefect, never written to the output


class RunnerOptions(_Settings):
    runner: Runner = "local"
    ray_address: str | None = None
    ray_workers: int | None = Field(None, ge=1)


class CostOptions(_Settings):
    """What a job costs (pipeline.cost): shown in its manifest, never part of its identity."""

    price_per_million_tokens: tuple[float, float] = (0.0, 0.0)  # (prompt, completion) tokens
    gpu_hour_price: float = Field(0.0, ge=0)

    @field_validator("price_per_million_tokens")
    @classmethod
    def _not_negative(cls, value: tuple[float, float]) -> tuple[float, float]:
        if min(value) < 0:
            raise ValueError(f"prices must not be negative, got {list(value)}")
        return value

    @property
    def priced(self) -> bool:
        return any(self.price_per_million_tokens) or self.gpu_hour_price > 0


class JobOptions(EngineOptions, SamplingOptions, PipelineOptions, RunnerOptions, CostOptions):
    """Every setting of a job, flat (the flags); the parts above say who reads which."""

    @classmethod
    def from_flags(cls, values: dict) -> JobOptions:
        """Options from parsed flags (argparse's namespace as a dict; other keys are ignored).
        A bad value raises InputError naming its flag."""
        given = {name: values[name] for name in cls.model_fields if values.get(name) is not None}
        return validated(cls, given)

    def replaced(self, **changes) -> JobOptions:
        """A copy with ``changes``, validated like the original."""
        return validated(type(self), {**{name: getattr(self, name) for name in type(self).model_fields}, **changes})

    def with_schema(self, schema: dict | str | None) -> JobOptions:
        if isinstance(schema, dict):
            schema = json.dumps(schema, sort_keys=True)
        return self.replaced(response_schema=schema)

    @property
    def sampling(self) -> SamplingOptions:
        return self.pick(SamplingOptions)

    @property
    def cost(self) -> CostOptions:
        return self.pick(CostOptions)

    def engine(self, model: str) -> EngineConfig:
        return self.pick(EngineConfig, model=model)

    def identity(self) -> dict:
        """The settings that change what a job writes: part of its identity in _job.json. Every
        sampling setting is; other settings are when named in OUTPUT_SETTINGS. (Keys as earlier
        versions wrote them, so their outputs still resume.)"""
        names = [*SamplingOptions.model_fields, *OUTPUT_SETTINGS]
        identity = {IDENTITY_KEYS.get(name, name): getattr(self, name) for name in names
                    if not (name in ADDED_SETTINGS and getattr(self, name) == ADDED_SETTINGS[name])}
        if self.served_model_name is not None:  # only when given: earlier outputs keep their identity
            identity["served_model_name"] = self.served_model_name
        return identity


class Job(_Settings):
    """One batch job: what it reads and writes, and how."""

    model: str
    inputs: list[str]
    output: str
    options: JobOptions = JobOptions()

    @property
    def engine(self) -> EngineConfig:
        return self.options.engine(self.model)

    @property
    def storage(self) -> Storage:
        return self.options.storage

    def on_device(self, device: Device) -> Job:
        return Job(model=self.model, inputs=self.inputs, output=self.output, options=self.options.replaced(device=device))


def validated(model: type[BaseModel], values: dict):
    try:
        return model(**values)
    except ValidationError as err:
        raise InputError("; ".join(_flag_message(e) for e in err.errors())) from None


def _flag_message(error: dict) -> str:
    field = next((str(part) for part in error["loc"] if isinstance(part, str)), "")
    value = error.get("input")
    shown = "nan" if isinstance(value, float) and math.isnan(value) else repr(value)
    message = error["msg"][:1].lower() + error["msg"][1:]
    return f"{flag_of(field)}: {message}, got {shown}" if field else message
