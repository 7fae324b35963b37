"""Result rows to Arrow: one fixed schema for the engine's columns, plus the passed-through input columns.

The passthrough columns' types are settled once, by the planner, for the whole job
(``PassthroughTypes``), so every shard's Parquet file has the same schema and the output
directory reads as one dataset.
"""

from __future__ import annotations

import base64
import json

import pyarrow as pa
import pyarrow.parquet as pq

from ossbatch.pipeline.storage import atomic_open

TOP_LOGPROB = pa.struct([pa.field("token_id", pa.int32()), pa.field("token", pa.string()),
                         pa.field("logprob", pa.float32())])
RESULT_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("status", pa.string()),  # ok | length | error
    pa.field("finish_reason", pa.string()),  # stop | length | tool_calls | error
    pa.field("output_text", pa.string()),
    pa.field("reasoning_text", pa.string()),
    pa.field("error", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("cached_prompt_tokens", pa.int64()),  # prompt tokens read from a prefix shared with other rows
    pa.field("reasoning_tokens", pa.int64()),
    pa.field("output_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("output_json", pa.string()),
    pa.field("schema_valid", pa.bool_()),
    pa.field("prompt_token_ids", pa.list_(pa.int32())),
    pa.field("output_token_ids", pa.list_(pa.int32())),
    pa.field("output_logprobs", pa.list_(pa.float32())),
    # Per generated token, its K most likely alternatives (--top-logprobs, a row's top_logprobs).
    pa.field("output_top_logprobs", pa.list_(pa.list_(TOP_LOGPROB))),
    # The final answer's tokens (a row asking for logprobs: a Batch line's logprobs or include).
    pa.field("answer_logprobs", pa.list_(pa.struct([*TOP_LOGPROB, pa.field("top_logprobs", pa.list_(TOP_LOGPROB))]))),
    pa.field("request_kind", pa.string()),  # row | chat | responses
    # the function calls a completion made (finish_reason "tool_calls"); arguments as JSON text
    pa.field("tool_calls", pa.list_(pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())]))),
    # With --label-field (ossbatch label, eval --grading choice): each allowed label's probability where
    # the answer names its label, and the answer's label's (pipeline.label_probs).
    pa.field("label_probs", pa.map_(pa.string(), pa.float64())),
    pa.field("label_confidence", pa.float64()),
]
RESULT_NAMES = frozenset(f.name for f in RESULT_FIELDS)
STATUSES = ("ok", "length", "error")
TOKEN_FIELDS = ("prompt_tokens", "cached_prompt_tokens", "reasoning_tokens", "output_tokens", "completion_tokens")
# Field metadata: the input column a passthrough column came from, and whether it holds JSON text.
SOURCE_KEY, ENCODING_KEY = b"ossbatch.source", b"ossbatch.encoding"
JSON_TEXT = "json"
ROW_GROUP_ROWS = 16_384

_PY_TYPES = {bool: pa.bool_(), int: pa.int64(), float: pa.float64(), str: pa.string(), type(None): pa.null()}


class PassthroughTypes:
    """Gathers the types of passthrough columns across a whole input, then settles one schema.

    JSONL values are observed one by one while planning; Parquet columns come from file schemas.
    Columns whose values disagree (strings and numbers, nested objects) are written as JSON text.
    """

    def __init__(self):
        self._seen: dict[str, set] = {}

    def observe_values(self, passthrough: dict) -> None:
        for name, value in passthrough.items():
            self._seen.setdefault(name, set()).add(_PY_TYPES.get(type(value), JSON_TEXT))

    def observe_arrow(self, schema: pa.Schema, names: list[str]) -> None:
        for name in names:
            self._seen.setdefault(name, set()).add(schema.field(name).type)

    def schema(self) -> pa.Schema:
        fields, taken = [], set(RESULT_NAMES)
        for name, types in self._seen.items():
            out_name = name
            while out_name in taken:  # an input column called "status" must not shadow ours
                out_name = "input_" + out_name
            taken.add(out_name)
            arrow_type, encoding = _settle(types - {pa.null()})
            metadata = {SOURCE_KEY: name.encode()}
            if encoding:
                metadata[ENCODING_KEY] = encoding.encode()
            fields.append(pa.field(out_name, arrow_type, metadata=metadata))
        return pa.schema(fields)


def _settle(types: set) -> tuple[pa.DataType, str | None]:
    if not types:
        return pa.string(), None
    if JSON_TEXT in types:
        return pa.string(), JSON_TEXT
    if len(types) == 1:
        return next(iter(types)), None
    if all(pa.types.is_integer(t) for t in types):
        return pa.int64(), None
    if all(pa.types.is_integer(t) or pa.types.is_floating(t) for t in types):
        return pa.float64(), None
    if all(pa.types.is_string(t) or pa.types.is_large_string(t) for t in types):
        return pa.string(), None
    return pa.string(), JSON_TEXT


def encode_schema(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text)))


def _json_text(values: list) -> list:
    return [None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values]


def results_table(results: list[dict], passthrough_schema: pa.Schema) -> pa.Table:
    """Result rows (as infer_shard returns them) as a table with the job's output schema."""
    arrays = [pa.array([r.get(f.name) for r in results], type=f.type) for f in RESULT_FIELDS]
    fields = list(RESULT_FIELDS)
    for field in passthrough_schema:
        metadata = field.metadata or {}
        source = metadata.get(SOURCE_KEY, field.name.encode()).decode()
        values = [(r.get("passthrough") or {}).get(source) for r in results]
        if metadata.get(ENCODING_KEY) == JSON_TEXT.encode():
            arrays.append(pa.array(_json_text(values), type=pa.string()))
        else:
            try:
                arrays.append(pa.array(values, type=field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
                # A value the planner's type cannot hold (e.g. past int64): keep it, as JSON text.
                arrays.append(pa.array(_json_text(values), type=pa.string()))
                field = field.with_type(pa.string()).with_metadata({**metadata, ENCODING_KEY: JSON_TEXT.encode()})
        fields.append(field)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_parquet_atomic(fs, path: str, table: pa.Table) -> None:
    with atomic_open(fs, path, "wb") as f:
        write_parquet(table, f)


def write_parquet(table: pa.Table, sink) -> None:
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)


def shard_summary(results: list[dict]) -> dict:
    """Row counts by status and token sums of one shard's results."""
    statuses = dict.fromkeys(STATUSES, 0)
    tokens = dict.fromkeys(("prompt", "cached_prompt", "reasoning", "output", "completion"), 0)
    for r in results:
        status = r.get("status")
        statuses[status if status in statuses else "error"] += 1
        for name in TOKEN_FIELDS:
            tokens[name.removesuffix("_tokens")] += int(r.get(name) or 0)
    return {"statuses": statuses, "tokens": tokens}
