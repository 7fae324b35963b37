"""Attention for one forward pass's packed tokens over the KV cache, as a
`Step` lays them out: queries scattered into per-row slots, the kernel run
over the rows that take part, outputs gathered back.

Rows that share a prefix run cascade attention (kernels/cascade.py): one pass
over their own keys (with the sink), one pass over each prefix block of their
chain (their prefix, and the header it continues) with every row reading it
folded into its queries (so the block is read once for all of them), merged by
log-sum-exp.
"""

import torch

from ossbatch.engine.kv_cache import KVCache
from ossbatch.engine.step import PrefixReads, Step
from ossbatch.kernels import Ops
from ossbatch.kernels.cascade import NO_SINK


def attend(ops: Ops, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, cache: KVCache, layer: int,
           sinks: torch.Tensor, window: int, sm_scale: float) -> torch.Tensor:
    """q: [N, Hq, D], k/v: [N, Hkv, D] (RoPE applied); stores k/v, returns [N, Hq, D]."""
    k_cache, v_cache = cache.write(layer, step.rows, step.cache_positions, k, v)
    if not step.whole_batch:
        # Only some rows take part (a prefill group, or rows still decoding): attend over theirs alone.
        span = int(step.kv_len.max())
        k_cache, v_cache = k_cache[step.members, :span], v_cache[step.members, :span]
    q_rows = q.new_zeros(step.q_positions.shape + q.shape[1:])
    q_rows[step.member_index, step.slots] = q
    if not step.prefixes:
        out = ops.attention(q_rows, k_cache, v_cache, sinks, step.q_positions, step.kv_len, window, sm_scale)
        return out[step.member_index, step.slots]
    own, own_lse = ops.attention_lse(q_rows, k_cache, v_cache, sinks, step.q_positions, step.kv_len, window, sm_scale)
    own, own_lse = own[step.member_index, step.slots], own_lse[step.member_index, step.slots]
    for depth, reads in enumerate(step.prefixes):  # a row's prefix, then the prefix that one continues, ...
        shared, shared_lse = _prefix_attention(ops, q, reads, cache, layer, window, sm_scale)
        own[reads.tokens] = ops.merge_attention(own[reads.tokens], own_lse[reads.tokens], shared, shared_lse)
        if depth + 1 < len(step.prefixes):
            own_lse[reads.tokens] = torch.logaddexp(own_lse[reads.tokens], shared_lse.to(own_lse.dtype))
    return own


def _prefix_attention(ops: Ops, q: torch.Tensor, reads: PrefixReads, cache: KVCache, layer: int, window: int,
                      sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens' attention over the prefix block they read at one level, without the sink (the
    own pass counts it): output [Np, Hq, D] and log-sum-exp [Np, Hq], in `reads.tokens` order."""
    store = cache.prefix
    k_prefix, v_prefix = store.k[layer], store.v[layer]
    start = store.start[layer].to(q.device)[reads.prefixes]  # windowed layers keep the prefix's tail from here
    kv_len = store.lengths.to(q.device)[reads.prefixes] - start
    if reads.prefixes.numel() != k_prefix.shape[0] or not bool((reads.prefixes == torch.arange(k_prefix.shape[0], device=q.device)).all()):
        k_prefix, v_prefix = k_prefix[reads.prefixes], v_prefix[reads.prefixes]
    q_folded = q.new_zeros(reads.q_positions.shape + q.shape[1:])
    q_folded[reads.group_index, reads.slots] = q[reads.tokens]
    no_sink = torch.full((q.shape[1],), NO_SINK, dtype=torch.float32, device=q.device)
    out, lse = ops.attention_lse(q_folded, k_prefix, v_prefix, no_sink, reads.q_positions - start[:, None], kv_len, window, sm_scale)
    return out[reads.group_index, reads.slots], lse[reads.group_index, reads.slots]
