"""A random "model" that drives BatchConstraint the way the engine does.

Each step over the rows still generating: ``prepare(rows)``, fresh random logits
(``randn + bias``, seeded), ``apply(logits, rows)``, a token per row by argmax
(Thurstone sampling: any token the mask allows can win),
``advance(tokens, rows)``. A row leaves the steps once it samples ``<|return|>``.
The bias leans towards closing tokens (``"``, ``}``, ``]``, ``<|end|>``,
``<|return|>``) and away from whitespace-only tokens so that rows finish within a
few hundred steps; each row gets its own bias strength so some rows wander.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from openai_harmony import Role

from ossbatch.pipeline.harmony import END, MESSAGE, RETURN, TOKENIZER_VOCAB_SIZE, harmony_encoding, o200k_harmony_definition
from ossbatch.pipeline.masks import BatchConstraint

V = TOKENIZER_VOCAB_SIZE

# A small labeling schema several test files use.
LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
    "required": ["label"],
    "additionalProperties": False,
}
LABEL = json.dumps(LABEL_SCHEMA)


@lru_cache(maxsize=1)
def token_classes() -> tuple[np.ndarray, np.ndarray]:
    """(closer, blank): boolean arrays over the vocabulary."""
    ranks = o200k_harmony_definition()["mergeable_ranks"]
    closer = np.zeros(V, dtype=bool)
    blank = np.zeros(V, dtype=bool)
    for b, r in ranks.items():
        if b"\"" in b or b"}" in b or b"]" in b:
            closer[r] = True
        if b.strip() == b"":
            blank[r] = True
    return closer, blank


def make_bias(strength: float, end_bias: float) -> torch.Tensor:
    closer, blank = token_classes()
    bias = torch.zeros(V)
    bias[torch.from_numpy(closer)] = strength
    bias[torch.from_numpy(blank)] = -strength
    bias[RETURN] = strength + 2.0
    bias[END] = end_bias
    return bias


@dataclass
class RowResult:
    tokens: list[int] = field(default_factory=list)
    finished: bool = False  # sampled <|return|>


def run_random(
    grammars: list,
    *,
    seed: int,
    steps: int = 300,
    strengths: list[float] | None = None,
    end_biases: list[float] | None = None,
    stops: tuple[int, ...] = (RETURN,),
) -> tuple[list[RowResult], BatchConstraint]:
    """Generate for every row until it samples one of ``stops`` (``<|return|>``; the engine's
    ``<|call|>`` too where given) or ``steps`` run out.

    Runs torch single-threaded: on a 2-core machine torch's intra-op thread pool
    contends with llguidance's mask threads and small ops get 100x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(grammars, seed, steps, strengths, end_biases, stops)
    finally:
        torch.set_num_threads(threads)


def _run(grammars, seed, steps, strengths, end_biases, stops=(RETURN,)):
    b = len(grammars)
    gen = torch.Generator().manual_seed(seed)
    if strengths is None:
        strengths = [float(x) for x in np.random.default_rng(seed).choice([1.0, 2.0, 3.0, 4.0], size=b)]
    if end_biases is None:
        end_biases = [s + 4.5 for s in strengths]
    biases = torch.stack([make_bias(s, e) for s, e in zip(strengths, end_biases)])
    bc = BatchConstraint(grammars, V)
    results = [RowResult() for _ in range(b)]
    rows = list(range(b))
    logits = torch.zeros(b, V)
    for _ in range(steps):
        if not rows:
            break
        bc.prepare(rows)
        step = logits[: len(rows)]
        for k, i in enumerate(rows):  # per-row views: index_select/index_copy_ of [n, V] are slow on CPU
            step[k].normal_(generator=gen).add_(biases[i])
        bc.apply(step, rows)
        tokens = [int(step[k].argmax()) for k in range(len(rows))]
        bc.advance(tokens, rows)
        for i, t in zip(rows, tokens):
            results[i].tokens.append(t)
            if t in stops:
                results[i].finished = True
        rows = [i for i in rows if not results[i].finished]
    return results, bc


@dataclass
class Parsed:
    analysis: list[int] | None  # analysis content token ids
    final_text: str
    final_tokens: list[int]
    messages: list


def parse_completion(tokens: list[int]) -> Parsed:
    """Split a finished completion with openai_harmony's parser and by token ids."""
    enc = harmony_encoding()
    messages = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    finals = [m for m in messages if m.channel == "final"]
    assert len(finals) == 1, [m.channel for m in messages]
    assert all(m.channel in ("analysis", "final") for m in messages), [m.channel for m in messages]
    assert len(messages) <= 2
    # token-level: content of the analysis message and of the final message
    msg_starts = [i for i, t in enumerate(tokens) if t == MESSAGE]
    analysis = None
    if messages[0].channel == "analysis":
        end = tokens.index(END)
        analysis = tokens[msg_starts[0] + 1 : end]
    final_tokens = tokens[msg_starts[-1] + 1 : len(tokens) - 1]
    assert tokens[-1] == RETURN
    final_text = "".join(c.text for c in finals[0].content)
    return Parsed(analysis, final_text, final_tokens, messages)
