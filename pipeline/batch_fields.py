"""Every field of an OpenAI Batch body, and its one fate: honoured, refused, or accepted (and
echoed where OpenAI echoes it). A field not in the table fails its line too: a job that looks
successful but did not do what the file asked is the worst outcome.

`body_error` checks a body against the table (request.schema.json then checks the honoured
fields' values); `fields_markdown` is the table as README.md shows it (a test keeps them equal).
A failed check is a `FieldError`: OpenAI's ``{code, message, param}`` for an invalid request,
which the Batch output writes as a ``status_code`` 400 line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HONOURED = "honoured"
REFUSED = "refused"
ACCEPTED = "accepted"  # harmless: changes nothing here, accepted (and echoed where OpenAI echoes it)

MAX_STOP = 4
RESPONSES_LOGPROBS = "message.output_text.logprobs"  # the Responses API's include for the answer's logprobs
LOGIT_BIAS_RANGE = (-100, 100)
PENALTY_RANGE = (-2, 2)


@dataclass(frozen=True)
class Fate:
    fate: str
    note: str
    harmless: Callable[[Any], bool] | None = None  # for a refused field: values that ask for nothing pass


@dataclass(frozen=True)
class FieldError:
    """OpenAI's error for an invalid request: ``code``, ``param`` (the field) and ``message``."""

    code: str
    param: str | None
    message: str


def _equals(*allowed) -> Callable[[Any], bool]:
    return lambda value: value in allowed


def _empty(value) -> bool:
    return value in ([], {}, False, 0)


def _no_call(value) -> bool:  # tool_choice / function_call that call nothing
    return value in ("none", "auto")


_MODEL = Fate(HONOURED, "must name the job's model (the checkpoint folder's name, gpt-oss-20b / gpt-oss-120b with or "
                        "without openai/, or --served-model-name); the response echoes the name asked")
_TEMPERATURE = Fate(HONOURED, "0 to 2; 0 is greedy")
_TOP_P = Fate(HONOURED, "nucleus sampling, (0, 1]")
_SEED = Fate(HONOURED, "a row's sampling is a pure function of its seed (default: from --seed and the row's id)")
_STREAM = Fate(REFUSED, "false only: a batch does not stream", _equals(False))
_STREAM_OPTIONS = Fate(REFUSED, "a batch does not stream")
_TOOLS = Fate(HONOURED, "function tools, rendered as harmony tool descriptions; `strict` tools constrain the call's "
                        "arguments to their parameter schema; a call comes back as tool_calls / function_call")
_TOOL_CHOICE = Fate(HONOURED, "auto, none, required, or a named function (required and a named function force the call)")
_PARALLEL = Fate(HONOURED, "a completion makes at most one call (harmony ends the turn at <|call|>): false always holds")
_LEGACY_FUNCTIONS = Fate(REFUSED, "the deprecated form: use tools", _empty)
_LEGACY_FUNCTION_CALL = Fate(REFUSED, "the deprecated form: use tool_choice", _no_call)
_USER = Fate(ACCEPTED, "accepted")
_METADATA = Fate(ACCEPTED, "accepted")
_STORE = Fate(ACCEPTED, "accepted (nothing is stored)")
_SERVICE_TIER = Fate(ACCEPTED, "accepted, echoed")
_CACHE_KEY = Fate(ACCEPTED, "accepted (shared prompt prefixes are cached anyway)")
_SAFETY_ID = Fate(ACCEPTED, "accepted")

CHAT_FIELDS: dict[str, Fate] = {
    "model": _MODEL,
    "messages": Fate(HONOURED, "system/developer/user/assistant text messages, rendered with harmony"),
    "max_completion_tokens": Fate(HONOURED, "reasoning + answer tokens"),
    "max_tokens": Fate(HONOURED, "as max_completion_tokens"),
    "temperature": _TEMPERATURE,
    "top_p": _TOP_P,
    "seed": _SEED,
    "n": Fate(HONOURED, "1 to 128 choices over one prompt"),
    "reasoning_effort": Fate(HONOURED, "low, medium, high"),
    "response_format": Fate(HONOURED, "text, json_object, json_schema: the answer is constrained to the schema"),
    "stop": Fate(HONOURED, f"up to {MAX_STOP} strings: the answer ends before the first one, finish_reason stop"),
    "logit_bias": Fate(HONOURED, "o200k_harmony token id -> -100..100, added before sampling and masks"),
    "presence_penalty": Fate(HONOURED, "-2..2, on the tokens generated so far"),
    "frequency_penalty": Fate(HONOURED, "-2..2, per time a token was generated so far"),
    "user": _USER,
    "metadata": _METADATA,
    "store": _STORE,
    "service_tier": Fate(ACCEPTED, "accepted, echoed in the chat.completion"),
    "prompt_cache_key": _CACHE_KEY,
    "safety_identifier": _SAFETY_ID,
    "stream": _STREAM,
    "stream_options": _STREAM_OPTIONS,
    "logprobs": Fate(HONOURED, "the final answer's tokens' logprobs in choices[i].logprobs.content (raw distribution)"),
    "top_logprobs": Fate(HONOURED, "0 to 20 alternatives per answer token; needs logprobs: true"),
    "modalities": Fate(REFUSED, "text only", _equals(["text"])),
    "verbosity": Fate(REFUSED, "medium only: gpt-oss has no verbosity setting", _equals("medium")),
    "audio": Fate(REFUSED, "gpt-oss reads and writes text only"),
    "prediction": Fate(REFUSED, "predicted outputs are not supported"),
    "web_search_options": Fate(REFUSED, "no built-in web search"),
    "tools": _TOOLS,
    "tool_choice": _TOOL_CHOICE,
    "parallel_tool_calls": _PARALLEL,
    "functions": _LEGACY_FUNCTIONS,
    "function_call": _LEGACY_FUNCTION_CALL,
}

RESPONSES_FIELDS: dict[str, Fate] = {
    "model": _MODEL,
    "input": Fate(HONOURED, "a string or a list of text messages, rendered with harmony"),
    "instructions": Fate(HONOURED, "the developer message; echoed"),
    "max_output_tokens": Fate(HONOURED, "reasoning + answer tokens; echoed (the job's default when absent)"),
    "temperature": Fate(HONOURED, "0 to 2; echoed (the job's default when absent)"),
    "top_p": Fate(HONOURED, "(0, 1]; echoed (the job's default when absent)"),
    "seed": _SEED,
    "n": Fate(HONOURED, "1 only (the Responses API has no n)"),
    "reasoning": Fate(HONOURED, "effort honoured; echoed"),
    "reasoning.effort": Fate(HONOURED, "low, medium, high"),
    "reasoning.summary": Fate(REFUSED, "null only: the raw reasoning comes back as reasoning_text, no summary is "
                                       "written", _equals(None)),
    "reasoning.generate_summary": Fate(REFUSED, "null only, as reasoning.summary", _equals(None)),
    "text": Fate(HONOURED, "format honoured; echoed"),
    "text.format": Fate(HONOURED, "text, json_object, json_schema: the answer is constrained to the schema"),
    "text.verbosity": Fate(REFUSED, "medium only: gpt-oss has no verbosity setting", _equals("medium")),
    "user": _USER,
    "metadata": _METADATA,
    "store": _STORE,
    "service_tier": _SERVICE_TIER,
    "prompt_cache_key": _CACHE_KEY,
    "safety_identifier": _SAFETY_ID,
    "truncation": Fate(REFUSED, "disabled only: a prompt longer than the context fails its line",
                       _equals("disabled")),
    "stream": _STREAM,
    "stream_options": _STREAM_OPTIONS,
    "background": Fate(REFUSED, "false only: a batch line is answered in the batch", _equals(False)),
    "include": Fate(HONOURED, "message.output_text.logprobs only (the answer's logprobs; reasoning comes back as "
                              "reasoning_text anyway)", lambda v: isinstance(v, list) and set(v) <= {RESPONSES_LOGPROBS}),
    "top_logprobs": Fate(HONOURED, "0 to 20 alternatives per answer token; needs include message.output_text.logprobs"),
    "previous_response_id": Fate(REFUSED, "no stored responses: give the whole conversation as input"),
    "conversation": Fate(REFUSED, "no stored conversations: give the whole conversation as input"),
    "prompt": Fate(REFUSED, "no stored prompt templates"),
    "tools": _TOOLS,
    "tool_choice": _TOOL_CHOICE,
    "parallel_tool_calls": _PARALLEL,
    "max_tool_calls": Fate(HONOURED, "a completion makes at most one call, so any limit of 1 or more holds"),
}

ENDPOINT_FIELDS = {"chat": CHAT_FIELDS, "responses": RESPONSES_FIELDS}
# Echoed as given in a Response object (OpenAI echoes these request fields there).
RESPONSE_ECHO = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "truncation",
                 "tools", "tool_choice", "parallel_tool_calls")
CHAT_ECHO = ("service_tier",)


def body_error(body: dict, kind: str) -> FieldError | None:
    """The first field of ``body`` (a chat or responses body) that the table refuses or does not
    know; None when every field may run. Null values count as absent."""
    table = ENDPOINT_FIELDS[kind]
    for name, value in body.items():
        if value is None:
            continue
        error = _check(table, name, value)
        if error is None and isinstance(value, dict) and any(k.startswith(name + ".") for k in table):
            error = next((e for k, v in value.items() if v is not None
                          for e in [_check(table, f"{name}.{k}", v)] if e is not None), None)
        if error is not None:
            return error
    return None


def _check(table: dict[str, Fate], name: str, value) -> FieldError | None:
    fate = table.get(name)
    if fate is None:
        return FieldError("unknown_parameter", name, f"body.{name}: unknown parameter; see the README's "
                                                      "table of Batch fields for what ossbatch honours")
    # A refused field passes only with a value that asks for nothing; an honoured one with a value it can honour.
    if (fate.fate == REFUSED and fate.harmless is None) or (fate.harmless is not None and not fate.harmless(value)):
        return FieldError("unsupported_parameter", name, f"body.{name}: not supported ({fate.note})")
    return None


def served_names(model_path: str | None, config: dict | None, served_model_name: str | None) -> frozenset[str]:
    """The names a job's model answers to: the checkpoint folder's name, the family its config
    implies (gpt-oss-20b / gpt-oss-120b, also as openai/...), and --served-model-name."""
    names = set()
    if model_path:
        names.add(os.path.basename(str(model_path).rstrip("/")))
    family = model_family(config)
    if family:
        names |= {family, "openai/" + family}
    if served_model_name:
        names.add(served_model_name)
    return frozenset(n for n in names if n)


def model_family(config: dict | None) -> str | None:
    """gpt-oss-20b or gpt-oss-120b when the (HF) config has that model's shape, else None."""
    if not config:
        return None
    from ossbatch.engine.config import PRESETS

    shape = (config.get("num_hidden_layers"), config.get("num_local_experts"), config.get("hidden_size"))
    return next((name for name, preset in PRESETS.items()
                 if shape == (preset.num_hidden_layers, preset.num_local_experts, preset.hidden_size)), None)


def model_error(model, names: frozenset[str] | None) -> FieldError | None:
    if model is None or names is None or model in names:
        return None
    return FieldError("model_not_found", "model", f"body.model: {model!r} is not this job's model; it serves "
                                                  f"{', '.join(sorted(names))} (see --served-model-name)")


def fields_markdown() -> str:
    """The table README.md shows: each endpoint's fields and their fates."""
    lines = []
    for title, table in (("`/v1/chat/completions`", CHAT_FIELDS), ("`/v1/responses`", RESPONSES_FIELDS)):
        lines += [f"| {title} field | fate | notes |", "|---|---|---|"]
        lines += [f"| `{name}` | {fate.fate} | {fate.note} |" for name, fate in table.items()]
        lines.append("")
    lines.append("Any other field fails its line (`unknown_parameter`).")
    return "\n".join(lines)


if __name__ == "__main__":  # README.md's table: python -m ossbatch.pipeline.batch_fields
    print(fields_markdown())
