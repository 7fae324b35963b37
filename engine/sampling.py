"""Token sampling for a batch, each row with its own settings and seed.

Randomness is counter-based: a row's uniform draw at step t is a hash of
(seed, t), so a row samples the same tokens whatever its batch neighbours,
and no Python runs per row.
"""

import torch

_MASK_53 = (1 << 53) - 1


def _logical_shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic wraps around, which is exactly the uint64 arithmetic splitmix64 wants.
    x = x + -7046029254386353131  # 0x9E3779B97F4A7C15
    x = (x ^ _logical_shift(x, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    x = (x ^ _logical_shift(x, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ _logical_shift(x, 31)


def uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One float64 in [0, 1) per row, a pure function of (seed, step)."""
    x = _splitmix64(_splitmix64(seeds.to(torch.int64)) ^ steps.to(torch.int64))
    return (_logical_shift(x, 11) & _MASK_53).double() / float(1 << 53)


def sample(
    logits: torch.Tensor,  # [M, V] float32, masks already applied
    temperature: torch.Tensor,  # [M]
    top_p: torch.Tensor,  # [M]
    seeds: torch.Tensor,  # [M] int64
    steps: torch.Tensor,  # [M] int64, the index of the token being sampled
) -> torch.Tensor:
    """Greedy where temperature is 0; otherwise inverse-CDF sampling with the
    row's counter-based uniform draw, over the top-p nucleus."""
    tokens = logits.argmax(dim=-1)
    stochastic = temperature > 0
    if bool(stochastic.any()):
        nucleus = stochastic & (top_p < 1.0)
        plain = stochastic & ~nucleus
        if bool(plain.any()):
            # Without top-p, the order of the vocabulary does not matter: skip the sort.
            rows = plain.nonzero().flatten()
            probs = torch.softmax(logits[rows].double() / temperature[rows, None], dim=-1)
            tokens[rows] = _inverse_cdf(probs, uniform(seeds[rows], steps[rows]))
        if bool(nucleus.any()):
            rows = nucleus.nonzero().flatten()
            probs = torch.softmax(logits[rows].double() / temperature[rows, None], dim=-1)
            probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            outside = (probs.cumsum(dim=-1) - probs) >= top_p[rows, None]
            choice = _inverse_cdf(probs.masked_fill(outside, 0.0), uniform(seeds[rows], steps[rows]))
            tokens[rows] = order.gather(1, choice[:, None]).flatten()
    return tokens


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cumulative = weights.cumsum(dim=-1)
    target = (u * cumulative[:, -1])[:, None]
    return torch.searchsorted(cumulative, target).flatten().clamp(max=weights.shape[-1] - 1)


def adjust_logits(
    logits: torch.Tensor,  # [M, V], the live rows' logits (left untouched: a copy is returned)
    rows: torch.Tensor,  # [M] int64, the batch row of each logits row
    presence: torch.Tensor,  # [B] float32 per batch row
    frequency: torch.Tensor,  # [B] float32 per batch row
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor],  # (batch rows, token ids, values): every row's logit_bias
    generated: torch.Tensor,  # [B, T] int64, tokens generated so far
    counts: torch.Tensor,  # [B] int64, how many of them each row has
    out: torch.Tensor | None = None,  # [M, V]: where the result goes (a mask's buffer), whether adjusted or not
) -> torch.Tensor:
    """OpenAI's logit_bias and presence/frequency penalties, before sampling and masks:

        logit[j] += bias[j] - frequency * c[j] - presence * (c[j] > 0)

    with c[j] the times token j was generated so far by that row. Without ``out``, returns
    ``logits`` itself when no live row asks for any of them, else a copy (so the raw distribution
    is never modified); with it, the logits are copied into ``out`` once and adjusted there."""
    bias_rows, bias_tokens, bias_values = bias
    penalised = (presence[rows] != 0) | (frequency[rows] != 0)
    position = torch.full((presence.numel(),), -1, dtype=torch.int64)
    position[rows] = torch.arange(rows.numel())
    biased = position[bias_rows] >= 0 if bias_rows.numel() else bias_rows.bool()
    if not bool(penalised.any()) and not bool(biased.any()):
        return logits if out is None else out.copy_(logits)
    logits = logits.clone() if out is None else out.copy_(logits)
    if bool(biased.any()):
        at = position[bias_rows[biased]].to(logits.device)
        logits.index_put_((at, bias_tokens[biased].to(logits.device)), bias_values[biased].to(logits.device), accumulate=True)
    if bool(penalised.any()):
        which = penalised.nonzero().flatten()
        batch_rows = rows[which]
        length = int(counts[batch_rows].max())
        if length:
            tokens = generated[batch_rows, :length]
            valid = torch.arange(length)[None, :] < counts[batch_rows][:, None]
            seen = torch.zeros(which.numel(), logits.shape[-1], dtype=torch.float32)
            seen.scatter_add_(1, tokens, valid.float())
            penalty = seen * frequency[batch_rows, None] + (seen > 0).float() * presence[batch_rows, None]
            logits[which.to(logits.device)] -= penalty.to(logits.device)
    return logits
