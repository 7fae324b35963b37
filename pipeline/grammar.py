"""A row's constraint as one llguidance grammar: JSON Schema text, a reasoning budget, and/or function calls.

Both turn into one grammar for the whole harmony completion that follows a prompt ending in
``<|start|>assistant``::

    <|channel|>analysis<|message|>{free text, at most N tokens}<|end|>
    <|start|>assistant<|channel|>final<|message|>{JSON valid under the schema}<|return|>

(without a schema the final answer is free text; the analysis message may be skipped by the
model, but never repeated, so reasoning stays bounded). A row with function tools (``CallSpec``,
see ``tools.py``) replaces or joins the final message with calls, one rule per function::

    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{arguments valid under its parameters}<|call|>

as gpt-oss writes a call (harmony parses the recipient there, and renders it before the channel
in a prompt; both are one message); ``tool_choice: none`` keeps only the final message.

No special token can appear inside the analysis text, the answer or the arguments. N, the
reasoning budget, counts the analysis *text* tokens; when it is reached the grammar allows only
``<|end|>`` and then forces the next message's header.

The grammar is llguidance Lark. Every header is forced exactly as harmony renders it, one token
per word: special tokens as ``<|...|>``, the channel names and the role by token id (``<[35644]>``
is ``analysis``), never as strings the model could spell in several tokens. The analysis text is
a ``max_tokens``-bounded lexeme, the answer ``%json {schema}`` (whitespace between JSON tokens
bounded to runs of at most 20). A call's header is forced as the tokens harmony's encoder gives
its text (``commentary to=functions.NAME ``), each by id. Grammars are compiled once per
(schema, budget, calls) and cached.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import llguidance

from ossbatch.pipeline.harmony import harmony_encoding, lltokenizer
from ossbatch.pipeline.response_format import SchemaRefused, check_schema, parse_schema
from ossbatch.pipeline.tools import FUNCTIONS, CallSpec

__all__ = ["JSON_WHITESPACE", "RowGrammar", "clean_llg_error", "compile_row_grammar"]

# JSON whitespace the grammar allows between JSON tokens: a bounded run, so that a
# model cannot loop on whitespace forever inside the answer.  Enough for
# pretty-printed JSON several levels deep.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,20}"


@dataclass(frozen=True, eq=False)
class RowGrammar:
    """A compiled constraint for one row (immutable; shared by rows with the same inputs).

    ``lenient`` is True when llguidance refused the schema in strict mode and the
    lenient mode (unimplemented keywords ignored) is used instead: the answer is
    then only guaranteed to be JSON, and ``answer.validate_answer`` decides.
    ``strict_error`` says what strict mode refused.
    """

    schema_text: str | None
    max_reasoning_tokens: int | None
    lark: str
    lenient: bool = False
    strict_error: str | None = None
    _template: Any = field(default=None, repr=False)
    calls: CallSpec | None = None

    def new_matcher(self) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the completion."""
        return self._template.deep_copy()


_LISTING_LINE = re.compile(r"^\s*\d+\s*\|")  # "   2 | answer: %json {...}"
_CARET_LINE = re.compile(r"^[\s|^]*$")


def clean_llg_error(msg: str) -> str:
    """llguidance's error on one line, without the grammar listing that follows it."""
    keep = []
    for line in msg.splitlines():
        if _LISTING_LINE.match(line):
            break
        if not _CARET_LINE.match(line):
            keep.append(line.strip())
    text = " ".join(keep)
    text = re.sub(r"^at \d+\(\d+\):\s*", "", text)
    text = text.replace("failed to compile JSON schema: ", "")
    return text or " ".join(msg.split())


def _lark(schema: Any | None, lenient: bool, max_reasoning_tokens: int | None, calls: CallSpec | None = None) -> str:
    if max_reasoning_tokens is None:
        analysis_body = "analysis_text"
        analysis_rule = "analysis_text: /(?s:.*)/"
    elif max_reasoning_tokens == 0:
        analysis_body = ""
        analysis_rule = ""
    else:
        analysis_body = "analysis_text"
        analysis_rule = f"analysis_text[max_tokens={int(max_reasoning_tokens)}]: /(?s:.*)/"
    if schema is None:
        answer_rule = "answer: /(?s:.*)/"
    else:
        answer_rule = "answer: " + _json_lexeme(schema, lenient)
    analysis, final, assistant = (_single_token(word) for word in ("analysis", "final", "assistant"))
    replies = ["final"] if calls is None or calls.final else []
    call_rules = []
    for index, (name, parameters) in enumerate(calls.functions if calls is not None else ()):
        replies.append(f"call_{index}")
        call_rules += [f"call_{index}: <|channel|> {_tokens(f'commentary to={FUNCTIONS}.{name} ')} <|constrain|> "
                       f"{_single_token('json')} <|message|> arguments_{index} <|call|>",
                       f"arguments_{index}: " + _json_lexeme(json.loads(parameters), lenient)]
    return "\n".join(
        line
        for line in [
            f"start: analysis? {replies[0] if len(replies) == 1 else 'reply'}",
            f"reply: {' | '.join(replies)}" if len(replies) > 1 else "",
            f"analysis: <|channel|> {analysis} <|message|> {analysis_body} <|end|> <|start|> {assistant}",
            analysis_rule,
            f"final: <|channel|> {final} <|message|> answer <|return|>" if "final" in replies else "",
            answer_rule if "final" in replies else "",
            *call_rules,
        ]
        if line
    ) + "\n"


def _json_lexeme(schema: Any, lenient: bool) -> str:
    body = dict(schema) if isinstance(schema, dict) else {}
    body["x-guidance"] = {"lenient": bool(lenient), "whitespace_pattern": JSON_WHITESPACE}
    return "%json " + json.dumps(body, separators=(",", ":"), ensure_ascii=True)


def _single_token(word: str) -> str:
    """The Lark reference to the one token harmony renders ``word`` as in a header, by id: a
    string literal would let the model spell it in several tokens (``f`` + ``inal``)."""
    (token,) = harmony_encoding().encode(word)
    return f"<[{token}]>"


def _tokens(text: str) -> str:
    """``text`` forced as the tokens harmony's encoder gives it, each by id."""
    return " ".join(f"<[{token}]>" for token in harmony_encoding().encode(text))


def _build(lark: str) -> tuple[llguidance.LLMatcher | None, str | None]:
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    matcher = llguidance.LLMatcher(lltokenizer(), grammar, log_level=0)
    if matcher.is_error():
        return None, clean_llg_error(matcher.get_error())
    return matcher, None


_REMOTE_REF = re.compile(r"Resource '([^']+)' is not present in a registry and retrieving it failed")
_CACHE: dict[tuple[str | None, int | None, CallSpec | None], RowGrammar | SchemaRefused] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 512


def compile_row_grammar(schema_text: str | None, max_reasoning_tokens: int | None,
                        calls: CallSpec | None = None) -> RowGrammar | None:
    """The constraint for a row, or ``None`` when the row has neither a schema, nor a budget, nor
    calls to constrain (``calls``: what its tools allow after the reasoning, see ``tools.call_spec``).

    Strict compile first; where llguidance refuses it (unimplemented keywords such as
    ``uniqueItems``, ``not``, ``if``/``then``, ``oneOf`` it cannot prove disjoint,
    unknown ``format``s) the lenient mode is used and ``RowGrammar.lenient`` is True.
    Raises :class:`SchemaRefused` for text that is not JSON, a schema that jsonschema's
    ``check_schema`` rejects, a schema lenient mode refuses too (remote ``$ref``,
    look-around patterns, unsatisfiable schemas), or a negative/non-integer budget; a function's
    parameter schema is checked the same way, and its refusal names the function.
    Results (and refusals) are cached per ``(schema_text, max_reasoning_tokens, calls)``.
    """
    if schema_text is None and max_reasoning_tokens is None and calls is None:
        return None
    if max_reasoning_tokens is not None:
        budget = max_reasoning_tokens
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise SchemaRefused(f"max_reasoning_tokens must be a non-negative integer, got {max_reasoning_tokens!r}")
    key = (schema_text, max_reasoning_tokens, calls)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is None:
        try:
            hit = _compile(schema_text, max_reasoning_tokens, calls)
        except SchemaRefused as e:
            hit = e
        with _CACHE_LOCK:
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = hit
    if isinstance(hit, SchemaRefused):
        raise SchemaRefused(str(hit))
    return hit


def _checked(schema_text: str, what: str | None = None) -> Any:
    """The schema, checked; a refusal names ``what`` (a function's parameters) when given."""
    try:
        schema = parse_schema(schema_text)
        check_schema(schema)
        if schema is False:
            raise SchemaRefused("the schema `false` accepts no value")
    except SchemaRefused as err:
        raise SchemaRefused(f"{what}: {err}" if what else str(err)) from None
    return schema


def _compile(schema_text: str | None, max_reasoning_tokens: int | None, calls: CallSpec | None = None) -> RowGrammar:
    for name, parameters in calls.functions if calls is not None else ():
        _checked(parameters, f"function {name!r} parameters")
    if schema_text is None and calls is None:
        lark = _lark(None, False, max_reasoning_tokens)
        matcher, err = _build(lark)
        if matcher is None:  # pragma: no cover - the free-text grammar always compiles
            raise RuntimeError(f"reasoning-budget grammar failed to compile: {err}")
        return RowGrammar(None, max_reasoning_tokens, lark, False, None, matcher)
    schema = _checked(schema_text) if schema_text is not None else None
    lark = _lark(schema, False, max_reasoning_tokens, calls)
    matcher, strict_err = _build(lark)
    if matcher is not None:
        return RowGrammar(schema_text, max_reasoning_tokens, lark, False, None, matcher, calls)
    lark = _lark(schema, True, max_reasoning_tokens, calls)
    matcher, lenient_err = _build(lark)
    if matcher is None:
        remote = _REMOTE_REF.search(lenient_err or "")
        if remote:
            raise SchemaRefused(f"remote schema reference {remote.group(1)!r} is not supported: "
                                "references are never fetched (put the referenced schema under $defs)")
        raise SchemaRefused(f"the constraint compiler cannot enforce it: {lenient_err}")
    return RowGrammar(schema_text, max_reasoning_tokens, lark, True, strict_err, matcher, calls)
