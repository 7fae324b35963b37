"""What the nightly flows share, without Prefect: job options, the job/engine
specs they hand to `batch_inference`, and reading and writing derived outputs.

A derived job (label, synth, eval) owns an output root::

    <root>/job/               the batch job itself (parts, _shards/, manifest.json): resumable
    <root>/<derived>.parquet  rebuilt from the committed parts after every run

The batch job's directory holds only what pipeline.job writes (it refuses
foreign files there), so derived files live beside it, not in it.  They are
rewritten atomically from the manifest's parts, so every row appears in them
exactly once however often the job was resumed.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import re
from collections.abc import Iterator
from datetime import date
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, Field

from ossbatch.pipeline.storage import InputError, atomic_open, exists, filesystem, join, write_json_atomic
from ossbatch.pipeline.write import SOURCE_KEY, write_parquet

JOB_DIR = "job"
DATE_FIELD = "{date}"
JOB_KEY_METADATA = b"ossbatch.job_key"


class JobOptions(BaseModel):
    """Sampling, engine and storage options of a job (the `ossbatch run` flags, as one parameter)."""

    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    max_tokens: int = Field(1024, ge=1)
    max_reasoning_tokens: int | None = Field(None, ge=0)
    reasoning_effort: Literal["low", "medium", "high"] = "medium"
    batch_tokens: int = Field(32768, ge=1)
    max_batch_rows: int = Field(256, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    backend: Literal["torch", "triton"] = "torch"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fp32_matmul: Literal["auto", "ieee", "bf16"] = "auto"
    shard_rows: int = Field(10_000, ge=1)
    storage_options: dict = Field(default_factory=dict)
    overwrite: bool = False
    runner: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    ray_workers: int | None = Field(None, ge=1)

    def run_settings(self, schema: dict | str | None = None, **extra):
        from ossbatch.pipeline.infer import RunSettings

        if isinstance(schema, dict):
            schema = json.dumps(schema, sort_keys=True)
        return RunSettings(
            temperature=self.temperature, top_p=self.top_p, seed=self.seed, max_tokens=self.max_tokens,
            reasoning_effort=self.reasoning_effort, max_reasoning_tokens=self.max_reasoning_tokens,
            schema=schema, batch_tokens=self.batch_tokens, max_batch_rows=self.max_batch_rows, **extra,
        )


def make_job(model: str, inputs: list[str] | str, output: str, settings, *, dtype: str = "float32",
             backend: str = "torch", shard_rows: int = 10_000, storage_options: dict | None = None,
             overwrite: bool = False, device: str = "auto", fp32_matmul: str = "auto") -> tuple[dict, dict]:
    """(JobSpec fields, EngineSpec fields) for `batch_inference`; refuses a bad model before any work."""
    from ossbatch.engine.config import read_config
    from ossbatch.engine.weights import checkpoint_fingerprint
    from ossbatch.flows.engine_spec import EngineSpec

    config = read_config(model)
    engine = EngineSpec.build(model, settings, dtype, backend, device=device, fp32_matmul=fp32_matmul)
    job = dict(
        inputs=[inputs] if isinstance(inputs, str) else list(inputs),
        output=output,
        storage_options=storage_options or {},
        shard_rows=shard_rows,
        overwrite=overwrite,
        model_fingerprint=checkpoint_fingerprint(model) | {"config": config.to_hf_json()},
        settings=settings.to_dict() | {"dtype": dtype, "backend": backend, "fp32_matmul": fp32_matmul},
    )
    return job, engine.to_dict()


def job_for(model: str, inputs, root: str, options: JobOptions, schema=None) -> tuple[dict, dict]:
    """The batch job of a derived job rooted at ``root``."""
    if root.rstrip("/").lower().endswith(".jsonl"):
        raise InputError(f"{root}: label, synth and eval write a directory of Parquet files, not a .jsonl")
    return make_job(model, inputs, job_dir(root), options.run_settings(schema), dtype=options.dtype,
                    backend=options.backend, device=options.device, fp32_matmul=options.fp32_matmul, shard_rows=options.shard_rows,
                    storage_options=options.storage_options, overwrite=options.overwrite)


def job_dir(root: str) -> str:
    return join(root, JOB_DIR)


def resolve_output(template: str, day: date) -> str:
    """``{date}`` in an output path becomes the run's (scheduled) date, so one nightly
    deployment writes a fresh directory each night."""
    return template.replace(DATE_FIELD, day.isoformat())


def slug(text: str) -> str:
    """An artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "job"


def input_stem(inputs: list[str] | str) -> str:
    first = inputs if isinstance(inputs, str) else inputs[0]
    name = posixpath.basename(first.rstrip("/").split("://", 1)[-1]) or "job"
    for suffix in (".gz", ".jsonl", ".ndjson", ".json", ".parquet", ".pq"):
        name = name.removesuffix(suffix)
    return name


def check_columns(inputs, storage_options: dict | None, columns: dict[str, str], peek: int = 100) -> None:
    """Fails early when a named input column (``{flag: column}``) is missing from the first
    ``peek`` rows, instead of after the whole job has run."""
    from itertools import islice

    from ossbatch.pipeline.read import read_requests

    seen: set[str] = set()
    for request in islice(read_requests(inputs, storage_options), peek):
        seen.update(request.get("passthrough") or {})
    for flag, column in columns.items():
        if column not in seen:
            raise InputError(f"{flag} {column!r} is not a column of the input; its columns: "
                             f"{', '.join(sorted(seen)) or 'none besides the request fields'}")


def part_tables(manifest: dict, storage_options: dict | None) -> Iterator[pa.Table]:
    """The committed rows, a part at a time, in shard order."""
    fs, work = filesystem(manifest["output"]["work_dir"], storage_options)
    for part in manifest["output"]["parts"]:
        with fs.open(join(work, part), "rb") as f:
            yield pq.read_table(f)


def column_named(table: pa.Table | pa.Schema, source: str) -> str | None:
    """The output column holding input column ``source`` (renamed ``input_<name>`` on a clash)."""
    schema = table.schema if isinstance(table, pa.Table) else table
    for field in schema:
        if (field.metadata or {}).get(SOURCE_KEY, b"").decode() == source:
            return field.name
    return source if source in schema.names else None


@contextlib.contextmanager
def parquet_sink(uri: str, storage_options: dict | None, job_key: str):
    """Yields ``write(table)``: the tables become one Parquet file, stamped with the job key,
    that appears atomically when the block ends (and not at all if it raises)."""
    fs, path = filesystem(uri, storage_options)
    with atomic_open(fs, path, "wb") as f:
        writer = None

        def write(table: pa.Table) -> None:
            nonlocal writer
            if writer is None:
                metadata = {**(table.schema.metadata or {}), JOB_KEY_METADATA: job_key.encode()}
                writer = pq.ParquetWriter(f, table.schema.with_metadata(metadata), compression="zstd")
            writer.write_table(table.replace_schema_metadata(writer.schema.metadata))

        yield write
        if writer is None:  # a job without rows still gets a readable (empty) file
            write(pa.table({"id": pa.array([], pa.string())}))
        writer.close()


def write_table(uri: str, table: pa.Table, storage_options: dict | None, job_key: str) -> None:
    """A whole (small) table, atomically."""
    fs, path = filesystem(uri, storage_options)
    metadata = {**(table.schema.metadata or {}), JOB_KEY_METADATA: job_key.encode()}
    with atomic_open(fs, path, "wb") as f:
        write_parquet(table.replace_schema_metadata(metadata), f)


def write_json(uri: str, obj, storage_options: dict | None) -> None:
    fs, path = filesystem(uri, storage_options)
    write_json_atomic(fs, path, obj)


def read_json_lines(uri: str, storage_options: dict | None) -> list[dict]:
    fs, path = filesystem(uri, storage_options)
    if not exists(fs, path):
        return []
    with fs.open(path, "rb") as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def write_json_lines(uri: str, rows: list[dict], storage_options: dict | None) -> None:
    """Rewrites the whole file atomically: object stores cannot append."""
    fs, path = filesystem(uri, storage_options)
    with atomic_open(fs, path, "wb") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
