"""Every configuration in the launch table (kernels/configs.py) computes what the torch reference does."""

import pytest
import torch

from ossbatch.kernels import configs
from ossbatch.kernels.attention import attention_torch, attention_triton
from ossbatch.kernels.moe import moe_torch, moe_triton
from ossbatch.kernels.routing import plan_routing_torch, route_torch

from test_kernel_attention import make_inputs
from test_kernel_moe import make_experts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bucket", list(configs.MOE_BY_ROWS_PER_EXPERT))
def test_every_moe_configuration_matches_reference(bucket, dtype, device, assert_matches):
    config = configs.MOE_BY_ROWS_PER_EXPERT[bucket]
    torch.manual_seed(0)
    # K = 144 is a multiple of neither block_k; N = 2I = 80 not of block_n; ragged loads.
    num_experts, k, tokens = 4, 2, 70
    w1_blocks, w1_scales, b1, w2_blocks, w2_scales, b2 = make_experts(num_experts, 144, 40, device)
    x = torch.randn(tokens, 144, device=device).to(dtype)
    weights, experts = route_torch(torch.randn(tokens, num_experts, device=device) * 2, k)
    plan = plan_routing_torch(experts, num_experts, block_m=config.block_m)
    args = (x, weights, plan, w1_blocks, w1_scales, b1.to(dtype), w2_blocks, w2_scales, b2.to(dtype), 7.0)
    assert_matches(moe_triton(*args, config=config), moe_torch(*args))


def test_moe_table_picks_swapped_tiles_for_few_rows_per_expert():
    # gpt-oss-120b decode at batch 1..256: at most 8 rows per expert, so the tokens sit on the MMA's N side.
    for batch in configs.DECODE_BATCHES:
        config = configs.moe_config(batch, 4, 128)
        assert config.swap_ab and config.block_m <= 16, (batch, config)
    assert not configs.moe_config(configs.PREFILL_TOKENS, 4, 128).swap_ab
    assert plan_routing_torch(torch.zeros(1, 4, dtype=torch.long), 128).block_m == configs.moe_config(1, 4, 128).block_m


@pytest.mark.parametrize("bucket", list(configs.ATTENTION_BY_BUCKET))
def test_every_attention_configuration_matches_reference(bucket, device, assert_matches):
    config = configs.ATTENTION_BY_BUCKET[bucket]
    q_len = 1 if bucket.startswith("decode") else 7
    args = make_inputs(q_len, q_heads=8, kv_heads=2, head_dim=16, dtype=torch.bfloat16, device=device)
    for window in (0, 5):
        out, lse = attention_triton(*args, window, 0.25, return_lse=True, config=config)
        ref, ref_lse = attention_torch(*args, window, 0.25, return_lse=True)
        assert_matches(out, ref)
        assert (lse - ref_lse).abs().max().item() <= 2e-2


def test_split_kv_is_used_for_small_decode_batches_only():
    long_context = 32768
    assert configs.attention_config(1, 1, 8, 8, long_context).num_splits > 1
    assert configs.attention_config(256, 1, 8, 8, long_context).num_splits == 1
    # Never more splits than key blocks: a 129-key window gets at most 3 blocks of 64.
    assert configs.attention_config(1, 1, 8, 8, 129).num_splits <= 3
