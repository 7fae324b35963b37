"""Teacher-forced scoring: the log-probability of given continuations after a context.

A continuation's score is the sum of its tokens' logprobs under the model's raw distribution
(float logits, temperature 1, no mask). Every token of every candidate is scored, so multi-token
candidates and candidates that share their first tokens are scored exactly.

`score_after_prefixes` is the one way it is done: each context's keys and values, all but its last
token, sit in a `kv_cache.PrefixKV`; every candidate runs as a sequence of its own, the context's
last token and then the candidate's tokens but its last, reading its context through the prefix
(cascade attention, as rows read a shared prompt prefix). The LM head runs once per distinct
position: candidates of a context that share their first tokens share those positions' logits.
Where the contexts come from:

- `score_continuations` prefills given contexts first (scoring text after the fact);
- `engine.generate` copies a finished row's own KV slot (scoring labels while the row's KV is
  still there, so nothing is prefilled again).
"""

from dataclasses import dataclass

import torch

from ossbatch.engine.kv_cache import KVCache, PrefixKV
from ossbatch.engine.memory_plan import SCORING_LOGIT_ROWS
from ossbatch.engine.model import Transformer
from ossbatch.engine.step import Step, packed


@dataclass(frozen=True)
class ScoreRequest:
    context: list[int]  # everything before the candidates (prompt and generated tokens)
    candidates: list[list[int]]  # each a non-empty token sequence that may follow the context


@torch.inference_mode()
def score_continuations(model: Transformer, requests: list[ScoreRequest], max_tokens: int = 32768) -> list[list[float]]:
    """Per request, per candidate: log P(candidate | context), the sum over its tokens.
    ``max_tokens`` bounds the context tokens one prefill runs and the distinct positions one
    scoring pass scores."""
    for n, request in enumerate(requests):
        if not request.context or not request.candidates or any(not c for c in request.candidates):
            raise ValueError(f"score request {n}: needs a non-empty context and non-empty candidates")
    longest = max((len(r.context) + max(map(len, r.candidates)) for r in requests), default=0)
    model.ensure_positions(longest)
    scores: list[list[float]] = []
    chunk: list[ScoreRequest] = []
    for request in requests:
        if chunk and sum(len(r.context) for r in chunk) + len(request.context) > max_tokens:
            scores += _score_chunk(model, chunk, max_tokens)
            chunk = []
        chunk.append(request)
    if chunk:
        scores += _score_chunk(model, chunk, max_tokens)
    return scores


def _score_chunk(model: Transformer, requests: list[ScoreRequest], max_tokens: int) -> list[list[float]]:
    """Prefills the contexts (all but their last tokens) into a prefix store, then scores there."""
    config, device = model.config, model.device
    store = PrefixKV(config, [len(r.context) - 1 for r in requests], model.dtype, device)
    filled = [n for n, r in enumerate(requests) if len(r.context) > 1]
    if filled:
        tokens, positions, lengths = packed([requests[n].context[:-1] for n in filled])
        scratch = KVCache.for_model(config, len(filled), int(lengths.max()), model.dtype, device)
        step = Step.build(torch.repeat_interleave(torch.arange(len(filled)), lengths), positions, lengths, len(filled))
        model.forward(tokens, step, scratch, torch.cumsum(lengths, 0) - 1)
        store.store(filled, scratch)
        del scratch
    return score_after_prefixes(model, store, [r.context[-1] for r in requests], [r.candidates for r in requests],
                                min(max_tokens, SCORING_LOGIT_ROWS))


@torch.inference_mode()
def score_after_prefixes(model: Transformer, store: PrefixKV, last_tokens: list[int], candidates: list[list[list[int]]],
                         logit_rows: int = SCORING_LOGIT_ROWS) -> list[list[float]]:
    """Per context n (prefix n of `store`: its tokens but the last, `last_tokens[n]`), per candidate:
    the candidate's summed logprob. A pass holds at most `logit_rows` distinct positions' logits."""
    scores = [[0.0] * len(c) for c in candidates]
    batch: list[tuple[int, int]] = []  # (context, candidate)
    positions: set[tuple[int, tuple[int, ...]]] = set()  # distinct (context, tokens before) in the batch
    for n, context_candidates in enumerate(candidates):
        for i, candidate in enumerate(context_candidates):
            own = {(n, tuple(candidate[:j])) for j in range(len(candidate))}
            if batch and len(positions | own) > logit_rows:
                _score_batch(model, store, last_tokens, candidates, batch, scores)
                batch, positions = [], set()
            batch.append((n, i))
            positions |= own
    if batch:
        _score_batch(model, store, last_tokens, candidates, batch, scores)
    return scores


def _score_batch(model: Transformer, store: PrefixKV, last_tokens: list[int], candidates: list[list[list[int]]],
                 batch: list[tuple[int, int]], scores: list[list[float]]) -> None:
    """Adds each (context n, candidate i)'s summed logprob to ``scores[n][i]``, in one forward pass."""
    sequences = [[last_tokens[n], *candidates[n][i][:-1]] for n, i in batch]  # token j's logits score candidate token j
    contexts = torch.tensor([n for n, _ in batch], dtype=torch.int64)
    prefix_len = store.lengths[contexts]
    tokens, positions, own = packed(sequences, prefix_len.tolist())
    cache = KVCache.for_model(model.config, len(batch), int(own.max()), model.dtype, model.device)
    cache.prefix = store
    prefix_of = torch.where(prefix_len > 0, contexts, -1)  # a one-token context has no stored part
    step = Step.build(torch.repeat_interleave(torch.arange(len(batch)), own), positions, own, len(batch), prefix_len, prefix_of)
    # One LM-head row per distinct (context, tokens before): the packed index where it first occurs.
    row_of: dict[tuple[int, tuple[int, ...]], int] = {}
    first_at, logit_row, targets, at = [], [], [], 0
    for n, i in batch:
        candidate = candidates[n][i]
        for j, target in enumerate(candidate):
            key = (n, tuple(candidate[:j]))
            if key not in row_of:
                row_of[key] = len(first_at)
                first_at.append(at + j)
            logit_row.append(row_of[key])
            targets.append(target)
        at += len(candidate)
    logits = model.forward(tokens, step, cache, torch.tensor(first_at))
    rows, targets = torch.tensor(logit_row, device=logits.device), torch.tensor(targets, device=logits.device)
    picked = (logits[rows, targets] - torch.logsumexp(logits, dim=-1)[rows]).cpu().double()
    for (n, i), tail in zip(batch, torch.split(picked, own.tolist())):
        scores[n][i] += float(tail.sum())
