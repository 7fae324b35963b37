"""The OpenAI Batch output format: one JSON line per request, bodies the openai SDK parses.

Chat lines carry a ``chat.completion`` body (reasoning on ``message.reasoning_content``, as
OpenAI-compatible servers for gpt-oss do); Responses lines carry a ``response`` object with a
reasoning item and a message item. Ids are derived from the job and the custom_id, so re-running
finalize rewrites the same file byte for byte.

``n`` (chat completions, 1..128) runs as n rows over one prompt: `expand_choices` turns the line's
request into n requests when a shard is read, ids ``"{custom_id}#{i}"`` (as ``ossbatch synth``
names its samples), each with passthrough ``choice_index`` = i. Choice i's seed is a hash of a
base seed and its id ``"{custom_id}#{i}"``: with the body's ``seed`` as base, `choice_seed` sets it
on the request; without one, the run stage derives it from the job's ``--seed`` and the row id as
for any row. So the n choices sample apart even with one seed, and a re-run samples each the
same way. The n rows render to one prompt, so the run stage shares it: the prompt is prefilled
once and each row reports ``cached_prompt_tokens`` for it. In a Parquet output the line is those n rows (``id``
``"{custom_id}#{i}"``, column ``choice_index``; null for lines without n). The Batch file folds
them back (`fold_choices`) into one line whose body has ``choices[0..n-1]`` and usage as OpenAI
counts n: the prompt once, completion (and reasoning) tokens summed over the choices, cached tokens
as the choices report them (the least, should they differ). A line with a failed choice is an
error line naming the choice, as a request is answered whole or not at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator

import pyarrow.parquet as pq

from ossbatch.pipeline.logprobs import openai_logprobs
from ossbatch.pipeline.storage import Storage
from ossbatch.pipeline.validate import BATCH_ENDPOINTS, is_batch_line, record_id

ERROR_CODE = "request_failed"
MAX_CHOICES = 128  # OpenAI's limit on n
CHOICE_COLUMN = "choice_index"


def _token(*parts: str, length: int = 24) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:length]


def _count(row: dict, name: str) -> int:
    return int(row.get(name) or 0)


def _message(row: dict) -> dict:
    message = {"role": "assistant", "content": row.get("output_text") or "", "refusal": None}
    if row.get("reasoning_text") is not None:
        message["reasoning_content"] = row["reasoning_text"]
    return message


def _chat_logprobs(row: dict) -> dict | None:
    """The choice's logprobs: the answer's tokens, when the line asked (``logprobs: true``)."""
    if row.get("answer_logprobs") is None:
        return None
    return {"content": openai_logprobs(row["answer_logprobs"]), "refusal": None}


def chat_completion_body(rows: dict | list[dict], model: str, created: int, job_key: str) -> dict:
    """A chat.completion for one row, or for the n choice rows of one line (in choice order)."""
    rows = [rows] if isinstance(rows, dict) else rows
    prompt = _count(rows[0], "prompt_tokens")  # one prompt, counted once however many choices
    completion = sum(_count(r, "completion_tokens") for r in rows)
    return {
        "id": f"chatcmpl-{_token(job_key, source_id(rows[0]), 'chat')}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": index,
            "message": _message(row),
            "finish_reason": "length" if row.get("finish_reason") == "length" else "stop",
            "logprobs": _chat_logprobs(row),
        } for index, row in enumerate(rows)],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": min(_count(r, "cached_prompt_tokens") for r in rows)},
            "completion_tokens_details": {"reasoning_tokens": sum(_count(r, "reasoning_tokens") for r in rows)},
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
        "content": [{"type": "output_text", "text": row.get("output_text") or "", "annotations": [],
                     "logprobs": openai_logprobs(row.get("answer_logprobs"))}],
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


def batch_output_line(rows: dict | list[dict], *, model: str, created: int, job_key: str) -> dict:
    """One Batch output line for one result row, or for the n choice rows of one line (as
    `fold_choices` groups the rows read back from a committed shard)."""
    rows = [rows] if isinstance(rows, dict) else rows
    first = rows[0]
    custom_id = source_id(first)
    line = {"id": f"batch_req_{_token(job_key, custom_id)}", "custom_id": custom_id}
    failed = next((r for r in rows if r.get("status") == "error"), None)
    if failed is not None:
        message = failed.get("error") or "failed"
        if _choice_index(failed) is not None:
            message = f"choice {_choice_index(failed)} of {len(rows)}: {message}"
        line.update(response=None, error={"code": ERROR_CODE, "message": message, "param": None, "line": None})
        return line
    model = first.get("model") or model
    if first.get("request_kind") == "responses":
        body = response_body(first, model, created, job_key)
    else:
        body = chat_completion_body(rows, model, created, job_key)
    line["response"] = {
        "status_code": 200,
        "request_id": f"req_{_token(job_key, custom_id, 'request')}",
        "body": body,
    }
    line["error"] = None
    return line


def choices_of(record: dict) -> int:
    """The ``n`` of a chat-completions Batch line; 1 for every other record, and for an n the
    schema refuses (the line then fails with the schema's message)."""
    if not is_batch_line(record) or BATCH_ENDPOINTS.get(record.get("url")) != "chat":
        return 1
    body = record.get("body")
    n = body.get("n") if isinstance(body, dict) else None
    return n if type(n) is int and 1 <= n <= MAX_CHOICES else 1


def choice_id(custom_id: str, index: int) -> str:
    return f"{custom_id}#{index}"


def planned_ids(record: dict, fallback: str) -> list[str]:
    """Every id a record's results take: its own and, for n choices, each choice's (the planner
    checks them all for duplicates, so no choice id collides with another line's id)."""
    own = record_id(record, fallback)
    n = choices_of(record)
    return [own] if n == 1 else [own, *(choice_id(own, i) for i in range(n))]


def choice_seed(base_seed: int, custom_id: str, index: int) -> int:
    """Choice ``index``'s seed when the body gives one: a stable hash of that seed and the choice
    id, taken to 0..2^63-1 (the range an explicit seed may take)."""
    from ossbatch.pipeline.infer import row_seed  # imported here: reading a shard needs no torch

    return row_seed(base_seed, choice_id(custom_id, index)) % (1 << 63)


def expand_choices(record: dict, request: dict) -> list[dict]:
    """The requests of one record: n for a line with ``n`` > 1 (see the module docstring), else
    the request itself. A line that failed validation stays one error request."""
    n = choices_of(record)
    if n == 1 or request.get("error"):
        return [request]
    seed, own = request.get("seed"), request["id"]
    return [dict(request, id=choice_id(own, i), seed=None if seed is None else choice_seed(seed, own, i),
                 passthrough={**(request.get("passthrough") or {}), CHOICE_COLUMN: i})
            for i in range(n)]


def _choice_index(row: dict) -> int | None:
    """A choice row's index (from its part-file column or, before commit, its passthrough); None
    for any other row, such as a plain row whose input has a column of that name."""
    index = row.get(CHOICE_COLUMN, (row.get("passthrough") or {}).get(CHOICE_COLUMN))
    if row.get("request_kind") != "chat" or type(index) is not int or not str(row.get("id")).endswith(f"#{index}"):
        return None
    return index


def source_id(row: dict) -> str:
    """The custom_id of the line a result row answers (a choice row's id less its ``#i``)."""
    index = _choice_index(row)
    return row["id"] if index is None else row["id"].removesuffix(f"#{index}")


def fold_choices(rows: Iterable[tuple[dict, int]]) -> Iterator[tuple[list[dict], int]]:
    """(rows of one input line, created): consecutive choice rows 0..n-1 of a line together."""
    group: list[dict] = []
    created = 0
    for row, row_created in rows:
        index = _choice_index(row)
        if index and group and len(group) == index and source_id(row) == source_id(group[0]):
            group.append(row)
            continue
        if group:
            yield group, created
        group, created = [row], row_created
    if group:
        yield group, created


def count_lines(results: list[dict]) -> int:
    """Input lines answered by a shard's results: choice rows of one line count once, and must
    come as 0, 1, ... in order (a commit takes a line's choices whole)."""
    lines, previous = 0, None
    for r in results:
        index = _choice_index(r)
        if not index:
            lines += 1
        elif previous is None or _choice_index(previous) != index - 1 or source_id(previous) != source_id(r):
            raise ValueError(f"id {r.get('id')!r}: choice {index} does not follow choice {index - 1} of its line")
        previous = r
    return lines


BATCH_COLUMNS = [
    "id", "status", "finish_reason", "output_text", "reasoning_text", "error", "prompt_tokens",
    "reasoning_tokens", "output_tokens", "completion_tokens", "request_kind", "model", "cached_prompt_tokens",
    CHOICE_COLUMN, "answer_logprobs",
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
    """Write the Batch output file atomically from (row, created) pairs, in input order (the n
    choice rows of a line fold into one line); returns the line count."""
    count = 0
    with storage.atomic_open(output_uri, "w") as out:
        for line_rows, created in fold_choices(rows):
            line = batch_output_line(line_rows, model=model, created=created, job_key=job_key)
            out.write(json.dumps(line, ensure_ascii=False) + "\n")
            count += 1
    return count
