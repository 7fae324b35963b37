"""Turn one input record (a plain row or an OpenAI Batch API line) into a normalized request.

A request is a plain dict with the keys in ``REQUEST_KEYS``. A record that fails validation still
becomes a request, with ``error`` naming the place and the field, so it comes out as an output
row with status "error" instead of stopping the job. Only duplicate ids stop a job (see job.py).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math

import re

import jsonschema

from ossbatch.pipeline.batch_fields import (
    CHAT_ECHO, LOGIT_BIAS_RANGE, MAX_STOP, RESPONSE_ECHO, RESPONSES_LOGPROBS, FieldError, body_error, model_error,
)
from ossbatch.pipeline.harmony import TOKENIZER_VOCAB_SIZE as TOKENIZER_VOCAB  # the ids a logit_bias may name
from ossbatch.pipeline.storage import InputError  # re-exported: callers catch pipeline.validate.InputError
from ossbatch.pipeline.tools import tools_from_body

__all__ = [
    "ECHO_COLUMN",
    "InputError",
    "REQUEST_KEYS",
    "error_request",
    "is_batch_line",
    "normalize",
    "passthrough_of",
    "record_id",
    "request_schema",
]

REQUEST_KEYS = (
    "id", "messages", "instructions", "reasoning_effort", "max_tokens", "temperature", "top_p",
    "seed", "max_reasoning_tokens", "schema", "stop", "logit_bias", "presence_penalty", "frequency_penalty",
    "request_kind", "passthrough", "error", "tools", "tool_choice", "logprobs", "top_logprobs",
)
# Columns a plain row consumes; every other column is passed through to the output.
PLAIN_FIELDS = frozenset({
    "id", "prompt", "messages", "instructions", "reasoning_effort", "max_tokens", "temperature",
    "top_p", "seed", "max_reasoning_tokens", "schema", "stop", "logit_bias", "presence_penalty", "frequency_penalty",
    "logprobs", "top_logprobs",
})
BATCH_FIELDS = frozenset({"id", "custom_id", "method", "url", "body"})
BATCH_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/responses": "responses"}
INSTRUCTION_ROLES = ("system", "developer")
# json_object mode has no schema of its own; "any JSON object" is what it promises.
JSON_OBJECT_SCHEMA = '{"type":"object"}'
MAX_ERRORS_PER_ROW = 3
# Deeper rows are refused: Python's recursive JSON and JSON Schema code (json, jsonschema) hits
# its recursion limit near 100 schema levels or 1000 value levels, far past any real row.
MAX_NESTING = 64
# A Batch line's passthrough column (JSON text) with what its output echoes: the body's echoed
# fields and, for a line refused before it ran, OpenAI's error code and param (batch_api reads it).
ECHO_COLUMN = "batch_echo"
# The echoed body fields of each endpoint (batch_api fills the job's defaults for those absent).
_ECHOED = {"chat": CHAT_ECHO,
           "responses": ("instructions", "reasoning", "text", "max_output_tokens", "temperature", "top_p", *RESPONSE_ECHO)}

@functools.cache
def load_schema(name: str) -> dict:
    return json.loads(importlib.resources.files("ossbatch.schemas").joinpath(name).read_text())


@functools.cache
def request_schema() -> dict:
    return load_schema("request.schema.json")


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = request_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


class RowError(ValueError):
    """A field that passed the schema but cannot be used; the message starts with the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def is_batch_line(record: dict) -> bool:
    """The Batch API form: ``body`` plus any of url/custom_id/method (as the schema's ``if``)."""
    return record.get("body") is not None and any(
        record.get(key) is not None for key in ("url", "custom_id", "method")
    )


def record_id(record: dict, fallback: str) -> str:
    """The row's id: ``id``, else ``custom_id``, else ``fallback`` ("file:line").

    An integral float (``7.0``, as a Parquet float column or a JSON writer gives it) is the id
    its integer would be ("7"), so results join back; any other float is refused by the schema.
    The planner deduplicates with this same function, so the ids it checks are the ids read.
    """
    value = record.get("id")
    if value is None:
        value = record.get("custom_id")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return fallback
    return str(value)


def nesting_depth_exceeds(value, limit: int = MAX_NESTING) -> bool:
    """True when ``value`` nests lists/dicts more than ``limit`` levels (checked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list, tuple)))
    return False


def passthrough_of(record: dict) -> dict:
    """The input columns that are not ours, kept for the output (a Batch body's model too)."""
    if is_batch_line(record):
        extra = {k: v for k, v in record.items() if k not in BATCH_FIELDS}
        body = record.get("body")
        if isinstance(body, dict) and body.get("model") is not None:
            extra.setdefault("model", body["model"])
        extra[ECHO_COLUMN] = echo_text(body if isinstance(body, dict) else {},
                                       BATCH_ENDPOINTS.get(record.get("url"), "chat"))
        return extra
    return {k: v for k, v in record.items() if k not in PLAIN_FIELDS}


def echo_text(body: dict, kind: str, error: FieldError | None = None) -> str:
    """The echo column's JSON text: the body's echoed fields (and a refusal's code and param)."""
    echo = {"kind": kind, "body": {k: body[k] for k in _ECHOED[kind] if body.get(k) is not None}}
    if error is not None:
        echo["error"] = {"code": error.code, "param": error.param}
    return json.dumps(echo, ensure_ascii=False, sort_keys=True, default=str)


def echo_of(row: dict) -> dict:
    """A result row's echo (its passthrough column, or its passthrough before commit); {} if none."""
    text = row.get(ECHO_COLUMN, (row.get("passthrough") or {}).get(ECHO_COLUMN))
    try:
        echo = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        echo = None
    return echo if isinstance(echo, dict) else {}


def error_request(request_id: str, message: str, request_kind: str = "row", passthrough: dict | None = None) -> dict:
    request = dict.fromkeys(REQUEST_KEYS)
    request.update(id=request_id, messages=[], request_kind=request_kind, passthrough=passthrough or {}, error=message)
    return request


def _refused(request_id: str, where: str, kind: str, passthrough: dict, body, error: FieldError) -> dict:
    """An error request for a Batch line refused as OpenAI would refuse the request (400)."""
    passthrough = dict(passthrough)
    if ECHO_COLUMN in passthrough:
        passthrough[ECHO_COLUMN] = echo_text(body if isinstance(body, dict) else {}, kind, error)
    return error_request(request_id, f"{where}: {error.message}", kind, passthrough)


def normalize(record: dict, *, fallback_id: str, where: str, models: frozenset[str] | None = None) -> dict:
    """One record as a request; ``where`` ("file line 7") prefixes any error message. ``models``:
    the names the job's model answers to; a Batch line asking for another fails (None: no check)."""
    batch = is_batch_line(record)
    request_id = record_id(record, fallback_id)
    kind = BATCH_ENDPOINTS.get(record.get("url"), "chat") if batch else "row"
    passthrough = passthrough_of(record)
    present = {k: v for k, v in record.items() if v is not None}  # null columns count as absent
    if batch and isinstance(present.get("body"), dict):  # so do a body's null fields (a Parquet struct has them all)
        present["body"] = {k: v for k, v in present["body"].items() if v is not None}
    deep = [k for k, v in present.items() if nesting_depth_exceeds(v, MAX_NESTING - 1)]
    if deep:
        return error_request(request_id, f"{where}: {deep[0]}: nested more than {MAX_NESTING} levels deep",
                             kind, {k: v for k, v in passthrough.items() if k not in deep})
    try:
        problems = schema_problems(present)
    except RecursionError:
        problems = [f"row: nested too deeply to check (more than {MAX_NESTING} levels)"]
    body = present.get("body")
    if batch and isinstance(body, dict) and record.get("url") in BATCH_ENDPOINTS:
        refusal = body_error(body, kind) or model_error(body.get("model"), models)
        if refusal is not None:
            return _refused(request_id, where, kind, passthrough, body, refusal)
    if problems:
        if not batch:
            return error_request(request_id, f"{where}: {'; '.join(problems)}", kind, passthrough)
        error = FieldError("invalid_value", _first_param(present), "; ".join(problems))
        return _refused(request_id, where, kind, passthrough, body, error)
    try:
        if not batch:
            fields = _from_row(present)
        elif kind == "chat":
            fields = _from_chat(present["body"])
        else:
            fields = _from_responses(present["body"])
    except RowError as err:
        if not batch:
            return error_request(request_id, f"{where}: {err}", kind, passthrough)
        return _refused(request_id, where, kind, passthrough, body, FieldError("invalid_value", err.param, str(err)))
    request = dict.fromkeys(REQUEST_KEYS)
    request.update(fields, id=request_id, request_kind=kind, passthrough=passthrough, error=None)
    return request


def schema_problems(record: dict) -> list[str]:
    """Readable messages, each naming its field, for what request.schema.json rejects."""
    errors = sorted(_validator().iter_errors(record), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    messages: list[str] = []
    for error in errors:
        message = _describe(error)
        if message not in messages:
            messages.append(message)
    if len(messages) > MAX_ERRORS_PER_ROW:
        messages = messages[:MAX_ERRORS_PER_ROW] + [f"and {len(messages) - MAX_ERRORS_PER_ROW} more"]
    return messages


def _first_param(record: dict) -> str | None:
    """The body field (``temperature``, ``messages``) of the schema's first complaint, as OpenAI's param."""
    errors = sorted(_validator().iter_errors(record), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if not errors:
        return None
    path = list(errors[0].absolute_path)
    return str(path[1]) if path[:1] == ["body"] and len(path) > 1 else None


def field_path(parts) -> str:
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "row"


def _show(value) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe(error: jsonschema.ValidationError) -> str:
    path = list(error.absolute_path)
    if error.validator == "required":
        missing = next((name for name in error.validator_value if name not in error.instance), "?")
        custom = error.schema.get("x-error")
        if custom and not path:
            return custom.replace("{value}", _show(error.instance))
        return f"{field_path(path + [missing])}: missing"
    if error.validator == "anyOf":
        # When the value has the right shape for one branch, what is wrong inside it says more.
        deeper = [e for e in error.context if e.relative_path]
        if deeper:
            return _describe(jsonschema.exceptions.best_match(deeper))
    custom = error.schema.get("x-error") if isinstance(error.schema, dict) else None
    if custom:
        detail = custom.replace("{value}", _show(error.instance))
        return detail if not path else f"{field_path(path)}: {detail}"
    if error.validator == "enum":
        allowed = ", ".join(map(str, error.validator_value))
        return f"{field_path(path)}: unknown value {_show(error.instance)}; allowed: {allowed}"
    if error.validator == "type":
        wanted = error.validator_value if isinstance(error.validator_value, str) else " or ".join(error.validator_value)
        return f"{field_path(path)}: expected {wanted}, got {_show(error.instance)}"
    return f"{field_path(path)}: {error.message}"


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def _split_messages(messages: list[dict], where: str, call_field: str = "tool_call_id") -> tuple[list[dict], list[str]]:
    """(conversation turns, system/developer texts): harmony carries the latter as instructions.

    An assistant turn may carry ``tool_calls`` ([{id, name, arguments}]); a ``tool`` turn names the
    function whose call (``tool_call_id``, an earlier call's id) it answers; ``call_field`` is that
    field's name in the input (a Responses function_call_output's is ``call_id``)."""
    turns, instructions, called = [], [], {}
    for index, message in enumerate(messages):
        role = message["role"]
        if role in INSTRUCTION_ROLES:
            instructions.append(_text(message["content"]))
        elif role == "tool":
            name = called.get(message["tool_call_id"])
            if name is None:
                raise RowError(f"{where}[{index}].{call_field}: {message['tool_call_id']!r} is the id of no earlier "
                               "assistant tool call")
            turns.append({"role": "tool", "name": name, "content": _text(message["content"])})
        elif message.get("tool_calls"):
            calls = [{"id": c["id"], "name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                     for c in message["tool_calls"]]
            called.update((c["id"], c["name"]) for c in calls)
            turns.append({"role": role, "content": _text(message.get("content") or ""), "tool_calls": calls})
        else:
            turns.append({"role": role, "content": _text(message["content"])})
    if not turns:
        raise RowError(f"{where}: needs at least one user or assistant message besides system/developer ones")
    return turns, instructions


def _responses_items(items: list[dict]) -> list[dict]:
    """Responses input items as chat messages: function_call items as assistant tool calls, their
    function_call_output items as tool messages."""
    messages = []
    for item in items:
        if item.get("type") == "function_call":
            call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif item.get("type") == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
        else:
            messages.append(item)
    return messages


def _tools(body: dict, kind: str) -> dict:
    try:
        tools, tool_choice = tools_from_body(body, kind, "body", _schema_text)
    except ValueError as err:  # "body.tools[0].function.name: ..." -> param "tools"
        param = re.match(r"body\.(\w+)", str(err))
        raise RowError(str(err), param.group(1) if param else None) from None
    return {"tools": tools or None, "tool_choice": tool_choice}


def _instructions(first: str | None, more: list[str]) -> str | None:
    parts = [p for p in [first, *more] if p]
    return "\n\n".join(parts) if parts else None


def _schema_text(value, where: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise RowError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(value, (dict, bool)):
        raise RowError(f"{where}: must be a JSON Schema object, got {_show(value)}")
    if nesting_depth_exceeds(value):
        raise RowError(f"{where}: nested more than {MAX_NESTING} levels deep")
    try:
        jsonschema.Draft202012Validator.check_schema(value)
    except jsonschema.SchemaError as err:
        raise RowError(f"{where}: not a valid JSON Schema ({err.message})") from None
    except RecursionError:
        raise RowError(f"{where}: nested too deeply to check") from None
    loop = _ref_loop(value)
    if loop:
        raise RowError(f"{where}: $ref {loop!r} refers back to itself without describing any value "
                       "(a self-referencing $ref matches nothing a model could write)")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# Keywords whose subschemas apply to the same value as their parent: following only these,
# a $ref that comes back to where it started never reaches a property or an item.
_IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
_IN_PLACE_ONE = ("not", "if", "then", "else")


def _pointer(root, ref: str):
    """The subschema a local ``$ref`` ("#", "#/$defs/a") names, or None."""
    if not ref.startswith("#"):
        return None
    node = root
    for token in [t for t in ref[1:].split("/") if t]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
    return node


def _ref_loop(root) -> str | None:
    """A local $ref that reaches itself through in-place keywords only, or None."""
    def in_place(node):
        if not isinstance(node, dict):
            return []
        found = [node[k] for k in _IN_PLACE_ONE if isinstance(node.get(k), dict)]
        for key in _IN_PLACE_LISTS:
            found += [n for n in node.get(key) or [] if isinstance(n, dict)] if isinstance(node.get(key), list) else []
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = _pointer(root, ref)
            if isinstance(target, dict):
                found.append((ref, target))
        return found

    # Every subschema is a possible start; a walk along in-place edges that revisits a node loops.
    starts, seen_starts = [root], set()
    stack = [root]
    while stack:  # collect every dict subschema without recursion
        node = stack.pop()
        if isinstance(node, dict):
            if id(node) in seen_starts:
                continue
            seen_starts.add(id(node))
            starts.append(node)
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(v for v in node if isinstance(v, (dict, list)))
    done: set[int] = set()
    for start in starts:
        if id(start) in done:
            continue
        path: dict[int, str | None] = {}
        walk = [(start, None, False)]
        while walk:
            node, via, leaving = walk.pop()
            if leaving:
                path.pop(id(node), None)
                done.add(id(node))
                continue
            if id(node) in path:
                return via or "#"
            if id(node) in done:
                continue
            path[id(node)] = via
            walk.append((node, via, True))
            for edge in in_place(node):
                ref, child = edge if isinstance(edge, tuple) else (via, edge)
                walk.append((child, ref, False))
    return None


def _finite(source: dict, name: str, bounds: str) -> float | None:
    if name not in source:
        return None
    value = float(source[name])
    if not math.isfinite(value):  # NaN passes every bound check of the schema
        raise RowError(f"{name}: must be a number {bounds}, got {value}", name)
    return value


def _sampling(source: dict, max_tokens_keys: tuple[str, ...], prefix: str = "") -> dict:
    max_tokens = next((source[k] for k in max_tokens_keys if source.get(k) is not None), None)
    source = {k: v for k, v in source.items() if v is not None}
    return {
        "max_tokens": int(max_tokens) if max_tokens is not None else None,
        "temperature": _finite(source, "temperature", "from 0 to 2"),
        "top_p": _finite(source, "top_p", "in (0, 1]"),
        "seed": int(source["seed"]) if "seed" in source else None,
        "presence_penalty": _finite(source, "presence_penalty", "from -2 to 2"),
        "frequency_penalty": _finite(source, "frequency_penalty", "from -2 to 2"),
        "stop": _stop(source.get("stop"), prefix + "stop"),
        "logit_bias": _logit_bias(source.get("logit_bias"), prefix + "logit_bias"),
    }


def _stop(value, where: str) -> list[str] | None:
    """OpenAI's stop: a string or up to MAX_STOP strings (the schema checks the types)."""
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else list(value)
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise RowError(f"{where}: up to {MAX_STOP} non-empty strings, got {_show(value)}", "stop")
    return stops or None


def _logit_bias(value, where: str) -> dict[int, float] | None:
    """{token id: bias}: ids of o200k_harmony (JSON keys are strings), biases -100..100."""
    if not value:
        return None
    low, high = LOGIT_BIAS_RANGE
    bias = {}
    for key, amount in value.items():
        token = str(key).strip()
        if not token.isdigit() or int(token) >= TOKENIZER_VOCAB:
            raise RowError(f"{where}: {key!r} is not a token id of o200k_harmony (0 to {TOKENIZER_VOCAB - 1})", "logit_bias")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not low <= amount <= high:
            raise RowError(f"{where}.{token}: must be a number from {low} to {high}, got {_show(amount)}", "logit_bias")
        bias[int(token)] = float(amount)
    return bias


def _from_row(row: dict) -> dict:
    if "prompt" in row:
        turns, extra = [{"role": "user", "content": row["prompt"]}], []
    else:
        turns, extra = _split_messages(row["messages"], "messages")
    return {
        "messages": turns,
        "instructions": _instructions(row.get("instructions"), extra),
        "reasoning_effort": row.get("reasoning_effort"),
        "max_reasoning_tokens": int(row["max_reasoning_tokens"]) if "max_reasoning_tokens" in row else None,
        "schema": _schema_text(row["schema"], "schema") if "schema" in row else None,
        **_sampling(row, ("max_tokens",)),
        "logprobs": row.get("logprobs"),
        "top_logprobs": row.get("top_logprobs"),
    }


def _format_schema(fmt: dict | None, schema_key_path: str, schema) -> str | None:
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt["type"] == "json_object" or schema is None:
        return JSON_OBJECT_SCHEMA
    return _schema_text(schema, schema_key_path)


def _from_chat(body: dict) -> dict:
    turns, instructions = _split_messages(body["messages"], "body.messages")
    fmt = body.get("response_format")
    schema = (fmt or {}).get("json_schema", {}).get("schema")
    return {
        "messages": turns,
        "instructions": _instructions(None, instructions),
        "reasoning_effort": body.get("reasoning_effort"),
        "max_reasoning_tokens": None,
        "schema": _format_schema(fmt, "body.response_format.json_schema.schema", schema),
        **_sampling(body, ("max_completion_tokens", "max_tokens"), "body."),
        **_tools(body, "chat"),
        **_logprob_fields(body.get("logprobs", False), body.get("top_logprobs"), "body.top_logprobs", "body.logprobs"),
    }


def _from_responses(body: dict) -> dict:
    given = body["input"]
    if isinstance(given, str):
        turns, instructions = [{"role": "user", "content": given}], []
    else:
        turns, instructions = _split_messages(_responses_items(given), "body.input", "call_id")
    fmt = (body.get("text") or {}).get("format")
    return {
        "messages": turns,
        "instructions": _instructions(body.get("instructions"), instructions),
        "reasoning_effort": (body.get("reasoning") or {}).get("effort"),
        "max_reasoning_tokens": None,
        "schema": _format_schema(fmt, "body.text.format.schema", (fmt or {}).get("schema")),
        **_sampling(body, ("max_output_tokens",), "body."),
        **_tools(body, "responses"),
        **_logprob_fields(RESPONSES_LOGPROBS in (body.get("include") or []), body.get("top_logprobs"),
                          "body.top_logprobs", f"body.include {RESPONSES_LOGPROBS!r}"),
    }


def _logprob_fields(wanted: bool, top: int | None, top_path: str, wanted_path: str) -> dict:
    """A request's ``logprobs`` (the answer's token logprobs) and ``top_logprobs`` (K alternatives)."""
    if top and not wanted:  # as OpenAI: alternatives are part of the logprobs asked for
        raise RowError(f"{top_path}: needs {wanted_path} (top_logprobs are given with the logprobs)", "top_logprobs")
    return {"logprobs": bool(wanted) or None, "top_logprobs": int(top) if top is not None else None}
