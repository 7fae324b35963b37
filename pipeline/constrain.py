"""Structured outputs: JSON-Schema response formats enforced while sampling.

A row may carry a JSON Schema (as text) and/or a ``max_reasoning_tokens`` budget.
Both turn into one llguidance grammar for the whole harmony completion that
follows a prompt ending in ``<|start|>assistant``::

    <|channel|>analysis<|message|>{free text, at most N tokens}<|end|>
    <|start|>assistant<|channel|>final<|message|>{JSON valid under the schema}<|return|>

(without a schema the final answer is free text; the analysis message may be
skipped by the model, but never repeated, so reasoning stays bounded).  No
special token can appear inside the analysis text or the answer.  N, the
reasoning budget, counts the analysis *text* tokens; when it is reached the
grammar allows only ``<|end|>`` and then forces the final message's header.

The grammar is llguidance Lark: special tokens as ``<|...|>``, the analysis text
a ``max_tokens``-bounded lexeme, the answer ``%json {schema}`` (whitespace between
JSON tokens bounded to runs of at most 20).  The llguidance tokenizer is built
once from tiktoken's o200k_harmony definition (BPE file from
``$TIKTOKEN_ENCODINGS_BASE`` or ``../shared/tiktoken``) with openai_harmony's
special-token ids; EOS is ``<|return|>``.

Public API (the engine and the pipeline use exactly these):

* :func:`response_format_section` -- the developer-message section that tells
  the model about the schema (harmony's ``# Response Formats``).
* :func:`compile_row_grammar` -- schema text + reasoning budget -> :class:`RowGrammar`
  (or ``None``); raises :class:`SchemaRefused` for a schema that cannot be used.
* :class:`BatchConstraint` -- per-batch token masks: ``prepare`` (background),
  ``apply`` (in place on logits), ``advance`` (consume sampled tokens), ``errors``.
* :func:`validate_answer` -- the final answer re-serialised and checked with jsonschema.

Remote ``$ref``s are never fetched: llguidance has no retriever, and our
jsonschema validators run with a :class:`referencing.Registry` whose retrieval
always fails.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence
from unittest import mock

import numpy as np
import torch

import llguidance
import llguidance.torch as llg_torch

__all__ = [
    "BatchConstraint",
    "RowGrammar",
    "SchemaRefused",
    "compile_row_grammar",
    "harmony_encoding",
    "lltokenizer",
    "response_format_section",
    "validate_answer",
    "TOKENIZER_VOCAB_SIZE",
]

# o200k_harmony: 199998 BPE ranks + special tokens up to <|reserved_201087|>.
TOKENIZER_VOCAB_SIZE = 201088

# Harmony special tokens used by the grammar (checked against openai_harmony in
# ``_special_ids``; these literals are only documentation and test fixtures).
RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL = 200002, 200003, 200005, 200006, 200007, 200008, 200012

# JSON whitespace the grammar allows between JSON tokens: a bounded run, so that a
# model cannot loop on whitespace forever inside the answer.  Enough for
# pretty-printed JSON several levels deep.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{1,20}"

_O200K_FILE = "o200k_base.tiktoken"


class SchemaRefused(ValueError):
    """A row's response format (or reasoning budget) that cannot be enforced.

    The message says what was refused: invalid JSON, an invalid JSON Schema
    (and where), or the keyword/feature llguidance cannot compile even leniently
    (remote ``$ref``, look-around in ``pattern``, an unsatisfiable schema, ...).
    The caller marks that row as an error; the job goes on.
    """


# --------------------------------------------------------------------------- tokenizer


@lru_cache(maxsize=1)
def harmony_encoding():
    """openai_harmony's HARMONY_GPT_OSS encoding (cached)."""
    import openai_harmony

    return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)


def _o200k_base_file() -> Path | None:
    """The local o200k_base BPE file: $TIKTOKEN_ENCODINGS_BASE, else the project's shared/ copy."""
    candidates = []
    base = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if base and "://" not in base:
        candidates.append(Path(base) / _O200K_FILE)
    candidates.append(Path(__file__).resolve().parent.parent.parent / "shared" / "tiktoken" / _O200K_FILE)
    for c in candidates:
        if c.is_file():
            return c
    return None


def _o200k_harmony_definition() -> dict:
    """tiktoken's own o200k_harmony definition (pattern, ranks, special tokens).

    tiktoken's constructor downloads o200k_base; when a local copy exists we point
    its loader at it (the expected SHA-256 is still verified by tiktoken).
    """
    import tiktoken_ext.openai_public as openai_public
    from tiktoken.load import load_tiktoken_bpe

    local = _o200k_base_file()
    if local is None:
        return openai_public.o200k_harmony()

    def _load(_url: str, expected_hash: str | None = None):
        return load_tiktoken_bpe(str(local), expected_hash)

    with mock.patch.object(openai_public, "load_tiktoken_bpe", _load):
        return openai_public.o200k_harmony()


def _special_ids() -> dict[str, int]:
    """Special tokens of o200k_harmony within the model vocabulary, one name per id.

    Every id is checked against openai_harmony's encoding; the grammar relies on them.
    """
    enc = harmony_encoding()
    out: dict[str, int] = {}
    for name in enc.special_tokens_set:
        (tid,) = enc.encode(name, allowed_special="all")
        if tid < TOKENIZER_VOCAB_SIZE:  # harmony also names <|reserved_201088|>, outside the model vocab
            out[name] = tid
    fixed = {"<|return|>": RETURN, "<|constrain|>": CONSTRAIN, "<|channel|>": CHANNEL, "<|start|>": START,
             "<|end|>": END, "<|message|>": MESSAGE, "<|call|>": CALL}
    for name, tid in fixed.items():
        if out.get(name) != tid:
            raise RuntimeError(f"harmony special token {name} has id {out.get(name)}, expected {tid}")
    return out


@lru_cache(maxsize=1)
def lltokenizer() -> llguidance.LLTokenizer:
    """The llguidance tokenizer for o200k_harmony (built once, ~1 s; cached).

    BPE ranks and the pre-tokenisation pattern come from tiktoken's o200k_harmony
    definition; special tokens from openai_harmony (one name per id, ids verified).
    EOS is ``<|return|>``, the token that ends a constrained completion.
    """
    d = _o200k_harmony_definition()
    harmony_special = _special_ids()
    special: dict[str, int] = {}
    seen: set[int] = set()
    # tiktoken's table names id 200018 twice (<|endofprompt|> and <|reserved_200018|>);
    # keep harmony's name for every id.
    for name, tid in sorted(harmony_special.items(), key=lambda kv: kv[1]):
        if tid not in seen:
            seen.add(tid)
            special[name] = tid
    tok = llguidance.LLTokenizer.from_tiktoken(
        encoder=d["mergeable_ranks"],
        special_tokens=special,
        pattern=d["pat_str"],
        eos_token=RETURN,
        n_vocab=TOKENIZER_VOCAB_SIZE,
    )
    if tok.vocab_size != TOKENIZER_VOCAB_SIZE:
        raise RuntimeError(f"llguidance tokenizer has {tok.vocab_size} tokens, expected {TOKENIZER_VOCAB_SIZE}")
    return tok


@lru_cache(maxsize=1)
def _executor() -> llguidance.LLExecutor:
    """llguidance's mask thread pool (80% of the cores, up to 32), shared by every batch."""
    return llguidance.LLExecutor()


@lru_cache(maxsize=1)
def _mask_pool() -> ThreadPoolExecutor:
    """Background threads that hand each batch's mask work to llguidance (which drops the GIL)."""
    return ThreadPoolExecutor(4, thread_name_prefix="llg-mask")


# --------------------------------------------------------------------------- schema text


def _parse_schema(schema_text: str) -> Any:
    if not isinstance(schema_text, str):
        raise SchemaRefused(f"response format must be JSON Schema text, got {type(schema_text).__name__}")
    try:
        schema = json.loads(schema_text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise SchemaRefused(f"response format is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise SchemaRefused(f"a JSON Schema must be an object or a boolean, got {type(schema).__name__}")
    return schema


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def response_format_section(schema_text: str, name: str = "response") -> str:
    """The harmony ``# Response Formats`` section for a row's schema.

    Appended (after a blank line) to the developer instructions::

        # Response Formats

        ## {name}

        // {schema description, when the schema has a top-level one}
        {schema as compact JSON}

    Raises :class:`SchemaRefused` when ``schema_text`` is not JSON.
    """
    schema = _parse_schema(schema_text)
    name = " ".join(str(name).split()) or "response"
    lines = ["# Response Formats", "", f"## {name}", ""]
    if isinstance(schema, dict) and isinstance(schema.get("description"), str) and schema["description"].strip():
        lines.append("// " + " ".join(schema["description"].split()))
    lines.append(json.dumps(schema, separators=(",", ":"), ensure_ascii=False))
    return "\n".join(lines)


# --------------------------------------------------------------------------- jsonschema (no remote refs)


def _refuse_retrieval(uri: str):
    raise LookupError(f"remote $ref {uri!r} is not fetched")


@lru_cache(maxsize=1)
def _offline_registry():
    import referencing

    return referencing.Registry(retrieve=_refuse_retrieval)


def _validator_class(schema: Any):
    import jsonschema.validators

    return jsonschema.validators.validator_for(schema, default=jsonschema.validators.Draft202012Validator)


def _check_schema(schema: Any) -> None:
    import jsonschema.exceptions

    cls = _validator_class(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise SchemaRefused(f"invalid JSON Schema at {where}: {e.message}") from None


def validate_answer(output_text: str, schema_text: str | None) -> tuple[str | None, bool | None]:
    """``(output_json, schema_valid)`` for a row's final answer.

    ``output_json`` is the answer parsed as JSON and re-serialised compactly
    (``None`` when it is not JSON: NaN/Infinity are not JSON either).
    ``schema_valid`` is jsonschema's verdict (``None`` without a schema; ``False``
    when the answer is not JSON, or the schema is unusable, or needs a remote $ref).
    """
    value: Any = None
    output_json: str | None = None
    try:
        value = json.loads(output_text, parse_constant=_reject_constant)
        output_json = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        output_json = None
    if schema_text is None:
        return output_json, None
    if output_json is None:
        return None, False
    validator = _answer_validator(schema_text)
    if validator is None:
        return output_json, False
    try:
        return output_json, validator.is_valid(value)
    except Exception:  # referencing.exceptions.Unresolvable and friends: cannot say it is valid
        return output_json, False


@lru_cache(maxsize=256)
def _answer_validator(schema_text: str):
    """A jsonschema validator for the schema text (cached: a job has few schemas and many rows),
    or None when the schema is unusable."""
    try:
        schema = _parse_schema(schema_text)
        _check_schema(schema)
    except SchemaRefused:
        return None
    return _validator_class(schema)(schema, registry=_offline_registry())


# --------------------------------------------------------------------------- grammar


@dataclass(frozen=True, eq=False)
class RowGrammar:
    """A compiled constraint for one row (immutable; shared by rows with the same inputs).

    ``lenient`` is True when llguidance refused the schema in strict mode and the
    lenient mode (unimplemented keywords ignored) is used instead: the answer is
    then only guaranteed to be JSON, and :func:`validate_answer` decides.
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


def _clean_llg_error(msg: str) -> str:
    """llguidance's compile error on one line, without the grammar listing that follows it."""
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
    return "\n".join(
        line
        for line in [
            "start: analysis? final",
            f'analysis: <|channel|> "analysis" <|message|> {analysis_body} <|end|> <|start|> "assistant"',
            analysis_rule,
            'final: <|channel|> "final" <|message|> answer <|return|>',
            answer_rule,
        ]
        if line
    ) + "\n"


def _build(lark: str) -> tuple[llguidance.LLMatcher | None, str | None]:
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    matcher = llguidance.LLMatcher(lltokenizer(), grammar, log_level=0)
    if matcher.is_error():
        return None, _clean_llg_error(matcher.get_error())
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
    schema = _parse_schema(schema_text)
    _check_schema(schema)
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


# --------------------------------------------------------------------------- batch masks

_SHIFTS_U8 = {}


def _shifts(device: torch.device) -> torch.Tensor:
    t = _SHIFTS_U8.get(device)
    if t is None:
        t = torch.arange(8, dtype=torch.uint8, device=device)
        _SHIFTS_U8[device] = t
    return t


class BatchConstraint:
    """Token masks for a batch of rows, some constrained (``RowGrammar``), some not (``None``).

    Per decoding step the engine calls ``prepare()`` just before the forward pass
    (masks for the next token are computed in a background thread by llguidance,
    which releases the GIL), ``apply(logits)`` after it (waits, then sets disallowed
    tokens of constrained rows to -inf in place), and ``advance(tokens, active)``
    after sampling.  Rows whose matcher failed are forced to ``<|return|>`` so they
    end at once; ``errors()`` says why.  Rows seen inactive are never touched again.
    """

    def __init__(self, grammars: Sequence[RowGrammar | None], vocab_size: int):
        tok = lltokenizer()
        self.batch_size = len(grammars)
        self.vocab_size = int(vocab_size)
        self.tok_vocab = tok.vocab_size
        if self.vocab_size < self.tok_vocab:
            raise ValueError(f"model vocab {self.vocab_size} is smaller than the tokenizer's {self.tok_vocab}")
        self._matchers: list[llguidance.LLMatcher | None] = [g.new_matcher() if g is not None else None for g in grammars]
        self._rows = [i for i, m in enumerate(self._matchers) if m is not None]
        self._live = [m is not None for m in self._matchers]
        self._errors: list[str | None] = [None] * self.batch_size
        self._words = (self.tok_vocab + 31) // 32
        # Two buffers: the one applied at step t may still be in flight to the GPU while step t+1's
        # masks are written. They grow to the most rows one step masks (the KV slots, not the run).
        self._bitmasks = [llg_torch.allocate_token_bitmask(1, self.tok_vocab) for _ in range(2)]
        self._flip = 0
        self._pool: ThreadPoolExecutor | None = _mask_pool() if self._rows else None
        self._pending: Future | None = None
        self._prepared: tuple[list[int], torch.Tensor] | None = None
        self._consumed = [0] * self.batch_size  # tokens each row's matcher has taken
        self._timings: dict[str, list[float]] = {"mask": [], "wait": [], "apply": [], "advance": []}

    # -- protocol ---------------------------------------------------------------------

    def prepare(self, rows: Sequence[int] | None = None) -> None:
        """Start computing the next-token masks of every live constrained row, or of those among
        ``rows`` (the rows of the coming step, when the engine refills KV slots)."""
        if self._pool is None:
            return
        self._finish_pending()
        candidates = self._rows if rows is None else [int(i) for i in rows if self._matchers[int(i)] is not None]
        rows = [i for i in candidates if self._live[i]]
        if len(rows) > self._bitmasks[0].shape[0]:
            self._bitmasks = [llg_torch.allocate_token_bitmask(len(rows), self.tok_vocab) for _ in range(2)]
        bitmask = self._bitmasks[self._flip]
        self._flip ^= 1
        self._prepared = (rows, bitmask)
        if not rows:
            return
        self._pending = self._pool.submit(self._fill, rows, bitmask)

    def apply(self, logits: torch.Tensor, rows: Sequence[int] | None = None) -> None:
        """Wait for ``prepare``'s masks and set disallowed tokens of constrained rows to -inf.
        ``logits`` is ``[batch, V]``, or ``[len(rows), V]`` with logits row k for batch row rows[k]."""
        if self._pool is None:
            return
        step_rows = rows
        if self._prepared is None:
            self.prepare(step_rows)
        started = time.perf_counter()
        self._finish_pending()
        self._timings["wait"].append(time.perf_counter() - started)
        rows, bitmask = self._prepared
        self._prepared = None
        if not rows:
            return
        started = time.perf_counter()
        try:
            self._apply(logits, rows, bitmask, step_rows)
        finally:
            self._timings["apply"].append(time.perf_counter() - started)

    def _apply(self, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor, step_rows=None) -> None:
        expected = self.batch_size if step_rows is None else len(step_rows)
        if logits.dim() != 2 or logits.shape[0] != expected:
            raise ValueError(f"logits must be [{expected}, V], got {tuple(logits.shape)}")
        if logits.shape[1] < self.tok_vocab:
            raise ValueError(f"logits have {logits.shape[1]} columns, fewer than the tokenizer's {self.tok_vocab}")
        if step_rows is not None:  # batch rows -> their rows in these logits
            position = {int(r): k for k, r in enumerate(step_rows)}
            rows = [position[i] for i in rows]
        n = len(rows)
        banned = self._banned(bitmask[:n], logits.device)  # bool [n, tok_vocab]
        if n == logits.shape[0] and rows == list(range(n)):  # every row constrained and live: work on views
            logits[:, : self.tok_vocab].masked_fill_(banned, -math.inf)
            if logits.shape[1] > self.tok_vocab:
                logits[:, self.tok_vocab :] = -math.inf
            return
        # some rows unconstrained or finished: mask runs of consecutive rows through views
        # (index_select/index_copy_ of [n, V] are slow on CPU)
        for slot, start, stop in _runs(rows):
            view = logits[start:stop]
            view[:, : self.tok_vocab].masked_fill_(banned[slot : slot + stop - start], -math.inf)
            if view.shape[1] > self.tok_vocab:
                view[:, self.tok_vocab :] = -math.inf

    def advance(self, tokens: torch.Tensor, active: torch.Tensor | None = None, rows: Sequence[int] | None = None) -> None:
        """Consume each active constrained row's sampled token; a rejected token fails the row; a row
        seen inactive is finished. ``tokens``/``active`` (default: all active) are per batch row, or
        per entry of ``rows`` when given (rows not listed wait, untouched: they are not in this step)."""
        self._finish_pending()  # advance without apply: finish the stray mask first
        self._prepared = None
        if not self._rows:
            return
        started = time.perf_counter()
        toks = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        act = [True] * len(toks) if active is None else active.tolist() if isinstance(active, torch.Tensor) else list(active)
        entries = zip(range(self.batch_size) if rows is None else map(int, rows), toks, act)
        try:
            self._advance(entries)
        finally:
            self._timings["advance"].append(time.perf_counter() - started)

    def _advance(self, entries) -> None:
        """``entries``: (batch row, sampled token, active) for the rows of this step."""
        pairs: list[tuple[llguidance.LLMatcher, int]] = []
        pair_rows: list[int] = []
        for i, token, is_active in entries:
            if not self._live[i]:  # unconstrained, or finished
                continue
            if not is_active:
                self._live[i] = False
                continue
            if self._errors[i] is not None:
                continue
            t = int(token)
            if not 0 <= t < self.tok_vocab:
                self._fail(i, f"token {t} is outside the tokenizer vocabulary ({self.tok_vocab})")
                continue
            pairs.append((self._matchers[i], t))
            pair_rows.append(i)
        if not pairs:
            return
        try:
            ok = _executor().consume_token_par(pairs)
        except Exception as err:  # an llguidance failure fails these rows, never the batch
            for i in pair_rows:
                self._fail(i, f"constraint matcher failed: {err}")
            return
        for i, (m, t), good in zip(pair_rows, pairs, ok):
            self._consumed[i] += 1
            if not good:
                self._fail(i, f"token {t} ({self._describe(t)}) rejected by the grammar at token {self._consumed[i]}: "
                              f"{_clean_llg_error(m.get_error())}")

    def errors(self) -> list[str | None]:
        """Per row: ``None`` or why its constraint failed (grammar violated, matcher error)."""
        return list(self._errors)

    # -- extras -----------------------------------------------------------------------

    def is_finished(self, row: int) -> bool:
        """True once a constrained row has consumed ``<|return|>`` (its grammar is complete)."""
        m = self._matchers[row]
        return m is not None and self._errors[row] is None and m.is_stopped() and m.is_accepting()

    def timings(self) -> dict[str, list[float]]:
        """Seconds per step: ``mask`` (llguidance computing the masks, in the background),
        ``wait`` (``apply`` blocked on them: the part not hidden behind the forward pass),
        ``apply`` (masking the logits) and ``advance`` (consuming the sampled tokens)."""
        return {k: list(v) for k, v in self._timings.items()}

    def close(self) -> None:
        """Wait for any mask still being computed (the thread pool is shared and stays)."""
        self._finish_pending()

    # -- internals --------------------------------------------------------------------

    def _fail(self, row: int, reason: str) -> None:
        if self._errors[row] is None:
            self._errors[row] = reason

    def _describe(self, t: int) -> str:
        try:
            return repr(harmony_encoding().decode([t]))
        except Exception:
            return "?"

    def _finish_pending(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def _fill(self, rows: list[int], bitmask: torch.Tensor) -> None:
        started = time.perf_counter()
        pairs = []
        for slot, i in enumerate(rows):
            if self._errors[i] is None:
                pairs.append((self._matchers[i], slot))
        if pairs:
            try:
                llg_torch.fill_next_token_bitmask_par(_executor(), pairs, bitmask[: len(rows)])
            except Exception as err:  # an llguidance failure fails these rows, never the batch
                for m, slot in pairs:
                    self._fail(rows[slot], f"constraint mask failed: {err}")
        for slot, i in enumerate(rows):
            if self._errors[i] is not None:
                # failed row: only <|return|>, so the engine ends it now
                bitmask[slot].zero_()
                bitmask[slot, RETURN // 32] = _bit(RETURN % 32)
        self._timings["mask"].append(time.perf_counter() - started)

    def _banned(self, bitmask: torch.Tensor, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return _banned_numpy(bitmask, self.tok_vocab)
        return _banned_torch(bitmask.to(device, non_blocking=bitmask.is_pinned()), self.tok_vocab)


def _banned_numpy(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 bitmask [n, W] on the CPU (bit j of word w allows token 32w+j) -> bool [n, vocab],
    True where the token is NOT allowed (a view of one unpacked byte per token)."""
    bits = np.unpackbits((~bitmask).numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(bits).view(torch.bool)[:, :vocab]


def _banned_torch(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """The same on any device, with torch ops (used for GPU logits)."""
    n = bitmask.shape[0]
    u8 = bitmask.contiguous().view(torch.uint8).reshape(n, -1)  # little-endian bytes
    bits = (u8.unsqueeze(-1) >> _shifts(bitmask.device)) & 1
    return bits.reshape(n, -1)[:, :vocab] == 0


def _runs(rows: list[int]):
    """(first slot, start row, stop row) for each run of consecutive row indices."""
    slot = 0
    while slot < len(rows):
        end = slot
        while end + 1 < len(rows) and rows[end + 1] == rows[end] + 1:
            end += 1
        yield slot, rows[slot], rows[end] + 1
        slot = end + 1


def _bit(j: int) -> int:
    """int32 value with only bit j set (two's complement for j == 31)."""
    v = 1 << j
    return v - (1 << 32) if v >= (1 << 31) else v
