"""A random "model" that drives BatchConstraint the way the engine does.

Each step: ``prepare()``, fresh random logits (``randn * scale + bias``, seeded),
``apply(logits)``, a token per row by argmax (Thurstone sampling at temperature
``scale``: any token the mask allows can win), ``advance(tokens, active)``.
The bias leans towards closing tokens (``"``, ``}``, ``]``, ``<|end|>``,
``<|return|>``) and away from whitespace-only tokens so that rows finish within a
few hundred steps; each row gets its own bias strength so some rows wander.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from openai_harmony import Role

from ossbatch.pipeline import constrain as C

V = C.TOKENIZER_VOCAB_SIZE


@lru_cache(maxsize=1)
def token_classes() -> tuple[np.ndarray, np.ndarray]:
    """(closer, blank): boolean arrays over the vocabulary."""
    ranks = C._o200k_harmony_definition()["mergeable_ranks"]
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
    bias[C.RETURN] = strength + 2.0
    bias[C.END] = end_bias
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
    vocab: int = V,
    greedy_noise: float = 1.0,
    constraint: C.BatchConstraint | None = None,
) -> tuple[list[RowResult], C.BatchConstraint]:
    """Generate for every row until it samples ``<|return|>`` or ``steps`` run out.

    Runs torch single-threaded: on a 2-core machine torch's intra-op thread pool
    contends with llguidance's mask threads and small ops get 100x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(grammars, seed, steps, strengths, end_biases, vocab, greedy_noise, constraint)
    finally:
        torch.set_num_threads(threads)


def _run(grammars, seed, steps, strengths, end_biases, vocab, greedy_noise, constraint):
    b = len(grammars)
    gen = torch.Generator().manual_seed(seed)
    if strengths is None:
        strengths = [float(x) for x in np.random.default_rng(seed).choice([1.0, 2.0, 3.0, 4.0], size=b)]
    if end_biases is None:
        end_biases = [s + 4.5 for s in strengths]
    biases = torch.stack([make_bias(s, e) for s, e in zip(strengths, end_biases)])
    if vocab > V:
        biases = torch.cat([biases, torch.zeros(b, vocab - V)], dim=1)
    bc = constraint or C.BatchConstraint(grammars, vocab)
    results = [RowResult() for _ in range(b)]
    active = torch.ones(b, dtype=torch.bool)
    logits = torch.zeros(b, vocab)
    for _ in range(steps):
        rows = active.nonzero().squeeze(1).tolist()
        if not rows:
            break
        bc.prepare()
        for i in rows:  # per-row views: index_select/index_copy_ of [n, V] are slow on CPU
            logits[i].normal_(generator=gen).mul_(greedy_noise).add_(biases[i])
        bc.apply(logits)
        tokens = torch.zeros(b, dtype=torch.long)
        for i in rows:
            tokens[i] = logits[i].argmax()
        bc.advance(tokens, active)
        for i in rows:
            t = int(tokens[i])
            results[i].tokens.append(t)
            if t == C.RETURN:
                results[i].finished = True
                active[i] = False
    return results, bc


@dataclass
class Parsed:
    analysis: list[int] | None  # analysis content token ids
    final_text: str
    final_tokens: list[int]
    messages: list


def parse_completion(tokens: list[int]) -> Parsed:
    """Split a finished completion with openai_harmony's parser and by token ids."""
    enc = C.harmony_encoding()
    messages = enc.parse_messages_from_completion_tokens(tokens, Role.ASSISTANT)
    finals = [m for m in messages if m.channel == "final"]
    assert len(finals) == 1, [m.channel for m in messages]
    assert all(m.channel in ("analysis", "final") for m in messages), [m.channel for m in messages]
    assert len(messages) <= 2
    # token-level: content of the analysis message and of the final message
    msg_starts = [i for i, t in enumerate(tokens) if t == C.MESSAGE]
    analysis = None
    if messages[0].channel == "analysis":
        end = tokens.index(C.END)
        analysis = tokens[msg_starts[0] + 1 : end]
    final_tokens = tokens[msg_starts[-1] + 1 : len(tokens) - 1]
    assert tokens[-1] == C.RETURN
    final_text = "".join(c.text for c in finals[0].content)
    return Parsed(analysis, final_text, final_tokens, messages)
