"""Label probabilities: how likely the model found each allowed label where its answer names one.

For a row whose schema makes the label property (``label_field``) an enum of strings, the answer's
tokens are cut where the label's value starts, and every allowed label is spelled there as the
answer would spell it: the JSON text from the last token boundary before the value (``":"`` often
carries the value's opening quote), the label as a JSON string, and the answer's text up to the
next token boundary after the value (the closing quote often rides with ``}`` or ``,``). Each
spelling's tokens are scored by the engine given everything before them (prompt, reasoning and
the answer so far) as the row finishes, from the row's own KV (`engine.generate`'s continuations:
nothing is prefilled again), and the scores are normalised over the allowed labels (a softmax of
the summed logprobs). The distribution is the model's raw one, as for ``output_logprobs``: no
temperature, no grammar mask (the grammar only allows these labels, so normalising over them is
its mask).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

from ossbatch.engine.generate import Continuations
from ossbatch.pipeline.logprobs import encode_text, token_bytes
from ossbatch.pipeline.parse import ParsedCompletion, parse_completion


@dataclass(frozen=True)
class LabelSpelling:
    """A row's scoring request: the tokens before the label, and each label's tokens from there."""

    context: list[int]  # the prompt and the first `after` generated tokens
    after: int
    labels: list[str]
    candidates: list[list[int]]
    chosen: str  # the label the answer names
    # Leading tokens every candidate shares and the answer wrote right after the context (often
    # '":"'): their logprob is the same for every label, so it cancels in the normalisation, and
    # their KV is the row's own already. The engine scores the candidates after them.
    shared: int = 0

    def continuations(self) -> Continuations:
        """What the engine scores for this row as it finishes, from the row's own KV."""
        return Continuations(self.after + self.shared, [c[self.shared :] for c in self.candidates])


@lru_cache(maxsize=256)
def _enum_of(schema_text: str, field: str) -> tuple[str, ...] | None:
    try:
        schema = json.loads(schema_text)
    except ValueError:
        return None
    prop = schema.get("properties", {}).get(field) if isinstance(schema, dict) else None
    values = prop.get("enum") if isinstance(prop, dict) else None
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        return None
    return tuple(dict.fromkeys(values))


def label_enum(schema_text: str | None, field: str | None) -> list[str] | None:
    """The allowed labels: ``field``'s enum of strings in the schema, or None."""
    if schema_text is None or field is None:
        return None
    labels = _enum_of(schema_text, field)
    return list(labels) if labels else None


def value_span(text: str, field: str) -> tuple[int, int] | None:
    """[start, stop) of the JSON text of top-level ``field``'s value in a JSON object text."""
    decoder = json.JSONDecoder()
    i = _skip(text, 0)
    if i >= len(text) or text[i] != "{":
        return None
    i = _skip(text, i + 1)
    while i < len(text) and text[i] == '"':
        try:
            key, i = json.decoder.scanstring(text, i + 1)
            i = _skip(text, i)
            if i >= len(text) or text[i] != ":":
                return None
            start = _skip(text, i + 1)
            _, stop = decoder.raw_decode(text, start)
        except ValueError:
            return None
        if key == field:
            return start, stop
        i = _skip(text, stop)
        if i < len(text) and text[i] == ",":
            i = _skip(text, i + 1)
    return None


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def spell_labels(prompt: list[int], token_ids: list[int], answer_spans: list[tuple[int, int]], field: str,
                 labels: list[str]) -> LabelSpelling | None:
    """Where the answer names its label, each label's tokens and the context before them
    (``answer_spans``: the parse's final answer spans); None when the answer has no string value for
    ``field`` (no final answer, or cut off before it)."""
    if not answer_spans:
        return None
    begin, end = answer_spans[-1]
    pieces = [token_bytes(t) for t in token_ids[begin:end]]
    content = b"".join(pieces)
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        return None
    span = value_span(text, field)
    if span is None or not text[span[0]] == '"':
        return None
    chosen = json.loads(text[span[0]:span[1]])
    start, stop = len(text[: span[0]].encode()), len(text[: span[1]].encode())
    boundaries, offset = [0], 0
    for piece in pieces:
        offset += len(piece)
        boundaries.append(offset)
    cut = max(n for n, b in enumerate(boundaries) if b <= start)  # tokens kept before the label
    after = min(b for b in boundaries if b >= stop)
    try:
        lead, tail = content[boundaries[cut]:start].decode("utf-8"), content[stop:after].decode("utf-8")
    except UnicodeDecodeError:  # a token boundary inside a character: no clean place to cut
        return None
    spelled = {label: json.dumps(label, ensure_ascii=False) for label in labels}
    spelled[chosen] = text[span[0]:span[1]]  # as the answer wrote it
    candidates = [encode_text(lead + spelled[label] + tail) for label in labels]
    after = begin + cut
    shared = 0
    while (shared < min(map(len, candidates)) - 1 and after + shared < len(token_ids)
           and all(c[shared] == token_ids[after + shared] for c in candidates)):
        shared += 1
    return LabelSpelling(prompt + token_ids[:after], after, labels, candidates, chosen, shared)


def normalised(scores: list[float]) -> list[float]:
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    total = sum(weights)
    return [w / total for w in weights]


def label_fields(spelling: LabelSpelling | None, scores: list[float] | None) -> dict:
    """A row's ``label_probs`` (label -> probability) and ``label_confidence`` (the answer's label's)."""
    if spelling is None or scores is None:
        return {"label_probs": None, "label_confidence": None}
    probs = dict(zip(spelling.labels, normalised(scores)))
    return {"label_probs": probs, "label_confidence": probs.get(spelling.chosen)}


class LabelScoring:
    """The engine's ``continuations`` for a run's rows (each a prompt, a schema text or None, its
    function tools): a row whose schema makes ``field`` an enum has its answer parsed as it
    finishes and every label spelled where the answer names one; the engine scores those from the
    row's own KV. The parse is kept (``parsed``), so the row's result does not parse it again."""

    def __init__(self, rows: list[tuple[list[int], str | None, frozenset[str]]], field: str):
        self.rows, self.field = rows, field
        self.parsed: dict[int, ParsedCompletion] = {}
        self.spellings: dict[int, LabelSpelling | None] = {}  # rows with labels: their spelling, or None

    def __call__(self, row: int, token_ids: list[int], finish_reason: str) -> Continuations | None:
        prompt, schema, functions = self.rows[row]
        labels = label_enum(schema, self.field)
        if labels is None:
            return None
        self.spellings[row] = None
        try:
            self.parsed[row] = parsed = parse_completion(token_ids, finish_reason, functions)
            self.spellings[row] = spell_labels(prompt, token_ids, parsed.answer_spans, self.field, labels)
        except Exception:  # noqa: BLE001 - the row's result parses it again and reports the error
            self.parsed.pop(row, None)
            return None
        spelling = self.spellings[row]
        return spelling.continuations() if spelling is not None else None
