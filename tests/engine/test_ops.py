"""The torch reference ops: MXFP4 against transformers' unpacking, MoE that
computes only the chosen experts, and sampling that is per-row seeded."""

import pytest
import torch

from ossbatch.kernels.moe import moe_torch, swiglu_torch
from ossbatch.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from ossbatch.kernels.routing import plan_routing_torch, route_torch
from ossbatch.engine.sampling import sample


def test_mxfp4_matches_transformers_unpacking():
    integrations = pytest.importorskip("transformers.integrations.mxfp4")
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(115, 135, (3, 10, 4), generator=gen, dtype=torch.int32).to(torch.uint8)
    ours = dequantize_mxfp4(blocks, scales, torch.float32)
    theirs = integrations.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
    # transformers returns [E, K, rows] (transposed for x @ W).
    torch.testing.assert_close(ours, theirs.transpose(1, 2), rtol=0, atol=0)


def test_mxfp4_round_trip_is_exact_on_representable_values():
    gen = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (5, 2, 16), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(120, 130, (5, 2), generator=gen, dtype=torch.int32).to(torch.uint8)
    values = dequantize_mxfp4(blocks, scales)
    again = dequantize_mxfp4(*quantize_mxfp4(values))
    torch.testing.assert_close(again, values, rtol=0, atol=0)


def _dense_moe(x, weights, experts, w1, b1, w2, b2, limit):
    """All experts, densely, then the routing weights select: the slow definition."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        y = swiglu_torch(x @ w1[e].t() + b1[e], limit) @ w2[e].t() + b2[e]
        gate = (weights * (experts == e)).sum(-1, keepdim=True)
        out += gate * y
    return out


def test_moe_equals_dense_definition_and_touches_only_chosen_experts():
    gen = torch.Generator().manual_seed(2)
    tokens, hidden, inter, num_experts, k = 11, 64, 32, 6, 2
    w1_blocks = torch.randint(0, 256, (num_experts, 2 * inter, 2, 16), generator=gen, dtype=torch.int32).to(torch.uint8)
    w1_scales = torch.full((num_experts, 2 * inter, 2), 120, dtype=torch.uint8)
    w2_blocks = torch.randint(0, 256, (num_experts, hidden, 1, 16), generator=gen, dtype=torch.int32).to(torch.uint8)
    w2_scales = torch.full((num_experts, hidden, 1), 121, dtype=torch.uint8)
    b1, b2 = torch.randn(num_experts, 2 * inter, generator=gen), torch.randn(num_experts, hidden, generator=gen)
    x = torch.randn(tokens, hidden, generator=gen)
    logits = torch.randn(tokens, num_experts, generator=gen)
    logits[:, 4] = -100  # expert 4 is never chosen
    weights, experts = route_torch(logits, k)
    plan = plan_routing_torch(experts, num_experts)
    assert plan.expert_counts[4] == 0 and plan.expert_counts.sum() == tokens * k

    touched = []

    def unpack(e):
        touched.append(e)
        return dequantize_mxfp4(w1_blocks[e], w1_scales[e]), dequantize_mxfp4(w2_blocks[e], w2_scales[e])

    out = moe_torch(x, weights, plan, w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2, 7.0, expert_cache=unpack)
    assert sorted(touched) == sorted(set(experts.flatten().tolist()))
    assert 4 not in touched
    w1, w2 = dequantize_mxfp4(w1_blocks, w1_scales), dequantize_mxfp4(w2_blocks, w2_scales)
    torch.testing.assert_close(out, _dense_moe(x, weights, experts, w1, b1, w2, b2, 7.0), rtol=1e-5, atol=1e-5)


def test_routing_softmax_over_chosen_experts():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    weights, experts = route_torch(logits, 2)
    assert experts.tolist() == [[1, 3]]
    torch.testing.assert_close(weights, torch.softmax(torch.tensor([[3.0, 2.0]]), -1))


def test_sampling_draw_depends_on_row_seed_not_neighbours():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1000, generator=gen)
    temperature = torch.full((4,), 1.0)
    top_p = torch.tensor([1.0, 0.5, 1.0, 0.5], dtype=torch.float64)
    seeds = torch.tensor([7, 7, 8, 9])
    steps = torch.tensor([0, 0, 0, 3])
    together = sample(logits, temperature, top_p, seeds, steps)
    for row in range(4):
        alone = sample(logits[row : row + 1], temperature[row : row + 1], top_p[row : row + 1], seeds[row : row + 1], steps[row : row + 1])
        assert alone.item() == together[row].item()
    draws = {sample(logits[:1], temperature[:1], top_p[:1], torch.tensor([s]), steps[:1]).item() for s in range(40)}
    assert len(draws) > 10  # different seeds, different draws


def test_top_p_keeps_only_the_nucleus_and_zero_temperature_is_greedy():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for seed in range(50):
        token = sample(logits, torch.tensor([1.0]), torch.tensor([0.7], dtype=torch.float64), torch.tensor([seed]), torch.tensor([0])).item()
        assert token in (0, 1)
    greedy = sample(logits, torch.tensor([0.0]), torch.tensor([1.0], dtype=torch.float64), torch.tensor([1]), torch.tensor([0]))
    assert greedy.item() == 0


@pytest.mark.parametrize("q_len, span, window", [(1, 23, 0), (1, 23, 5), (17, 17, 0), (17, 17, 4), (9, 30, 40)])
def test_fused_attention_equals_the_reference(q_len, span, window):
    from ossbatch.kernels.attention import attention_sdpa, attention_torch

    gen = torch.Generator().manual_seed(q_len * 100 + span + window)
    batch, q_heads, kv_heads, dim = 3, 6, 2, 16
    q = torch.randn(batch, q_len, q_heads, dim, generator=gen)
    k, v = torch.randn(2, batch, span + 4, kv_heads, dim, generator=gen)
    sinks = torch.randn(q_heads, generator=gen)
    kv_len = torch.tensor([span, span - 3, max(1, span - 11)])
    if q_len == 1:
        q_positions = (kv_len - 1)[:, None]
    else:
        q_positions = (kv_len - q_len).clamp(min=0)[:, None] + torch.arange(q_len)[None]
    expected = attention_torch(q, k, v, sinks, q_positions, kv_len, window, dim**-0.5)
    actual = attention_sdpa(q, k, v, sinks, q_positions, kv_len, window, dim**-0.5)
    valid = q_positions < kv_len[:, None]
    torch.testing.assert_close(actual[valid], expected[valid], rtol=1e-5, atol=1e-5)
