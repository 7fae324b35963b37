"""The OpenAI Batch output format: one JSON line per request, bodies the openai SDK parses.

Chat lines carry a ``chat.completion`` body (reasoning on ``message.reasoning_content``, as
OpenAI-compatible servers for gpt-oss do); Responses lines carry a ``response`` object with a
reasoning item and a message item. Ids are derived from the job and the custom_id, so re-running
finalize rewrites the same file byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator

import pyarrow.parquet as pq

from ossbatch.pipeline.storage import Storage

ERROR_CODE = "request_failed"


def _token(*parts: str, length: int = 24) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:length]


def _count(row: dict, name: str) -> int:
    return int(row.get(name) or 0)


def chat_completion_body(row: dict, model: str, created: int, job_key: str) -> dict:
    message = {"role": "assistant", "content": row.get("output_text") or "", "refusal": None}
    if row.get("reasoning_text") is not None:
        message["reasoning_content"] = row["reasoning_text"]
    prompt, completion = _count(row, "prompt_tokens"), _count(row, "completion_tokens")
    return {
        "id": f"chatcmpl-{_token(job_key, row['id'], 'chat')}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": "length" if row.get("finish_reason") == "length" else "stop",
            "logprobs": None,
        }],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": _count(row, "cached_prompt_tokens")},
            "completion_tokens_details": {"reasoning_tokens": _count(row, "reasoning_tokens")},
        },
        "system_fingerprint": None,
    }


def response_body(row: dict, model: str, created: int, job_key: str) -> dict:
    truncated = row.get("finish_reason") == "length"
    status = "incomplete" if truncated else "completed"
    output = []
    if row.get("reasoning_text") is not None:
        output.append({
            "id": f"rs_{_token(job_key, row['id'], 'reasoning')}",
            "type": "reasoning",
            "summary": [],
            "content": [{"type": "reasoning_text", "text": row["reasoning_text"]}],
            "status": status,
        })
    output.append({
        "id": f"msg_{_token(job_key, row['id'], 'message')}",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": row.get("output_text") or "", "annotations": [], "logprobs": []}],
    })
    prompt, completion = _count(row, "prompt_tokens"), _count(row, "completion_tokens")
    return {
        "id": f"resp_{_token(job_key, row['id'], 'response')}",
        "object": "response",
        "created_at": float(created),
        "model": model,
        "status": status,
        "incomplete_details": {"reason": "max_output_tokens"} if truncated else None,
        "error": None,
        "output": output,
        "parallel_tool_calls": False,
        "tool_choice": "none",
        "tools": [],
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": _count(row, "cached_prompt_tokens"), "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": _count(row, "reasoning_tokens")},
            "total_tokens": prompt + completion,
        },
    }


def batch_output_line(row: dict, *, model: str, created: int, job_key: str) -> dict:
    """One Batch output line for one result row (as read back from a committed shard)."""
    custom_id = row["id"]
    line = {"id": f"batch_req_{_token(job_key, custom_id)}", "custom_id": custom_id}
    if row.get("status") == "error":
        line.update(response=None, error={"code": ERROR_CODE, "message": row.get("error") or "failed", "param": None, "line": None})
        return line
    model = row.get("model") or model
    builder = response_body if row.get("request_kind") == "responses" else chat_completion_body
    line["response"] = {
        "status_code": 200,
        "request_id": f"req_{_token(job_key, custom_id, 'request')}",
        "body": builder(row, model, created, job_key),
    }
    line["error"] = None
    return line


BATCH_COLUMNS = [
    "id", "status", "finish_reason", "output_text", "reasoning_text", "error", "prompt_tokens",
    "reasoning_tokens", "output_tokens", "completion_tokens", "request_kind", "model",
]


def iter_part_rows(fs, path: str) -> Iterator[dict]:
    """Rows of one committed part file, a row group at a time."""
    with fs.open(path, "rb") as f:
        reader = pq.ParquetFile(f)
        columns = [c for c in BATCH_COLUMNS if c in reader.schema_arrow.names]
        for batch in reader.iter_batches(columns=columns, batch_size=4096):
            yield from batch.to_pylist()


def write_batch_output(output_uri: str, storage: Storage, rows: Iterable[tuple[dict, int]],
                       *, model: str, job_key: str) -> int:
    """Write the Batch output file atomically from (row, created) pairs; returns the line count."""
    count = 0
    with storage.atomic_open(output_uri, "w") as out:
        for row, created in rows:
            out.write(json.dumps(batch_output_line(row, model=model, created=created, job_key=job_key), ensure_ascii=False) + "\n")
            count += 1
    return count
