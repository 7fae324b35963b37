"""Cascade attention: attention over a shared prefix block and over each row's
own KV, computed apart and merged with their softmax statistics.

Rows that share a prompt prefix keep one copy of its KV. Each query attends
twice: to the prefix block (every row of a prefix group reads the same block,
so a step reads it once for all of them) and to its row's own cache. Each pass
returns its output normalised over its own keys, and the log-sum-exp ``lse``
of its scores; two such states merge exactly:

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

gpt-oss's sink (a logit with no value, in every head's denominator) must be
counted once: the own-KV pass includes it, the prefix pass gets ``NO_SINK``, a
logit so low that its weight is exactly 0 but a query that sees no prefix key
(a windowed layer, far past the prefix) still has a finite ``lse`` and output 0.

Each pass is `kernels.attention`'s attention with ``return_lse=True`` (the torch
reference or the Triton kernel); `merge_attention_torch` (the split-KV merge of
`kernels.attention`, for two states) and `merge_attention_triton` merge two states.
"""

import torch
import triton
import triton.language as tl

from ossbatch.kernels.attention import merge_attention
from ossbatch.kernels.triton_compat import cast_rtne

NO_SINK = -1.0e30  # a sink logit whose weight exp(NO_SINK - lse) is 0 in float32


def merge_attention_torch(
    out_a: torch.Tensor,  # [N, H, D]
    lse_a: torch.Tensor,  # [N, H] float32
    out_b: torch.Tensor,  # [N, H, D]
    lse_b: torch.Tensor,  # [N, H] float32
) -> torch.Tensor:
    """Two attention states over disjoint keys, merged into attention over all of them."""
    merged, _ = merge_attention(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))
    return merged.to(out_a.dtype)


@triton.jit
def _merge_kernel(
    out_a_ptr, lse_a_ptr, out_b_ptr, lse_b_ptr, out_ptr,
    stride_a_token, stride_a_head, stride_b_token, stride_b_head, stride_out_token, stride_out_head,
    stride_lse_a, stride_lse_b,
    heads, head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    head_ok = head < heads
    ok = head_ok[:, None] & (dims[None, :] < head_dim)
    lse_a = tl.load(lse_a_ptr + token * stride_lse_a + head, mask=head_ok, other=0.0).to(tl.float32)
    lse_b = tl.load(lse_b_ptr + token * stride_lse_b + head, mask=head_ok, other=0.0).to(tl.float32)
    top = tl.maximum(lse_a, lse_b)
    weight_a = tl.exp(lse_a - top)
    weight_b = tl.exp(lse_b - top)
    total = weight_a + weight_b
    a = tl.load(out_a_ptr + token * stride_a_token + head[:, None] * stride_a_head + dims[None, :], mask=ok, other=0.0)
    b = tl.load(out_b_ptr + token * stride_b_token + head[:, None] * stride_b_head + dims[None, :], mask=ok, other=0.0)
    merged = (a.to(tl.float32) * (weight_a / total)[:, None]) + (b.to(tl.float32) * (weight_b / total)[:, None])
    tl.store(out_ptr + token * stride_out_token + head[:, None] * stride_out_head + dims[None, :],
             cast_rtne(merged, out_ptr.dtype.element_ty), mask=ok)


def merge_attention_triton(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Same contract as `merge_attention_torch`; one program per token, all its heads."""
    tokens, heads, head_dim = out_a.shape
    out_a, out_b = (t if t.stride(-1) == 1 else t.contiguous() for t in (out_a, out_b))
    lse_a, lse_b = lse_a.float().contiguous(), lse_b.float().contiguous()
    out = torch.empty_like(out_a)
    if out.numel():
        _merge_kernel[(tokens,)](
            out_a, lse_a, out_b, lse_b, out,
            out_a.stride(0), out_a.stride(1), out_b.stride(0), out_b.stride(1), out.stride(0), out.stride(1),
            lse_a.stride(0), lse_b.stride(0),
            heads, head_dim,
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(head_dim),
        )
    return out
