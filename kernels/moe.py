"""The MoE MLP over MXFP4 experts: for each token, its k chosen experts run
``down(swiglu(up_gate(x)))`` and their outputs are summed with the routing
weights.  Only the chosen experts are computed; weights stay packed and each
used expert is unpacked just for its own matmul.

The Triton path follows OpenAI's ``matmul_ogs`` (triton_kernels): one grouped
GEMM launch per matmul covers every (expert, row-block) tile of the routing
plan.  The first gathers token rows through ``slot_order // top_k`` and fuses
bias + clamped SwiGLU into its epilogue; the second scales by the routing
weight and scatters each slot's row to ``[T * k, H]``, and a k-way sum brings
it back to token order.  Scatter-then-sum (rather than atomic adds into
``[T, H]``) makes the result bit-for-bit reproducible run to run.
"""

import torch
import triton
import triton.language as tl

from ossbatch.kernels.mxfp4 import dequantize_mxfp4
from ossbatch.kernels.routing import RoutingPlan
from ossbatch.kernels.configs import MOE_BY_ROWS_PER_EXPERT, MoeConfig, moe_config, with_block_m
from ossbatch.kernels.triton_compat import cast_rtne, dot_operand_dtype, launch

SWIGLU_ALPHA = 1.702


def swiglu_torch(x: torch.Tensor, limit: float, alpha: float = SWIGLU_ALPHA) -> torch.Tensor:
    """Clamped SwiGLU over interleaved (gate, linear) columns, as gpt-oss trains it."""
    gate, linear = x[..., ::2], x[..., 1::2]
    gate = gate.clamp(max=limit)
    linear = linear.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (linear + 1)


def moe_torch(
    x: torch.Tensor,  # [T, H]
    weights: torch.Tensor,  # [T, k] routing weights
    plan: RoutingPlan,
    w1_blocks: torch.Tensor,  # [E, 2I, H/32, 16]
    w1_scales: torch.Tensor,  # [E, 2I, H/32]
    b1: torch.Tensor,  # [E, 2I]
    w2_blocks: torch.Tensor,  # [E, H, I/32, 16]
    w2_scales: torch.Tensor,  # [E, H, I/32]
    b2: torch.Tensor,  # [E, H]
    limit: float,
    expert_cache=None,
) -> torch.Tensor:
    """`expert_cache`, when given, maps an expert to its unpacked (w1, w2) so a
    bounded set of hot experts is not unpacked again on every step."""
    tokens, hidden = x.shape
    top_k = weights.shape[-1]
    # Rows gathered once in expert order, so each expert's rows are one contiguous slice.
    x_sorted = x[plan.token_of_position]
    y_sorted = torch.empty_like(x_sorted)
    offsets = plan.expert_offsets.tolist()
    for expert in torch.nonzero(plan.expert_counts).flatten().tolist():
        start, end = offsets[expert], offsets[expert + 1]
        if expert_cache is not None:
            w1, w2 = expert_cache(expert)
        else:
            w1 = dequantize_mxfp4(w1_blocks[expert], w1_scales[expert], x.dtype)
            w2 = dequantize_mxfp4(w2_blocks[expert], w2_scales[expert], x.dtype)
        h = swiglu_torch(torch.addmm(b1[expert].to(x.dtype), x_sorted[start:end], w1[:, :hidden].t()), limit)
        torch.addmm(b2[expert].to(x.dtype), h, w2[:, : h.shape[-1]].t(), out=y_sorted[start:end])
    # Back to (token, choice) order with one scatter, then the weighted sum over the k choices.
    y_slots = torch.empty_like(y_sorted)
    y_slots[plan.slot_order] = y_sorted
    out = (y_slots.view(tokens, top_k, hidden).float() * weights.unsqueeze(-1)).sum(dim=1)
    return out.to(x.dtype)


@triton.jit
def _mxfp4_tile_to_float(packed, scales, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_N, BLOCK_K // 2] packed bytes + [BLOCK_N, BLOCK_K // 32] e8m0 -> [BLOCK_N, BLOCK_K] float32.

    Built from bits rather than a lookup table: registers have no cheap gather.
    """
    codes = tl.reshape(tl.join(packed & 0x0F, packed >> 4), (BLOCK_N, BLOCK_K)).to(tl.uint32)  # low nibble first
    exponent = (codes >> 1) & 3
    mantissa = codes & 1
    # e2m1 -> float32: normal codes are (1 + m/2) * 2**(e-1); e == 0 is the subnormal 0 or 0.5.
    magnitude = tl.where(exponent > 0, ((exponent + 126) << 23) | (mantissa << 22), mantissa * (126 << 23))
    values = (magnitude | ((codes & 8) << 28)).to(tl.float32, bitcast=True)
    # e8m0 -> float32 2**(s - 127); s == 0 is the float32 subnormal 2**-127.
    scales = scales.to(tl.uint32)
    scale = tl.where(scales == 0, 1 << 22, scales << 23).to(tl.float32, bitcast=True)
    values = tl.reshape(values, (BLOCK_N, BLOCK_K // 32, 32)) * scale[:, :, None]
    return tl.reshape(values, (BLOCK_N, BLOCK_K))


@triton.jit
def _grouped_mxfp4_matmul_kernel(
    x_ptr, stride_x_row,
    w_ptr, stride_w_expert, stride_w_col,  # packed [E, N, K / 2] bytes
    scale_ptr, stride_scale_expert, stride_scale_col,  # [E, N, K / 32]
    bias_ptr, stride_bias_expert,  # [E, N]
    out_ptr, stride_out_row,
    slot_order_ptr, route_weights_ptr,
    block_expert_ptr, block_start_ptr, expert_offsets_ptr,
    n_cols, k_dim, limit, alpha,
    TOP_K: tl.constexpr,
    GATHER_ROWS: tl.constexpr,  # read x row slot_order[p] // TOP_K (else row p)
    SWIGLU: tl.constexpr,  # epilogue: bias, SwiGLU of column pairs, store row p
    SCATTER_WEIGHTED: tl.constexpr,  # epilogue: bias, * routing weight, store row slot_order[p]
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # columns of W per tile (SwiGLU halves them on the way out)
    BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,  # compute the tile as W x X^T: weight columns on the MMA's M side
    WEIGHT_PREFETCH: tl.constexpr,  # weight tiles loaded ahead of the one computed (1 or 2)
):
    block = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + block).to(tl.int64)
    positions = tl.load(block_start_ptr + block) + tl.arange(0, BLOCK_M)
    row_ok = positions < tl.load(expert_offsets_ptr + expert + 1)  # an expert's last block is ragged
    if GATHER_ROWS or SCATTER_WEIGHTED:
        slots = tl.load(slot_order_ptr + positions, mask=row_ok, other=0)
    if GATHER_ROWS:
        rows = slots // TOP_K  # no permuted copy of the activations
    else:
        rows = positions.to(tl.int64)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    k_values = tl.arange(0, BLOCK_K)
    k_bytes = tl.arange(0, BLOCK_K // 2)
    k_groups = tl.arange(0, BLOCK_K // 32)
    w_rows = w_ptr + expert * stride_w_expert + cols[:, None].to(tl.int64) * stride_w_col
    scale_rows = scale_ptr + expert * stride_scale_expert + cols[:, None].to(tl.int64) * stride_scale_col
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The weight tile goes through the upcast in registers, which Triton's pipeliner does not
    # stage (it stages only loads that feed tl.dot: x here), so it is prefetched by hand
    # WEIGHT_PREFETCH (1 or 2) K blocks ahead: those bytes are in flight while block k0 is computed.
    packed_next = tl.load(w_rows + k_bytes[None, :], mask=col_ok[:, None] & (2 * k_bytes < k_dim)[None, :], other=0)
    scales_next = tl.load(scale_rows + k_groups[None, :], mask=col_ok[:, None] & (32 * k_groups < k_dim)[None, :], other=0)
    if WEIGHT_PREFETCH == 2:
        packed_after = tl.load(w_rows + (BLOCK_K // 2 + k_bytes)[None, :],
                               mask=col_ok[:, None] & (BLOCK_K + 2 * k_bytes < k_dim)[None, :], other=0)
        scales_after = tl.load(scale_rows + (BLOCK_K // 32 + k_groups)[None, :],
                               mask=col_ok[:, None] & (BLOCK_K + 32 * k_groups < k_dim)[None, :], other=0)
    for k0 in range(0, k_dim, BLOCK_K):
        k_ok = k0 + k_values < k_dim  # K need not be a multiple of BLOCK_K (nor of 32)
        x = tl.load(x_ptr + rows[:, None] * stride_x_row + (k0 + k_values)[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        packed, scales = packed_next, scales_next
        k1 = k0 + WEIGHT_PREFETCH * BLOCK_K  # past K on the last blocks: fully masked, no memory traffic
        packed_ahead = tl.load(w_rows + (k1 // 2 + k_bytes)[None, :],
                               mask=col_ok[:, None] & (k1 + 2 * k_bytes < k_dim)[None, :], other=0)
        scales_ahead = tl.load(scale_rows + (k1 // 32 + k_groups)[None, :],
                               mask=col_ok[:, None] & (k1 + 32 * k_groups < k_dim)[None, :], other=0)
        if WEIGHT_PREFETCH == 2:
            packed_next, scales_next = packed_after, scales_after
            packed_after, scales_after = packed_ahead, scales_ahead
        else:
            packed_next, scales_next = packed_ahead, scales_ahead
        # Upcast in registers; values past K are zeroed so checkpoint padding never leaks in.
        w = tl.where(k_ok[None, :], _mxfp4_tile_to_float(packed, scales, BLOCK_N, BLOCK_K), 0.0)
        # Round W to x's dtype first (exact for e2m1 * 2**s), then hand tl.dot its operand dtype.
        w = w.to(x_ptr.dtype.element_ty).to(DOT_DTYPE)
        if SWAP_AB:
            acc = tl.dot(w, tl.trans(x.to(DOT_DTYPE)), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x.to(DOT_DTYPE), tl.trans(w), acc, input_precision=DOT_PRECISION)
    if SWAP_AB:
        acc = tl.trans(acc)

    acc += tl.load(bias_ptr + expert * stride_bias_expert + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if SWIGLU:
        # Columns interleave (gate, linear), so the pairs are adjacent in the tile.
        gate, linear = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        gate = tl.minimum(gate, limit)
        linear = tl.minimum(tl.maximum(linear, -limit), limit)
        y = gate * tl.sigmoid(alpha * gate) * (linear + 1.0)
        out_cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(out_ptr + positions[:, None].to(tl.int64) * stride_out_row + out_cols[None, :],
                 cast_rtne(y, out_ptr.dtype.element_ty), mask=row_ok[:, None] & (out_cols < n_cols // 2)[None, :])
    if SCATTER_WEIGHTED:
        acc *= tl.load(route_weights_ptr + slots, mask=row_ok, other=0.0)[:, None]
        tl.store(out_ptr + slots[:, None] * stride_out_row + cols[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# The smallest reduction block any configuration in the table uses (tests keep K off its multiples).
MOE_BLOCK_K = min(config.block_k for config in MOE_BY_ROWS_PER_EXPERT.values())


def _grouped_mxfp4_matmul(x, blocks, scales, bias, out, plan, route_weights, limit, config: MoeConfig, *,
                          gather_rows, swiglu, scatter):
    n_cols = blocks.shape[1]
    packed = blocks.reshape(blocks.shape[0], n_cols, -1)  # [E, N, G * 16]: the bytes along K are contiguous
    grid = (plan.block_expert.numel(), triton.cdiv(n_cols, config.block_n))
    launch(
        _grouped_mxfp4_matmul_kernel, grid,
        x, x.stride(0),
        packed, packed.stride(0), packed.stride(1),
        scales, scales.stride(0), scales.stride(1),
        bias, bias.stride(0),
        out, out.stride(0),
        plan.slot_order, route_weights,
        plan.block_expert, plan.block_start, plan.expert_offsets,
        n_cols, x.shape[1], float(limit), SWIGLU_ALPHA,
        TOP_K=plan.top_k, GATHER_ROWS=gather_rows, SWIGLU=swiglu, SCATTER_WEIGHTED=scatter,
        DOT_DTYPE=dot_operand_dtype(x.dtype),
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # no silent TF32 for float32 inputs
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SWAP_AB=config.swap_ab,
        WEIGHT_PREFETCH=config.weight_prefetch,
        **config.launch_options(),
    )


def moe_triton(
    x: torch.Tensor,  # [T, H]
    weights: torch.Tensor,  # [T, k] routing weights
    plan: RoutingPlan,  # launched with plan.block_m rows per tile, so any plan_routing_torch block_m works
    w1_blocks: torch.Tensor,  # [E, 2I, ceil(H/32), 16]
    w1_scales: torch.Tensor,  # [E, 2I, ceil(H/32)]
    b1: torch.Tensor,  # [E, 2I]
    w2_blocks: torch.Tensor,  # [E, H, ceil(I/32), 16]
    w2_scales: torch.Tensor,  # [E, H, ceil(I/32)]
    b2: torch.Tensor,  # [E, H]
    limit: float,
    *,
    config: MoeConfig | None = None,  # default: the launch table's for this many tokens (kernels/configs.py)
) -> torch.Tensor:
    """Same contract as `moe_torch`; two grouped-GEMM launches and a k-way sum."""
    tokens, hidden = x.shape
    top_k, intermediate = plan.top_k, w1_blocks.shape[1] // 2
    if plan.block_m < 16 or plan.block_m & (plan.block_m - 1):
        raise ValueError(f"moe_triton needs a plan with a power-of-two block_m >= 16, got {plan.block_m}")
    config = with_block_m(config or moe_config(tokens, top_k, w1_blocks.shape[0]), plan.block_m)
    x = x.contiguous()
    w1_blocks, w1_scales, w2_blocks, w2_scales = (t.contiguous() for t in (w1_blocks, w1_scales, w2_blocks, w2_scales))
    b1, b2 = b1.contiguous(), b2.contiguous()
    route_weights = weights.reshape(-1).to(torch.float32).contiguous()  # indexed by slot
    activated = torch.empty(tokens * top_k, intermediate, dtype=x.dtype, device=x.device)  # expert-sorted order
    per_slot = torch.empty(tokens * top_k, hidden, dtype=torch.float32, device=x.device)  # slot order
    if plan.block_expert.numel():
        _grouped_mxfp4_matmul(x, w1_blocks, w1_scales, b1, activated, plan, route_weights, limit, config,
                              gather_rows=True, swiglu=True, scatter=False)
        _grouped_mxfp4_matmul(activated, w2_blocks, w2_scales, b2, per_slot, plan, route_weights, limit, config,
                              gather_rows=False, swiglu=False, scatter=True)
    # Every slot was written exactly once, so a fixed-order sum over k replaces atomics.
    return per_slot.view(tokens, top_k, hidden).sum(dim=1).to(x.dtype)
