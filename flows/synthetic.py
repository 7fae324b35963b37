"""Synthetic data: every input row asked ``n`` times, each with its own seed.

The expansion is a real input file (``<root>/requests.jsonl``): request ``k`` of
row ``id`` has id ``"{id}#{k}"``, an explicit seed, and the passthrough columns
``source_id``, ``sample`` and ``sample_seed``.  The batch job plans and resumes
over it like over any input; the file's content hash keeps re-runs the same job.
No Prefect here.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from ossbatch.pipeline.infer import row_seed
from ossbatch.pipeline.read import BadLine, iter_records
from ossbatch.pipeline.storage import InputError, Storage, expand_inputs
from ossbatch.pipeline.validate import is_batch_line, record_id

SOURCE_COLUMN, SAMPLE_COLUMN, SEED_COLUMN = "source_id", "sample", "sample_seed"
OWN_COLUMNS = (SOURCE_COLUMN, SAMPLE_COLUMN, SEED_COLUMN)


def sample_seed(base_seed: int, row_id: str, sample: int) -> int:
    """Seed of sample ``sample`` of row ``row_id``: a stable hash, distinct per sample."""
    return row_seed(base_seed, f"{row_id}#{sample}")


def expand_record(record: dict | BadLine, fallback_id: str, n: int, job_seed: int) -> list[dict]:
    """``n`` copies of one input record, each with its own id and seed."""
    if isinstance(record, BadLine):
        # Keeps the row visible: each sample fails (no prompt) and carries the reason.
        return [{"id": f"{fallback_id}#{k}", SOURCE_COLUMN: fallback_id, SAMPLE_COLUMN: k,
                 "source_error": record.message} for k in range(n)]
    clash = [c for c in OWN_COLUMNS if c in record]
    if clash:
        raise InputError(f"input row {fallback_id} has column(s) {', '.join(clash)}, which synth writes itself")
    source = record_id(record, fallback_id)
    batch = is_batch_line(record)
    body = record.get("body") if batch and isinstance(record.get("body"), dict) else None
    own_seed = (body or record).get("seed")
    base = int(own_seed) if isinstance(own_seed, int) and not isinstance(own_seed, bool) else job_seed
    copies = []
    for k in range(n):
        seed = sample_seed(base, source, k)
        copy = dict(record, **{SOURCE_COLUMN: source, SAMPLE_COLUMN: k, SEED_COLUMN: seed})
        copy["id" if "id" in record or not batch else "custom_id"] = f"{source}#{k}"
        if body is not None:
            copy["body"] = dict(body, seed=seed)
        else:
            copy["seed"] = seed
        copies.append(copy)
    return copies


def write_expanded_requests(inputs: list[str] | str, storage: Storage, n: int, job_seed: int,
                            destination: str) -> dict:
    """Streams the inputs into ``destination`` (JSONL), ``n`` requests per row; counts rows."""
    if n < 1:
        raise InputError(f"--n must be at least 1, got {n}")
    rows = 0
    with storage.atomic_open(destination, "wb") as out:
        for file in expand_inputs(inputs, storage):
            for number, record in iter_records(file, storage=storage):
                for copy in expand_record(record, f"{file.label}:{number}", n, job_seed):
                    out.write((json.dumps(copy, ensure_ascii=False, default=str) + "\n").encode())
                rows += 1
    return {"rows": rows, "requests": rows * n}


class SampleTable:
    """Turns committed parts into the samples table: ``id`` (the input row's), ``sample``,
    ``seed``, ``request_id``, the outputs; with ``dedupe``, only the first sample of each
    distinct answer per row is kept.  Parts arrive in input order, so a row's samples are
    consecutive and only the current row's answers are remembered."""

    def __init__(self, dedupe: bool):
        self.dedupe = dedupe
        self.kept = self.dropped = 0
        self._row: str | None = None
        self._answers: set[bytes] = set()

    def convert(self, table: pa.Table) -> pa.Table:
        keep = [self._keep(*row) for row in zip(*(table.column(c).to_pylist() for c in
                                                   (SOURCE_COLUMN, "status", "output_json", "output_text")))]
        if self.dedupe:
            table = table.filter(pa.array(keep, pa.bool_()))
        self.kept += table.num_rows
        first = {"id": table.column(SOURCE_COLUMN), "sample": table.column(SAMPLE_COLUMN),
                 "seed": _column_or_nulls(table, SEED_COLUMN, pa.int64()), "request_id": table.column("id")}
        rest = [c for c in table.column_names if c not in ("id", *OWN_COLUMNS)]
        return pa.table({**first, **{c: table.column(c) for c in rest}})

    def _keep(self, source, status, output_json, output_text) -> bool:
        if source != self._row:
            self._row, self._answers = source, set()
        if status != "ok":
            return True  # failures are not answers: never dropped as duplicates
        answer = output_json if output_json is not None else (output_text or "").strip()
        key = hashlib.blake2b(answer.encode(), digest_size=16).digest()
        if key in self._answers:
            self.dropped += 1
            return False
        self._answers.add(key)
        return True


def _column_or_nulls(table: pa.Table, name: str, kind: pa.DataType):
    # A job whose every row was unreadable never saw the column.
    return table.column(name) if name in table.column_names else pa.nulls(table.num_rows, kind)
