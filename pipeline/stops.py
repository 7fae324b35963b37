"""OpenAI's ``stop`` strings, applied to the final answer.

The engine knows token ids only, so the check lives here, as a token constraint around the batch's
own (if any): openai-harmony's streaming parser follows each watched row, and once the text of its
``final`` channel holds a stop string, the row's next token is forced to ``<|return|>`` (a stop
token), so the row ends there instead of running to its budget. `cut_at_stop` then removes the
stop string and what follows it from the answer, as OpenAI does (the stop text is not returned).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from openai_harmony import HarmonyError, Role, StreamableParser

from ossbatch.pipeline.harmony import RETURN, harmony_encoding


class StopStrings:
    """A `TokenConstraint` (engine.generate) ending rows whose final answer holds a stop string;
    ``inner`` (a BatchConstraint or None) masks and advances as before for every other token."""

    def __init__(self, stops: Sequence[list[str] | None], inner=None):
        self.inner = inner
        self.stops = [list(s) if s else None for s in stops]
        self._parsers = [StreamableParser(harmony_encoding(), Role.ASSISTANT) if s else None for s in self.stops]
        self._answer = [""] * len(self.stops)
        self.ending = [False] * len(self.stops)  # the row's answer holds a stop string: its next token is <|return|>

    def prepare(self, rows: list[int]) -> None:
        if self.inner is not None:
            self.inner.prepare(rows)

    def apply(self, logits: torch.Tensor, rows: list[int]) -> None:
        if self.inner is not None:
            self.inner.apply(logits, rows)
        for k, row in enumerate(rows):
            if self.ending[row]:
                logits[k].fill_(-math.inf)
                logits[k, RETURN] = 0.0

    def advance(self, tokens: torch.Tensor, rows: list[int]) -> None:
        toks = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        if self.inner is not None:
            # A forced <|return|> is ours, not the grammar's: its matcher never sees it.
            kept = [k for k, row in enumerate(rows) if not self.ending[row]]
            if kept:
                self.inner.advance(torch.tensor([toks[k] for k in kept], dtype=torch.int64), [rows[k] for k in kept])
        for row, token in zip(rows, toks):
            parser = self._parsers[row]
            if parser is None or self.ending[row]:
                continue
            try:
                parser.process(token)
            except HarmonyError:  # not harmony: nothing to watch (the parse reports it)
                self._parsers[row] = None
                continue
            if parser.current_channel == "final" and parser.last_content_delta:
                delta = parser.last_content_delta
                self._answer[row] += delta
                window = self._answer[row][-(len(delta) + max(map(len, self.stops[row]))):]
                self.ending[row] = any(stop in window for stop in self.stops[row])

    def errors(self) -> list[str | None]:
        return self.inner.errors() if self.inner is not None else [None] * len(self.stops)


def cut_at_stop(text: str | None, stops: list[str] | None) -> str | None:
    """``text`` up to the earliest stop string; None when it holds none (or there are none)."""
    if not text or not stops:
        return None
    found = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return text[: min(found)] if found else None
