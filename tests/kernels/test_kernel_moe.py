import pytest
import torch

from ossbatch.kernels.moe import MOE_BLOCK_K, moe_torch, moe_triton
from ossbatch.kernels.mxfp4 import quantize_mxfp4
from ossbatch.kernels.routing import plan_routing_torch, route_torch


def quantize_padded(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP4 along the last dim, zero-padded to whole 32-value groups as checkpoints store it."""
    return quantize_mxfp4(torch.nn.functional.pad(values, (0, -values.shape[-1] % 32)))


def make_experts(num_experts, hidden, intermediate, device):
    w1_blocks, w1_scales = quantize_padded(torch.randn(num_experts, 2 * intermediate, hidden) * 0.3)
    w2_blocks, w2_scales = quantize_padded(torch.randn(num_experts, hidden, intermediate) * 0.3)
    b1, b2 = torch.randn(num_experts, 2 * intermediate), torch.randn(num_experts, hidden)
    return [t.to(device) for t in (w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2)]


def run_both(tokens, hidden, intermediate, num_experts, k, block_m, dtype, device, idle_expert=None, limit=7.0):
    torch.manual_seed(0)
    w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2 = make_experts(num_experts, hidden, intermediate, device)
    x = torch.randn(tokens, hidden, device=device).to(dtype)
    logits = torch.randn(tokens, num_experts, device=device) * 2  # skewed: ragged per-expert loads
    if idle_expert is not None:
        logits[:, idle_expert] = -1e9
    weights, experts = route_torch(logits, k)
    plan = plan_routing_torch(experts, num_experts, block_m=block_m)
    args = (x, weights, plan, w1_blocks, w1_scales, b1.to(dtype), w2_blocks, w2_scales, b2.to(dtype), limit)
    return moe_triton(*args), moe_torch(*args), plan, args


CASES = {
    # K = 80 is a multiple of neither BLOCK_K nor 32; N = 2I = 96 is not a multiple of BLOCK_N.
    "ragged_idle_expert_k80": dict(tokens=13, hidden=80, intermediate=48, num_experts=6, k=2, block_m=16, idle_expert=3),
    "decode_one_token": dict(tokens=1, hidden=64, intermediate=32, num_experts=8, k=4, block_m=16),
    "several_blocks_per_expert": dict(tokens=40, hidden=96, intermediate=40, num_experts=4, k=2, block_m=16),
    "block_m_32_tight_limit": dict(tokens=40, hidden=72, intermediate=64, num_experts=5, k=3, block_m=32, limit=1.0),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_moe_matches_reference(case, dtype, device, assert_matches, assert_as_accurate):
    out, reference, plan, args = run_both(**CASES[case], dtype=dtype, device=device)
    assert_matches(out, reference)
    if dtype == torch.bfloat16:
        x, weights, plan, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, limit = args
        exact = moe_torch(x.float(), weights, plan, w1_blocks, w1_scales, b1.float(), w2_blocks, w2_scales, b2.float(), limit)
        assert_as_accurate(out, reference, exact)
    if "idle_expert" in CASES[case]:
        assert plan.expert_counts[CASES[case]["idle_expert"]] == 0
        assert len(set(plan.expert_counts.tolist()) - {0}) > 1, "loads should be ragged"
    if case == "several_blocks_per_expert":
        assert plan.block_expert.numel() > plan.expert_counts.count_nonzero()


def test_k_is_not_a_multiple_of_the_block():
    assert 80 % MOE_BLOCK_K and 80 % 32 and 48 % MOE_BLOCK_K


def test_moe_is_deterministic(device):
    first, _, _, args = run_both(**CASES["several_blocks_per_expert"], dtype=torch.float32, device=device)
    assert torch.equal(first, moe_triton(*args))


def test_moe_tolerance_catches_a_wrong_nibble_order(device, assert_matches):
    # The check is tight enough to fail: high-nibble-first weights give a clearly different reference.
    out, _, _, args = run_both(**CASES["ragged_idle_expert_k80"], dtype=torch.float32, device=device)
    x, weights, plan, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, limit = args
    swapped = (w1_blocks >> 4) | (w1_blocks << 4)
    wrong = moe_torch(x, weights, plan, swapped, w1_scales, b1, w2_blocks, w2_scales, b2, limit)
    with pytest.raises(AssertionError):
        assert_matches(out, wrong)


def test_moe_rejects_a_plan_block_it_cannot_launch(device):
    _, _, _, args = run_both(**CASES["decode_one_token"], dtype=torch.float32, device=device)
    x, weights, plan, *rest = args
    plan = plan_routing_torch(plan.slot_order.new_tensor([[0, 1, 2, 3]]), 8, block_m=8)
    with pytest.raises(ValueError, match="block_m"):
        moe_triton(x, weights, plan, *rest)
