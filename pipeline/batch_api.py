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

Failed lines go to their own file, as OpenAI's Batch writes its error file: ``out.errors.jsonl``
beside ``out.jsonl`` (`error_output_of`), same line format. A line refused before it ran (a field
the table in batch_fields refuses or does not know, a wrong model, an invalid value) is answered as
OpenAI answers an invalid request: ``response.status_code`` 400 and ``body.error`` {message, type,
param, code}; a line that failed later carries the Batch ``error`` object.

Echoes come from the line's ``batch_echo`` column (validate.ECHO_COLUMN): a Response echoes its
instructions, reasoning, text, max_output_tokens, temperature and top_p (the job's defaults for
those the body left out) and the harmless fields given (user, metadata, store, service_tier, ...);
a chat.completion echoes service_tier.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from contextlib import ExitStack

import pyarrow.parquet as pq

from ossbatch.pipeline.batch_fields import RESPONSE_ECHO
from ossbatch.pipeline.logprobs import openai_logprobs
from ossbatch.pipeline.storage import Storage, remove
from ossbatch.pipeline.validate import ECHO_COLUMN, BATCH_ENDPOINTS, echo_of, is_batch_line, record_id

ERROR_CODE = "request_failed"
INVALID_REQUEST = 400
ERRORS_SUFFIX = ".errors.jsonl"
MAX_CHOICES = 128  # OpenAI's limit on n
CHOICE_COLUMN = "choice_index"


def _token(*parts: str, length: int = 24) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:length]


def _count(row: dict, name: str) -> int:
    return int(row.get(name) or 0)


def _message(row: dict) -> dict:
    calls = row.get("tool_calls")
    # OpenAI's content is null beside tool calls when the model wrote no text
    content = row.get("output_text") or (None if calls else "")
    message = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        message["tool_calls"] = [{"id": c["id"], "type": "function",
                                  "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]
    if row.get("reasoning_text") is not None:
        message["reasoning_content"] = row["reasoning_text"]
    return message


def error_output_of(output: str) -> str:
    """Where a Batch output's failed lines go by default: ``out.jsonl`` -> ``out.errors.jsonl``."""
    stem = output[: -len(".jsonl")] if output.lower().endswith(".jsonl") else output
    return stem + ERRORS_SUFFIX


def _finish_reason(row: dict) -> str:
    reason = row.get("finish_reason")
    return reason if reason in ("length", "tool_calls") else "stop"


def _chat_logprobs(row: dict) -> dict | None:
    """The choice's logprobs: the answer's tokens, when the line asked (``logprobs: true``)."""
    if row.get("answer_logprobs") is None:
        return None
    return {"content": openai_logprobs(row["answer_logprobs"]), "refusal": None}


def chat_completion_body(rows: dict | list[dict], model: str, created: int, job_key: str) -> dict:
    """A chat.completion for one row, or for the n choice rows of one line (in choice order)."""
    rows = [rows] if isinstance(rows, dict) else rows
    echoed = echo_of(rows[0]).get("body") or {}
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
            "finish_reason": _finish_reason(row),
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
        "service_tier": echoed.get("service_tier"),
    }


def _response_echo(row: dict, defaults: dict) -> dict:
    """What a Response echoes of its request, filled with the job's defaults where the body gave none."""
    given = echo_of(row).get("body") or {}
    reasoning = given.get("reasoning") or {}
    text = given.get("text") or {}
    return {
        "instructions": given.get("instructions"),
        "max_output_tokens": given.get("max_output_tokens", defaults.get("max_tokens")),
        "temperature": given.get("temperature", defaults.get("temperature")),
        "top_p": given.get("top_p", defaults.get("top_p")),
        "reasoning": {"effort": reasoning.get("effort") or defaults.get("reasoning_effort"), "summary": None},
        "text": {"format": text.get("format") or {"type": "text"}, "verbosity": text.get("verbosity") or "medium"},
        "truncation": "disabled",
        "tools": [],
        "tool_choice": "auto" if given.get("tools") else "none",
        "parallel_tool_calls": True,  # OpenAI's default; each completion makes at most one call anyway
        **{k: given[k] for k in RESPONSE_ECHO if k in given},
    }


def response_body(row: dict, model: str, created: int, job_key: str, defaults: dict | None = None) -> dict:
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
    calls = row.get("tool_calls") or []
    if row.get("output_text") is not None or not calls:
        output.append({
            "id": f"msg_{_token(job_key, row['id'], 'message')}",
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [{"type": "output_text", "text": row.get("output_text") or "", "annotations": [],
                         "logprobs": openai_logprobs(row.get("answer_logprobs"))}],
        })
    output += [{"id": f"fc_{_token(job_key, row['id'], 'call', str(index))}", "type": "function_call", "call_id": c["id"],
                "name": c["name"], "arguments": c["arguments"], "status": "completed"} for index, c in enumerate(calls)]
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
        "usage": {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": _count(row, "cached_prompt_tokens"), "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": _count(row, "reasoning_tokens")},
            "total_tokens": prompt + completion,
        },
        **_response_echo(row, defaults or {}),
    }


def batch_output_line(rows: dict | list[dict], *, model: str, created: int, job_key: str,
                      defaults: dict | None = None) -> dict:
    """One Batch output line for one result row, or for the n choice rows of one line (as
    `fold_choices` groups the rows read back from a committed shard)."""
    rows = [rows] if isinstance(rows, dict) else rows
    first = rows[0]
    custom_id = source_id(first)
    line = {"id": f"batch_req_{_token(job_key, custom_id)}", "custom_id": custom_id}
    failed = next((r for r in rows if r.get("status") == "error"), None)
    refusal = echo_of(failed).get("error") if failed is not None else None
    if isinstance(refusal, dict):  # refused before it ran: OpenAI's answer to an invalid request
        error = {"message": failed.get("error") or "invalid request", "type": "invalid_request_error",
                 "param": refusal.get("param"), "code": refusal.get("code")}
        line.update(response={"status_code": INVALID_REQUEST, "request_id": f"req_{_token(job_key, custom_id, 'request')}",
                              "body": {"error": error}}, error=None)
        return line
    if failed is not None:
        message = failed.get("error") or "failed"
        if _choice_index(failed) is not None:
            message = f"choice {_choice_index(failed)} of {len(rows)}: {message}"
        line.update(response=None, error={"code": ERROR_CODE, "message": message, "param": None, "line": None})
        return line
    model = first.get("model") or model
    if first.get("request_kind") == "responses":
        body = response_body(first, model, created, job_key, defaults)
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
    CHOICE_COLUMN, ECHO_COLUMN, "tool_calls", "answer_logprobs",
]


def iter_part_rows(fs, path: str) -> Iterator[dict]:
    """Rows of one committed part file, a row group at a time."""
    with fs.open(path, "rb") as f:
        reader = pq.ParquetFile(f)
        columns = [c for c in BATCH_COLUMNS if c in reader.schema_arrow.names]
        for batch in reader.iter_batches(columns=columns, batch_size=4096):
            yield from batch.to_pylist()


def is_failed(line: dict) -> bool:
    return line.get("error") is not None or (line.get("response") or {}).get("status_code") != 200


def write_batch_output(output_uri: str, storage: Storage, rows: Iterable[tuple[dict, int]], *, model: str,
                       job_key: str, error_uri: str | None = None, defaults: dict | None = None) -> tuple[int, int]:
    """Write the Batch output file atomically from (row, created) pairs, in input order (the n
    choice rows of a line fold into one line), its failed lines to ``error_uri`` (also atomically;
    None: into the output too). Returns (lines written to the output, failed lines)."""
    written = failed = 0
    with ExitStack() as files:
        out = files.enter_context(storage.atomic_open(output_uri, "w"))
        errors = None
        for line_rows, created in fold_choices(rows):
            line = batch_output_line(line_rows, model=model, created=created, job_key=job_key, defaults=defaults)
            text = json.dumps(line, ensure_ascii=False) + "\n"
            if error_uri is not None and is_failed(line):
                if errors is None:  # the error file exists only when a line failed, as OpenAI's
                    errors = files.enter_context(storage.atomic_open(error_uri, "w"))
                errors.write(text)
                failed += 1
                continue
            failed += is_failed(line)
            out.write(text)
            written += 1
    if error_uri is not None and not failed and storage.exists(error_uri):
        remove(*storage.filesystem(error_uri))  # an earlier job's errors (this job has none)
    return written, failed
