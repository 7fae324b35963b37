"""A row's constraint as one llguidance grammar: JSON Schema text and/or a reasoning budget.

Both turn into one grammar for the whole harmony completion that follows a prompt ending in
``<|start|>assistant``::

    <|channel|>analysis<|message|>{free text, at most N tokens}<|end|>
    <|start|>assistant<|channel|>final<|message|>{JSON valid under the schema}<|return|>

(without a schema the final answer is free text; the analysis message may be skipped by the
model, but never repeated, so reasoning stays bounded). No special token can appear inside the
analysis text or the answer. N, the reasoning budget, counts the analysis *text* tokens; when
it is reached the grammar allows only ``<|end|>`` and then forces the final message's header.

The grammar is llguidance Lark. Every header is forced exactly as harmony renders it, one token
per word: special tokens as ``<|...|>``, the channel names and the role by token id (``<[35644]>``
is ``analysis``), never as strings the model could spell in several tokens. The analysis text is
a ``max_tokens``-bounded lexeme, the answer ``%json {schema}`` (whitespace between JSON tokens
bounded to runs of at most 20). Grammars are compiled once per (schema, budget) and cached.
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


def _lark(schema: Any | None, lenient: bool, max_reasoning_tokens: int | None) -> str:
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
        body = dict(schema) if isinstance(schema, dict) else {}
        body["x-guidance"] = {"lenient": bool(lenient), "whitespace_pattern": JSON_WHITESPACE}
        answer_rule = "answer: %json " + json.dumps(body, separators=(",", ":"), ensure_ascii=True)
    analysis, final, assistant = (_single_token(word) for word in ("analysis", "final", "assistant"))
    return "\n".join(
        line
        for line in [
            "start: analysis? final",
            f"analysis: <|channel|> {analysis} <|message|> {analysis_body} <|end|> <|start|> {assistant}",
            analysis_rule,
            f"final: <|channel|> {final} <|message|> answer <|return|>",
            answer_rule,
        ]
        if line
    ) + "\n"


def _single_token(word: str) -> str:
    """The Lark reference to the one token harmony renders ``word`` as in a header, by id: a
    string literal would let the model spell it in several tokens (``f`` + ``inal``)."""
    (token,) = harmony_encoding().encode(word)
    return f"<[{token}]>"


def _build(lark: str) -> tuple[llguidance.LLMatcher | None, str | None]:
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    matcher = llguidance.LLMatcher(lltokenizer(), grammar, log_level=0)
    if matcher.is_error():
        return None, clean_llg_error(matcher.get_error())
    return matcher, None


_REMOTE_REF = re.compile(r"Resource '([^']+)' is not present in a registry and retrieving it failed")
_CACHE: dict[tuple[str | None, int | None], RowGrammar | SchemaRefused] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 512


def compile_row_grammar(schema_text: str | None, max_reasoning_tokens: int | None) -> RowGrammar | None:
    """The constraint for a row, or ``None`` when the row has neither a schema nor a budget.

    Strict compile first; where llguidance refuses it (unimplemented keywords such as
    ``uniqueItems``, ``not``, ``if``/``then``, ``oneOf`` it cannot prove disjoint,
    unknown ``format``s) the lenient mode is used and ``RowGrammar.lenient`` is True.
    Raises :class:`SchemaRefused` for text that is not JSON, a schema that jsonschema's
    ``check_schema`` rejects, a schema lenient mode refuses too (remote ``$ref``,
    look-around patterns, unsatisfiable schemas), or a negative/non-integer budget.
    Results (and refusals) are cached per ``(schema_text, max_reasoning_tokens)``.
    """
    if schema_text is None and max_reasoning_tokens is None:
        return None
    if max_reasoning_tokens is not None:
        budget = max_reasoning_tokens
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
            raise SchemaRefused(f"max_reasoning_tokens must be a non-negative integer, got {max_reasoning_tokens!r}")
    key = (schema_text, max_reasoning_tokens)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is None:
        try:
            hit = _compile(schema_text, max_reasoning_tokens)
        except SchemaRefused as e:
            hit = e
        with _CACHE_LOCK:
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.pop(next(iter(_CACHE)))
            _CACHE[key] = hit
    if isinstance(hit, SchemaRefused):
        raise SchemaRefused(str(hit))
    return hit


def _compile(schema_text: str | None, max_reasoning_tokens: int | None) -> RowGrammar:
    if schema_text is None:
        lark = _lark(None, False, max_reasoning_tokens)
        matcher, err = _build(lark)
        if matcher is None:  # pragma: no cover - the free-text grammar always compiles
            raise RuntimeError(f"reasoning-budget grammar failed to compile: {err}")
        return RowGrammar(None, max_reasoning_tokens, lark, False, None, matcher)
    schema = parse_schema(schema_text)
    check_schema(schema)
    if schema is False:
        raise SchemaRefused("the schema `false` accepts no value")
    lark = _lark(schema, False, max_reasoning_tokens)
    matcher, strict_err = _build(lark)
    if matcher is not None:
        return RowGrammar(schema_text, max_reasoning_tokens, lark, False, None, matcher)
    lark = _lark(schema, True, max_reasoning_tokens)
    matcher, lenient_err = _build(lark)
    if matcher is None:
        remote = _REMOTE_REF.search(lenient_err or "")
        if remote:
            raise SchemaRefused(f"remote schema reference {remote.group(1)!r} is not supported: "
                                "references are never fetched (put the referenced schema under $defs)")
        raise SchemaRefused(f"the constraint compiler cannot enforce it: {lenient_err}")
    return RowGrammar(schema_text, max_reasoning_tokens, lark, True, strict_err, matcher)
