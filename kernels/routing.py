"""MoE routing: top-k experts per token, softmax over the chosen, and the plan
that groups token slots by expert for the grouped matmul."""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ossbatch.kernels.configs import ROUTE, moe_block_m
from ossbatch.kernels.triton_compat import launch


def route_torch(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, E]`` logits -> (weights ``[T, k]`` float32, experts ``[T, k]`` int64)."""
    top_values, top_experts = torch.topk(router_logits.float(), k, dim=-1, sorted=True)
    return torch.softmax(top_values, dim=-1), top_experts


@dataclass
class RoutingPlan:
    """Token slots (token, choice) grouped by expert.

    ``slot_order[i]`` is the flat slot (``token * k + choice``) at position i of
    the expert-sorted order; ``expert_offsets[e]:expert_offsets[e + 1]`` are the
    positions of expert e.  ``block_expert``/``block_start`` list the row blocks
    of ``block_m`` positions that a grouped kernel launches, one per program.
    """

    slot_order: torch.Tensor  # [T * k] int64
    expert_counts: torch.Tensor  # [E] int64
    expert_offsets: torch.Tensor  # [E + 1] int64
    block_expert: torch.Tensor  # [num_blocks] int32
    block_start: torch.Tensor  # [num_blocks] int32 (position in slot_order)
    top_k: int
    # Recorded so a grouped kernel launches with the very row-block size the
    # blocks were cut with (a mismatch would skip or double-count rows).
    block_m: int = 16

    @property
    def token_of_position(self) -> torch.Tensor:
        return self.slot_order // self.top_k


def plan_routing_torch(experts: torch.Tensor, num_experts: int, block_m: int | None = None) -> RoutingPlan:
    """`block_m` rows per block; by default the launch table's for this many tokens (kernels/configs.py)."""
    k = experts.shape[-1]
    if block_m is None:
        block_m = moe_block_m(experts.numel() // max(k, 1), k, num_experts)
    flat = experts.reshape(-1)
    slot_order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.cumsum(counts, dim=0)
    blocks_per_expert = (counts + block_m - 1) // block_m
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device), blocks_per_expert)
    first_block = torch.cumsum(blocks_per_expert, dim=0) - blocks_per_expert
    block_index = torch.arange(block_expert.numel(), device=flat.device) - first_block[block_expert]
    block_start = offsets[block_expert] + block_index * block_m
    return RoutingPlan(
        slot_order=slot_order,
        expert_counts=counts,
        expert_offsets=offsets,
        block_expert=block_expert.to(torch.int32),
        block_start=block_start.to(torch.int32),
        top_k=k,
        block_m=block_m,
    )


@triton.jit
def _route_kernel(
    logits_ptr,
    weights_ptr,
    experts_ptr,
    n_tokens,
    n_experts,
    stride_logits_row,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    expert_ids = tl.arange(0, BLOCK_E)
    token_ok = tokens < n_tokens
    logits = tl.load(
        logits_ptr + tokens[:, None].to(tl.int64) * stride_logits_row + expert_ids[None, :],
        mask=token_ok[:, None] & (expert_ids[None, :] < n_experts),
        other=0.0,
    ).to(tl.float32)
    taken = expert_ids[None, :] >= n_experts  # padding columns are never candidates
    choice = tl.arange(0, BLOCK_K)
    top_values = tl.full((BLOCK_T, BLOCK_K), float("-inf"), tl.float32)
    top_experts = tl.zeros((BLOCK_T, BLOCK_K), tl.int64)
    # k rounds of argmax (k is 4 for gpt-oss, far cheaper than a sort of 128).
    # Ties go to the lowest expert id, as a stable descending sort would order them;
    # `taken` (not a -inf overwrite) keeps a chosen -inf logit from being chosen twice.
    for i in tl.static_range(TOP_K):
        candidates = tl.where(taken, float("-inf"), logits)
        best = tl.max(candidates, axis=1)
        is_best = (candidates == best[:, None]) & ~taken
        best_expert = tl.min(tl.where(is_best, expert_ids[None, :], BLOCK_E), axis=1)
        taken = taken | (expert_ids[None, :] == best_expert[:, None])
        top_values = tl.where(choice[None, :] == i, best[:, None], top_values)
        top_experts = tl.where(choice[None, :] == i, best_expert[:, None].to(tl.int64), top_experts)
    # Softmax over the chosen only; the first choice is the row maximum.
    first = tl.max(top_values, axis=1)
    e = tl.where(choice[None, :] < TOP_K, tl.exp(top_values - first[:, None]), 0.0)
    weights = e / tl.sum(e, axis=1)[:, None]
    out_offsets = tokens[:, None].to(tl.int64) * TOP_K + choice[None, :]
    out_mask = token_ok[:, None] & (choice[None, :] < TOP_K)
    tl.store(weights_ptr + out_offsets, weights, mask=out_mask)
    tl.store(experts_ptr + out_offsets, top_experts, mask=out_mask)


def route_triton(router_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `route_torch`: top-k, then softmax over the chosen k."""
    n_tokens, n_experts = router_logits.shape
    if not 0 < k <= n_experts:
        raise ValueError(f"top-k must be in 1..{n_experts}, got {k}")
    logits = router_logits if router_logits.stride(-1) == 1 else router_logits.contiguous()
    weights = torch.empty(n_tokens, k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(n_tokens, k, dtype=torch.int64, device=logits.device)
    block_t = ROUTE.block_rows
    if n_tokens:
        launch(
            _route_kernel, (triton.cdiv(n_tokens, block_t),),
            logits, weights, experts, n_tokens, n_experts, logits.stride(0),
            TOP_K=k, BLOCK_T=block_t,
            BLOCK_E=triton.next_power_of_2(n_experts), BLOCK_K=triton.next_power_of_2(k), num_warps=ROUTE.num_warps,
        )
    return weights, experts
