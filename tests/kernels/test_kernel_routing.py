import pytest
import torch

from ossbatch.kernels.routing import plan_routing_torch, route_torch, route_triton


def untied_logits(tokens: int, experts: int, device, dtype) -> torch.Tensor:
    """Distinct values in every row (exact in bf16 too): torch.topk orders ties
    arbitrarily (it gives [2, 4, 1] for three equal logits on CPU), so ties are not compared."""
    ranks = torch.stack([torch.randperm(experts) for _ in range(tokens)]).float()
    return ((ranks - experts / 2) / 8).to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens,experts,k", [(1, 8, 1), (5, 6, 4), (33, 128, 4), (17, 32, 3)])
def test_route_matches_reference(tokens, experts, k, dtype, device):
    torch.manual_seed(0)
    logits = untied_logits(tokens, experts, device, dtype)
    weights, chosen = route_triton(logits, k)
    ref_weights, ref_chosen = route_torch(logits, k)
    assert chosen.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(chosen, ref_chosen)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)


def test_route_never_picks_an_expert_twice_among_minus_inf(device):
    # Masked experts (-inf) must not be chosen twice once the finite ones run out.
    logits = torch.full((3, 8), float("-inf"), device=device)
    logits[:, 5] = 1.0
    logits[:, 2] = 0.5
    weights, chosen = route_triton(logits, 4)
    assert torch.equal(chosen[:, :2], torch.tensor([[5, 2]] * 3, device=device))
    assert all(len(set(row)) == 4 for row in chosen.tolist())
    torch.testing.assert_close(weights, route_torch(logits, 4)[0])  # the -inf choices weigh 0


def test_route_rejects_bad_k(device):
    with pytest.raises(ValueError, match="top-k"):
        route_triton(torch.zeros(2, 4, device=device), 5)


def test_plan_records_its_block_size(device):
    experts = torch.tensor([[0, 2], [2, 1], [2, 0]], device=device)
    plan = plan_routing_torch(experts, 4, block_m=32)
    assert plan.block_m == 32
    assert plan.expert_counts.tolist() == [2, 1, 3, 0]
    assert plan.block_expert.tolist() == [0, 1, 2] and plan.block_start.tolist() == [0, 2, 3]
