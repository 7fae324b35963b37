"""What the nightly flows share, without Prefect: the batch job of a derived job, and reading
and writing derived outputs.

A derived job (label, synth, eval) owns an output root::

    <root>/job/               the batch job itself (data/ parts, _shards/, _manifest.json): resumable
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

import pyarrow as pa
import pyarrow.parquet as pq

from ossbatch.pipeline.config import Job, JobOptions
from ossbatch.pipeline.storage import InputError, Storage, join
from ossbatch.pipeline.write import SOURCE_KEY, write_parquet

JOB_DIR = "job"
DATE_FIELD = "{date}"
JOB_KEY_METADATA = b"ossbatch.job_key"


def derived_job(model: str, inputs: list[str] | str, root: str, options: JobOptions, schema=None) -> Job:
    """The batch job of a derived job rooted at ``root``; ``schema`` is its answers' JSON Schema."""
    if root.rstrip("/").lower().endswith(".jsonl"):
        raise InputError(f"{root}: label, synth and eval write a directory of Parquet files, not a .jsonl")
    return Job(model=model, inputs=[inputs] if isinstance(inputs, str) else list(inputs), output=job_dir(root),
               options=options.with_schema(schema))


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


def check_columns(inputs, storage: Storage, columns: dict[str, str], peek: int = 100) -> None:
    """Fails early when a named input column (``{flag: column}``) is missing from the first
    ``peek`` rows, instead of after the whole job has run."""
    from itertools import islice

    from ossbatch.pipeline.read import read_requests

    seen: set[str] = set()
    for request in islice(read_requests(inputs, storage), peek):
        seen.update(request.get("passthrough") or {})
    for flag, column in columns.items():
        if column not in seen:
            raise InputError(f"{flag} {column!r} is not a column of the input; its columns: "
                             f"{', '.join(sorted(seen)) or 'none besides the request fields'}")


def part_tables(manifest: dict, storage: Storage) -> Iterator[pa.Table]:
    """The committed rows, a part at a time, in shard order."""
    for part in manifest["output"]["parts"]:
        with storage.open(join(manifest["output"]["work_dir"], part), "rb") as f:
            yield pq.read_table(f)


def column_named(table: pa.Table | pa.Schema, source: str) -> str | None:
    """The output column holding input column ``source`` (renamed ``input_<name>`` on a clash)."""
    schema = table.schema if isinstance(table, pa.Table) else table
    for field in schema:
        if (field.metadata or {}).get(SOURCE_KEY, b"").decode() == source:
            return field.name
    return source if source in schema.names else None


@contextlib.contextmanager
def parquet_sink(uri: str, storage: Storage, job_key: str):
    """Yields ``write(table)``: the tables become one Parquet file, stamped with the job key,
    that appears atomically when the block ends (and not at all if it raises)."""
    with storage.atomic_open(uri, "wb") as f:
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


def write_table(uri: str, table: pa.Table, storage: Storage, job_key: str) -> None:
    """A whole (small) table, atomically."""
    metadata = {**(table.schema.metadata or {}), JOB_KEY_METADATA: job_key.encode()}
    with storage.atomic_open(uri, "wb") as f:
        write_parquet(table.replace_schema_metadata(metadata), f)


def read_json_lines(uri: str, storage: Storage) -> list[dict]:
    if not storage.exists(uri):
        return []
    with storage.open(uri, "rb") as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def write_json_lines(uri: str, rows: list[dict], storage: Storage) -> None:
    """Rewrites the whole file atomically: object stores cannot append."""
    with storage.atomic_open(uri, "wb") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())
