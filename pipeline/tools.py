"""Function calling through harmony: a request's tools, its tool choice, and the calls a completion makes.

A Batch body's ``tools`` (chat: ``{type: function, function: {name, description, parameters,
strict}}``; responses: ``{type: function, name, description, parameters, strict}``) become plain
tool dicts ``{name, description, parameters (JSON Schema text or None), strict}``, rendered as
harmony's own tool descriptions (``DeveloperContent.with_function_tools``) in the developer message.
``tool_choice`` becomes ``"auto"``, ``"none"``, ``"required"`` or ``{"name": NAME}``.

Harmony ends an assistant turn at its first call (``<|call|>`` is a stop token), so a completion
makes at most one call: ``parallel_tool_calls: false`` is what it always does, and ``true`` (a
permission, OpenAI's default) is met by a single call.

`call_spec` says what the grammar must allow after the reasoning: a final answer, calls (each with
its arguments constrained to the function's parameter schema), or both. A row needs a grammar for
its tools when ``tool_choice`` is ``none`` (calls forbidden), ``required`` or names a function
(a call forced), or a tool is ``strict`` (its arguments constrained); ``auto`` without strict tools
leaves the model free. Under a grammar every function's arguments follow its parameter schema (a
function without ``parameters`` takes ``{}``), strict or not.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "CallSpec", "FUNCTIONS", "JSON_CONTENT_TYPE", "NO_PARAMETERS", "call_id", "call_spec",
    "function_name", "tool_descriptions", "tools_from_body",
]

FUNCTIONS = "functions"  # harmony's namespace for developer-defined functions: recipient "functions.NAME"
JSON_CONTENT_TYPE = "<|constrain|>json"  # the content type harmony gives a call's JSON arguments
TOOL_CHOICES = ("auto", "none", "required")
# OpenAI's rule for a function's name; it also keeps the harmony header one plain word.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# What a function without ``parameters`` takes (OpenAI: "an empty parameter list").
NO_PARAMETERS = '{"type":"object","properties":{},"additionalProperties":false}'


@dataclass(frozen=True)
class CallSpec:
    """What may follow the reasoning: ``final`` (an answer) and/or a call to one of ``functions``
    (``(name, parameter schema text)`` pairs, the arguments constrained to that schema)."""

    functions: tuple[tuple[str, str], ...]
    final: bool


def _fail(where: str, message: str):
    raise ValueError(f"{where}: {message}")


def tools_from_body(body: dict, kind: str, where: str, check_schema: Callable[[object, str], str]) -> tuple[list, object]:
    """``(tools, tool_choice)`` of a chat (``kind`` "chat") or responses body; ``where`` is the
    body's path ("body"); ``check_schema(value, path)`` returns a schema's compact JSON text or
    raises naming ``path``. Raises ``ValueError`` naming the field."""
    given = body.get("tools") or []
    tools, names = [], set()
    for index, tool in enumerate(given):
        at = f"{where}.tools[{index}]"
        if not isinstance(tool, dict):
            _fail(at, f"must be an object, got {type(tool).__name__}")
        if tool.get("type") != "function":
            _fail(f"{at}.type", f"only function tools are supported, got {tool.get('type')!r}")
        if kind == "chat":
            spec, at = tool.get("function"), f"{at}.function"
            if not isinstance(spec, dict):
                _fail(at, "missing (a chat tool is {type: function, function: {name, parameters, ...}})")
        else:
            spec = tool
        name = spec.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            _fail(f"{at}.name", f"must be 1 to 64 letters, digits, underscores or dashes, got {name!r}")
        if name in names:
            _fail(f"{at}.name", f"function {name!r} is defined twice")
        names.add(name)
        description = spec.get("description")
        if description is not None and not isinstance(description, str):
            _fail(f"{at}.description", f"must be a string, got {type(description).__name__}")
        parameters = spec.get("parameters")
        if parameters is not None:
            parameters = check_schema(parameters, f"{at}.parameters")
            if json.loads(parameters) is False:
                _fail(f"{at}.parameters", "the schema `false` accepts no arguments")
        # The Responses API makes function tools strict unless told otherwise; chat does not.
        strict = spec.get("strict", kind != "chat")
        if strict is None:
            strict = kind != "chat"
        if not isinstance(strict, bool):
            _fail(f"{at}.strict", f"must be true or false, got {strict!r}")
        tools.append({"name": name, "description": description or "", "parameters": parameters, "strict": strict})
    # parallel_tool_calls (a boolean, checked by the request schema) needs nothing here: see above.
    return tools, _tool_choice(body.get("tool_choice"), kind, names, f"{where}.tool_choice")


def _tool_choice(choice, kind: str, names: set[str], at: str):
    if choice is None:
        return None
    if not names:
        if choice in ("none", "auto"):  # asks for no call: harmless without tools
            return None
        _fail(at, "is only allowed when tools are given")
    if isinstance(choice, str):
        if choice not in TOOL_CHOICES:
            _fail(at, f"unknown value {choice!r}; allowed: auto, none, required, or a function")
        return choice
    if not isinstance(choice, dict) or choice.get("type") != "function":
        _fail(at, f"must be auto, none, required, or {{type: function, ...}} naming a function, got {choice!r}")
    name = (choice.get("function") or {}).get("name") if kind == "chat" else choice.get("name")
    if name not in names:
        field = f"{at}.function.name" if kind == "chat" else f"{at}.name"
        _fail(field, f"names no function among the tools: {name!r}")
    return {"name": name}


def function_name(recipient: str | None) -> str | None:
    """The function a harmony recipient ``functions.NAME`` calls, else None."""
    prefix = FUNCTIONS + "."
    return recipient[len(prefix):] if recipient and recipient.startswith(prefix) else None


def tool_descriptions(tools: list[dict] | None) -> str | None:
    """The tools as one hashable text (the render cache's key), or None without tools."""
    if not tools:
        return None
    return json.dumps([[t["name"], t.get("description") or "", t.get("parameters")] for t in tools],
                      separators=(",", ":"), ensure_ascii=False)


def call_spec(tools: list[dict] | None, tool_choice) -> CallSpec | None:
    """The grammar's part for a row's tools, or None when the tools need no grammar (none given,
    or ``auto`` without a strict tool)."""
    if not tools:
        return None
    choice = tool_choice or "auto"
    if choice == "none":
        return CallSpec((), True)
    if choice == "auto" and not any(t.get("strict") for t in tools):
        return None
    chosen = [t for t in tools if not isinstance(choice, dict) or t["name"] == choice["name"]]
    functions = tuple((t["name"], t.get("parameters") or NO_PARAMETERS) for t in chosen)
    return CallSpec(functions, final=choice == "auto")


def call_id(row_id: str, index: int) -> str:
    """A call's id: stable for a row (re-runs give the same ids), in OpenAI's ``call_`` form."""
    return "call_" + hashlib.blake2b(f"{row_id}\x1f{index}".encode(), digest_size=12).hexdigest()
