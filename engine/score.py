"""Teacher-forced scoring: the log-probability of given continuations after a shared context.

`score_continuations` takes requests, each a context and several candidate continuations, and
returns each candidate's summed token logprobs under the model's raw distribution (float logits,
temperature 1, no mask). Every token of every candidate is scored, so multi-token candidates and
candidates that share their first tokens are scored exactly.

Two forward passes per chunk of requests: the contexts, packed, each stored once as a shared
prefix (`kv_cache.PrefixKV`, as `engine.generate` does for shared prompt prefixes); then every
candidate's tokens but its last, packed, each row reading its request's context through the
prefix (cascade attention) and giving logits at each of its positions. A candidate's first token
is scored by its context's last logits, computed once for all its candidates.
"""

from dataclasses import dataclass

import torch

from ossbatch.engine.kv_cache import KVCache, PrefixKV
from ossbatch.engine.model import Transformer
from ossbatch.engine.step import Step, packed

LOGIT_ROWS = 256  # positions whose [V] logits one pass materialises (a float32 row of gpt-oss's vocabulary is 0.8 MB)

@dataclass(frozen=True)
class ScoreRequest:
    context: list[int]  # everything before the candidates (prompt and generated tokens)
    candidates: list[list[int]]  # each a non-empty token sequence that may follow the context


@torch.inference_mode()
def score_continuations(model: Transformer, requests: list[ScoreRequest], max_tokens: int = 32768) -> list[list[float]]:
    """Per request, per candidate: log P(candidate | context), the sum over its tokens.
    ``max_tokens`` bounds the tokens (contexts, or candidates) one forward pass runs."""
    for n, request in enumerate(requests):
        if not request.context or not request.candidates or any(not c for c in request.candidates):
            raise ValueError(f"score request {n}: needs a non-empty context and non-empty candidates")
    longest = max((len(r.context) + max(map(len, r.candidates)) for r in requests), default=0)
    model.ensure_positions(longest)
    scores: list[list[float]] = []
    chunk: list[ScoreRequest] = []
    for request in requests:
        if chunk and (sum(len(r.context) for r in chunk) + len(request.context) > max_tokens or len(chunk) == LOGIT_ROWS):
            scores += _score_chunk(model, chunk, max_tokens)
            chunk = []
        chunk.append(request)
    if chunk:
        scores += _score_chunk(model, chunk, max_tokens)
    return scores


def _score_chunk(model: Transformer, requests: list[ScoreRequest], max_tokens: int) -> list[list[float]]:
    config, device = model.config, model.device
    tokens, positions, lengths = packed([r.context for r in requests])
    scratch = KVCache.for_model(config, len(requests), int(lengths.max()), model.dtype, device)
    step = Step.build(torch.repeat_interleave(torch.arange(len(requests)), lengths), positions, lengths, len(requests))
    logits = model.forward(tokens, step, scratch, torch.cumsum(lengths, 0) - 1)
    rows = torch.tensor([n for n, r in enumerate(requests) for _ in r.candidates], device=logits.device)
    firsts = torch.tensor([c[0] for r in requests for c in r.candidates], device=logits.device)
    picked = (logits[rows, firsts] - torch.logsumexp(logits, dim=-1)[rows]).tolist()  # one copy to the host
    scores, at = [], 0
    for r in requests:
        scores.append(picked[at : at + len(r.candidates)])
        at += len(r.candidates)

    # Candidates of two or more tokens: their later tokens, scored with the context as a prefix.
    longer = [(n, i, c) for n, r in enumerate(requests) for i, c in enumerate(r.candidates) if len(c) > 1]
    if not longer:
        return scores
    prefix = PrefixKV(config, lengths.tolist(), model.dtype, device)
    prefix.store(list(range(len(requests))), scratch)
    del scratch
    batch: list[tuple[int, int, list[int]]] = []
    for item in longer:
        if batch and sum(len(c) - 1 for _, _, c in batch) + len(item[2]) - 1 > min(max_tokens, LOGIT_ROWS):
            _score_tails(model, batch, lengths, prefix, scores)
            batch = []
        batch.append(item)
    _score_tails(model, batch, lengths, prefix, scores)
    return scores


def _score_tails(model: Transformer, rows: list[tuple[int, int, list[int]]], context_len: torch.Tensor,
                 prefix: PrefixKV, scores: list[list[float]]) -> None:
    """Adds to ``scores[n][i]`` the logprobs of candidate tokens 1.. of each (request n, candidate i, tokens)."""
    requests = torch.tensor([n for n, _, _ in rows], dtype=torch.int64)
    prefix_len = context_len[requests]
    # token j's logits score token j + 1
    tokens, positions, own = packed([c[:-1] for _, _, c in rows], prefix_len.tolist())
    cache = KVCache.for_model(model.config, len(rows), int(own.max()), model.dtype, model.device)
    cache.prefix = prefix
    step = Step.build(torch.repeat_interleave(torch.arange(len(rows)), own), positions, own, len(rows), prefix_len, requests)
    logits = model.forward(tokens, step, cache, torch.arange(tokens.numel()))
    targets = torch.tensor([t for _, _, c in rows for t in c[1:]], dtype=torch.int64, device=logits.device)
    picked = (logits.gather(1, targets[:, None]).flatten() - torch.logsumexp(logits, dim=-1)).cpu()
    for (n, i, _), tail in zip(rows, torch.split(picked.double(), own.tolist())):
        scores[n][i] += float(tail.sum())
