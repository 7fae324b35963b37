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

from ossbatch.kernels.triton_compat import cast_rtne, dot_operand_dtype


def attention_torch(
    q: torch.Tensor,  # [B, Tq, Hq, D]
    k_cache: torch.Tensor,  # [B, S, Hkv, D]
    v_cache: torch.Tensor,  # [B, S, Hkv, D]
    sinks: torch.Tensor,  # [Hq]
    q_positions: torch.Tensor,  # [B, Tq] int64
    kv_len: torch.Tensor,  # [B] int64
    sliding_window: int,  # 0: full attention
    sm_scale: float,
) -> torch.Tensor:
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
    return out.permute(0, 3, 1, 2, 4).reshape(batch, q_len, q_heads, head_dim)

def attention_sdpa(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    q_positions: torch.Tensor,
    kv_len: torch.Tensor,
    sliding_window: int,
    sm_scale: float,
) -> torch.Tensor:
    """`attention_torch` through torch's fused SDPA (the torch backend's fast path).

    The sink becomes one more key with a zero key and a zero value: its score
    comes from the additive mask, so it joins the softmax's denominator and
    adds nothing to the output, exactly as in the reference.
    """
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
    q_ptr, k_ptr, v_ptr, sinks_ptr, q_positions_ptr, kv_len_ptr, out_ptr,
    stride_q_batch, stride_q_token, stride_q_head,
    stride_k_batch, stride_k_pos, stride_k_head,
    stride_v_batch, stride_v_pos, stride_v_head,
    stride_out_batch, stride_out_token, stride_out_head,
    stride_positions_batch,
    q_len, head_dim, window, sm_scale_log2,  # window: 2**30 for full attention
    GROUP: tl.constexpr,  # query heads per kv head
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid_m = tl.program_id(0)
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

    # The sink joins the denominator as a logit with no value: start the running
    # max at it with weight exp(0) = 1, so a row that sees no key returns 0, not NaN.
    m_i = tl.load(sinks_ptr + head, mask=row_ok, other=0.0).to(tl.float32) * LOG2E
    l_i = tl.full((BLOCK_M,), 1.0, tl.float32)
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
        rescale = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * rescale + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None].to(tl.int64) * stride_v_pos + dims[None, :],
                    mask=key_ok[:, None] & dim_ok[None, :], other=0.0)  # [N, D]
        # Probabilities are rounded to V's dtype, as the reference's bf16 matmul does.
        p = cast_rtne(p, v_ptr.dtype.element_ty).to(DOT_DTYPE)
        acc = acc * rescale[:, None] + tl.dot(p, v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + batch * stride_out_batch + token[:, None] * stride_out_token + head[:, None] * stride_out_head
             + dims[None, :], cast_rtne(out, out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


ATTENTION_BLOCK_N = 64


def attention_triton(
    q: torch.Tensor,  # [B, Tq, Hq, D]
    k_cache: torch.Tensor,  # [B, S, Hkv, D]
    v_cache: torch.Tensor,  # [B, S, Hkv, D]
    sinks: torch.Tensor,  # [Hq]
    q_positions: torch.Tensor,  # [B, Tq] int64
    kv_len: torch.Tensor,  # [B] int64
    sliding_window: int,  # 0: full attention
    sm_scale: float,
) -> torch.Tensor:
    """Same contract as `attention_torch`; one flash-attention pass, no [Tq, S] scores in memory."""
    batch, q_len, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not group over {kv_heads} kv heads")
    group = q_heads // kv_heads
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    q_positions, kv_len, sinks = q_positions.contiguous(), kv_len.contiguous(), sinks.contiguous()
    out = torch.empty(batch, q_len, q_heads, head_dim, dtype=q.dtype, device=q.device)
    rows = q_len * group
    block_m = max(16, min(64, triton.next_power_of_2(rows)))  # tl.dot needs >= 16 rows
    grid = (triton.cdiv(rows, block_m), kv_heads, batch)
    if out.numel():
        _attention_kernel[grid](
            q, k_cache, v_cache, sinks, q_positions, kv_len, out,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            q_positions.stride(0),
            # No window (0) becomes one longer than any position, so one code path masks both.
            q_len, head_dim, int(sliding_window) if sliding_window > 0 else 1 << 30, sm_scale * 1.4426950408889634,
            GROUP=group,
            DOT_DTYPE=dot_operand_dtype(q.dtype),
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            BLOCK_M=block_m, BLOCK_N=ATTENTION_BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        )
    return out
