"""Attention over a static-batch KV cache, with gpt-oss's learned sinks.

Row b's tokens sit at cache positions ``0 .. kv_len[b] - 1``, so a token's
position is its cache index.  A query at position p sees key j when
``j <= p``, ``j < kv_len[b]`` and, on sliding-window layers, ``j > p - window``.
Each head also has a sink: a learned logit that joins the softmax's
denominator but carries no value, letting a head attend to nothing.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ossbatch.kernels.configs import AttentionConfig, attention_config
from ossbatch.kernels.triton_compat import cast_rtne, dot_operand_dtype, launch


def attention_torch(
    q: torch.Tensor,  # [B, Tq, Hq, D]
    k_cache: torch.Tensor,  # [B, S, Hkv, D]
    v_cache: torch.Tensor,  # [B, S, Hkv, D]
    sinks: torch.Tensor,  # [Hq]
    q_positions: torch.Tensor,  # [B, Tq] int64
    kv_len: torch.Tensor,  # [B] int64
    sliding_window: int,  # 0: full attention
    sm_scale: float,
    *,
    return_lse: bool = False,
):
    """The reference.  With ``return_lse=True`` it returns ``(out, lse)``; see `attention_triton`."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    span = int(kv_len.max())
    keys = k_cache[:, :span]
    values = v_cache[:, :span]
    group = q_heads // kv_heads
    # The group folds into the query rows, [B, Hkv, g * Tq, D] x [B, Hkv, D, S], so the
    # grouped queries share their kv head without a copy.  (Broadcasting a size-1
    # group dim instead makes matmul materialize `group` copies of the cache.)
    qg = q.reshape(batch, q_len, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q_rows = qg.reshape(batch, kv_heads, group * q_len, head_dim)
    scores = torch.matmul(q_rows, keys.permute(0, 2, 3, 1)).view(batch, kv_heads, group, q_len, span) * sm_scale

    key_pos = torch.arange(span, device=q.device)
    visible = (key_pos[None, None, :] <= q_positions[:, :, None]) & (key_pos[None, None, :] < kv_len[:, None, None])
    if sliding_window:
        visible &= key_pos[None, None, :] > q_positions[:, :, None] - sliding_window
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))

    sink = sinks.float().reshape(1, kv_heads, group, 1, 1).expand(batch, -1, -1, q_len, 1)
    logits = torch.cat([scores.float(), sink], dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., :-1].to(q.dtype)
    out = torch.matmul(probs.reshape(batch, kv_heads, group * q_len, span), values.permute(0, 2, 1, 3))
    out = out.view(batch, kv_heads, group, q_len, head_dim)
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, q_len, q_heads, head_dim)
    if not return_lse:
        return out
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, g, Tq], the sink included
    return out, lse.permute(0, 3, 1, 2).reshape(batch, q_len, q_heads)

def attention_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    q_positions: torch.Tensor,
    kv_len: torch.Tensor,
    sliding_window: int,
    sm_scale: float,
    *,
    return_lse: bool = False,
):
    """`attention_torch` through torch's fused SDPA (the torch backend's fast path).

    SDPA returns no log-sum-exp, so ``return_lse=True`` is served by `attention_torch`.

    The sink becomes one more key with a zero key and a zero value: its score
    comes from the additive mask, so it joins the softmax's denominator and
    adds nothing to the output, exactly as in the reference.
    """
    if return_lse:
        return attention_torch(q, k_cache, v_cache, sinks, q_positions, kv_len, sliding_window, sm_scale, return_lse=True)
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    span = int(kv_len.max())
    zeros = k_cache.new_zeros(batch, kv_heads, 1, head_dim)
    keys = torch.cat([k_cache[:, :span].transpose(1, 2), zeros], dim=2)
    values = torch.cat([v_cache[:, :span].transpose(1, 2), zeros], dim=2)
    key_pos = torch.arange(span, device=q.device)
    visible = (key_pos[None, None, :] <= q_positions[:, :, None]) & (key_pos[None, None, :] < kv_len[:, None, None])
    if sliding_window:
        visible &= key_pos[None, None, :] > q_positions[:, :, None] - sliding_window
    mask = torch.zeros(batch, 1, q_len, span, dtype=q.dtype, device=q.device).masked_fill_(~visible[:, None], float("-inf"))
    sink = sinks.to(q.dtype).view(1, q_heads, 1, 1).expand(batch, q_heads, q_len, 1)
    mask = torch.cat([mask.expand(batch, q_heads, q_len, span), sink], dim=-1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=sm_scale, enable_gqa=True)
    return out.transpose(1, 2)



@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, sinks_ptr, q_positions_ptr, kv_len_ptr, out_ptr, lse_ptr,
    stride_q_batch, stride_q_token, stride_q_head,
    stride_k_batch, stride_k_pos, stride_k_head,
    stride_v_batch, stride_v_pos, stride_v_head,
    stride_out_split, stride_out_batch, stride_out_token, stride_out_head,
    stride_lse_split, stride_lse_batch, stride_lse_token,  # lse: [splits, B, Tq, Hq], heads contiguous
    stride_positions_batch,
    q_len, head_dim, window, sm_scale_log2, num_splits,  # window: 2**30 for full attention
    GROUP: tl.constexpr,  # query heads per kv head
    STORE_LSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_m = tl.program_id(0) // num_splits
    split = tl.program_id(0) % num_splits
    kv_head = tl.program_id(1)
    batch = tl.program_id(2).to(tl.int64)
    # A tile's rows are (query token, head of the group) pairs: a decode step
    # (Tq = 1) still fills the tile with the GROUP heads that share this kv head,
    # and each K/V block is read once for all of them.
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = token < q_len
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    q = tl.load(q_ptr + batch * stride_q_batch + token[:, None] * stride_q_token + head[:, None] * stride_q_head
                + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    position = tl.load(q_positions_ptr + batch * stride_positions_batch + token, mask=row_ok, other=-1)
    kv_len = tl.load(kv_len_ptr + batch)

    # Only key blocks some row can see: [lowest window start, highest position], capped by kv_len.
    hi = tl.minimum(kv_len, tl.max(position) + 1)
    lo = tl.maximum(tl.min(tl.where(row_ok, position, 1 << 30)) - window + 1, 0)
    # Split-KV (decode at small batch): split s takes its own run of whole key blocks.
    chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_N), num_splits) * BLOCK_N
    lo = lo + split * chunk
    hi = tl.minimum(hi, lo + chunk)

    # The sink joins the denominator as a logit with no value: start the running
    # max at it with weight exp(0) = 1, so a row that sees no key returns 0, not NaN.
    # Only split 0 carries it; a -inf sink (none) starts from weight 0.
    sink = tl.load(sinks_ptr + head, mask=row_ok & (split == 0), other=float("-inf")).to(tl.float32)
    m_i = tl.where(row_ok, sink * LOG2E, 0.0)
    l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    q = q.to(DOT_DTYPE)
    k_base = k_ptr + batch * stride_k_batch + kv_head * stride_k_head
    v_base = v_ptr + batch * stride_v_batch + kv_head * stride_v_head
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_ok = keys < hi
        k = tl.load(k_base + keys[None, :].to(tl.int64) * stride_k_pos + dims[:, None],
                    mask=key_ok[None, :] & dim_ok[:, None], other=0.0)  # [D, N]
        scores = tl.dot(q, k.to(DOT_DTYPE), input_precision=DOT_PRECISION) * sm_scale_log2
        visible = ((keys[None, :] <= position[:, None]) & (keys[None, :] > position[:, None] - window)
                   & key_ok[None, :])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: every weight is 0
        rescale = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * rescale + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_v_pos + dims[None, :],
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)  # [N, D]
        # Probabilities are rounded to V's dtype, as the reference's bf16 matmul does.
        p = cast_rtne(p, v_ptr.dtype.element_ty).to(DOT_DTYPE)
        acc = acc * rescale[:, None] + tl.dot(p, v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new
    has_weight = l_i > 0.0
    out = acc / tl.where(has_weight, l_i, 1.0)[:, None]
    tl.store(out_ptr + split * stride_out_split + batch * stride_out_batch + token[:, None] * stride_out_token
             + head[:, None] * stride_out_head + dims[None, :],
             cast_rtne(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    if STORE_LSE:
        # Natural log of this split's softmax denominator (the sink's term included on split 0).
        lse = tl.where(has_weight, (m_i + tl.log2(tl.where(has_weight, l_i, 1.0))) / LOG2E, float("-inf"))
        tl.store(lse_ptr + split * stride_lse_split + batch * stride_lse_batch + token * stride_lse_token + head,
                 lse, mask=row_ok)


def merge_attention(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention results over disjoint key sets: ``outs`` [S, ..., D] (each normalized by its own
    denominator), ``lses`` [S, ...] their natural-log denominators -> (out float32, lse).

    The sink must be in exactly one part's denominator (give the others ``sinks = -inf``).
    """
    lse = torch.logsumexp(lses, dim=0)
    share = torch.exp(lses - lse.unsqueeze(0)).nan_to_num_(0.0)  # a part, or all, with no weight: 0
    return (share.unsqueeze(-1) * outs.float()).sum(dim=0), lse


def attention_triton(
    q: torch.Tensor,  # [B, Tq, Hq, D]
    k_cache: torch.Tensor,  # [B, S, Hkv, D]
    v_cache: torch.Tensor,  # [B, S, Hkv, D]
    sinks: torch.Tensor,  # [Hq]
    q_positions: torch.Tensor,  # [B, Tq] int64
    kv_len: torch.Tensor,  # [B] int64
    sliding_window: int,  # 0: full attention
    sm_scale: float,
    *,
    return_lse: bool = False,
    config: AttentionConfig | None = None,  # default: the launch table's for this shape (kernels/configs.py)
):
    """Same contract as `attention_torch`; one flash-attention pass, no [Tq, S] scores in memory.

    ``return_lse=True`` returns ``(out, lse)``: ``lse`` is float32 ``[B, Tq, Hq]``, the natural log
    of each row's softmax denominator, ``log(exp(sink[h]) + sum_j exp(sm_scale * q.k_j))`` over the
    keys the row sees: the sink IS included.  So ``out * exp(lse)`` is the unnormalized sum of
    ``exp(score) * v``, and two results over disjoint keys merge with `merge_attention` when only
    one of them was given the sinks (pass ``torch.full_like(sinks, -inf)`` to the other).
    A row that sees no key and no sink gets ``out = 0`` and ``lse = -inf``.
    """
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not group over {kv_heads} kv heads")
    group = q_heads // kv_heads
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    q_positions, kv_len, sinks = q_positions.contiguous(), kv_len.contiguous(), sinks.contiguous()
    rows = q_len * group
    if config is None:
        span = k_cache.shape[1] if not sliding_window else min(k_cache.shape[1], int(sliding_window) + q_len)
        config = attention_config(batch, q_len, group, kv_heads, span)
    block_m = max(16, min(config.block_m, triton.next_power_of_2(rows)))  # tl.dot needs >= 16 rows
    m_blocks = triton.cdiv(rows, block_m)
    splits = config.num_splits
    out = torch.empty(batch, q_len, q_heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, q_len, q_heads, dtype=torch.float32, device=q.device) if return_lse else None
    if splits > 1:  # partial results in float32, merged below
        target = torch.empty(splits, batch, q_len, q_heads, head_dim, dtype=torch.float32, device=q.device)
        target_lse = torch.empty(splits, batch, q_len, q_heads, dtype=torch.float32, device=q.device)
    else:
        target, target_lse = out.unsqueeze(0), (lse.unsqueeze(0) if return_lse else out.new_empty(1, 1, 1, 1, dtype=torch.float32))
    if out.numel():
        launch(
            _attention_kernel, (m_blocks * splits, kv_heads, batch),
            q, k_cache, v_cache, sinks, q_positions, kv_len, target, target_lse,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            target.stride(0), target.stride(1), target.stride(2), target.stride(3),
            target_lse.stride(0), target_lse.stride(1), target_lse.stride(2),
            q_positions.stride(0),
            # No window (0) becomes one longer than any position, so one code path masks both.
            q_len, head_dim, int(sliding_window) if sliding_window > 0 else 1 << 30, sm_scale * 1.4426950408889634,
            splits,
            GROUP=group,
            STORE_LSE=return_lse or splits > 1,
            DOT_DTYPE=dot_operand_dtype(q.dtype),
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        if splits > 1:
            merged, merged_lse = merge_attention(target, target_lse)
            out.copy_(merged)
            if return_lse:
                lse.copy_(merged_lse)
    return (out, lse) if return_lse else out
