import pytest
import torch

from ossbatch.kernels.attention import attention_torch, attention_triton

KV_LEN = [40, 23, 9, 0]  # rows of different lengths; the last row is empty (a finished slot)
CACHE = 40


def make_inputs(q_len, q_heads, kv_heads, head_dim, dtype, device, garbage_padding=False):
    torch.manual_seed(0)
    batch = len(KV_LEN)
    kv_len = torch.tensor(KV_LEN, device=device)
    # Each row's q_len newest tokens; row 2 has only 3 new ones, the rest of its
    # query slots are padding past kv_len (their outputs are discarded but must stay finite).
    positions = kv_len[:, None] - q_len + torch.arange(q_len, device=device)[None, :]
    positions[2] = KV_LEN[2] - 3 + torch.arange(q_len, device=device)
    positions = positions.clamp(min=0)
    q = torch.randn(batch, q_len, q_heads, head_dim, device=device)
    k_cache = torch.randn(batch, CACHE, kv_heads, head_dim, device=device)
    v_cache = torch.randn(batch, CACHE, kv_heads, head_dim, device=device)
    for row, length in enumerate(KV_LEN):
        fill = 1e4 if garbage_padding else 0.0  # never attended, so any value must give the same output
        k_cache[row, length:] = fill
        v_cache[row, length:] = fill
    sinks = torch.randn(q_heads, device=device)
    return q.to(dtype), k_cache.to(dtype), v_cache.to(dtype), sinks, positions, kv_len


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5, 100], ids=["full", "window_shorter", "window_longer"])
@pytest.mark.parametrize("q_len", [1, 7], ids=["decode", "prefill"])
def test_attention_matches_reference(q_len, window, dtype, device, assert_matches, assert_as_accurate):
    args = make_inputs(q_len, q_heads=8, kv_heads=2, head_dim=16, dtype=dtype, device=device)
    out = attention_triton(*args, window, 0.25)
    reference = attention_torch(*args, window, 0.25)
    assert_matches(out, reference)
    if dtype == torch.bfloat16:
        q, k_cache, v_cache, *rest = args
        assert_as_accurate(out, reference, attention_torch(q.float(), k_cache.float(), v_cache.float(), *rest, window, 0.25))
    assert out[3].abs().max() == 0, "a row with no keys attends only to the sink: output 0"


@pytest.mark.parametrize("q_len", [1, 70], ids=["decode", "prefill_many_tiles"])
def test_attention_gpt_oss_head_shape(q_len, device, assert_matches):
    # 64 dims, 8 query heads per kv head as in gpt-oss; prefill spans several query and key blocks.
    global KV_LEN, CACHE
    saved = KV_LEN, CACHE
    KV_LEN, CACHE = [130, 75, 9, 0], 130
    try:
        args = make_inputs(q_len, q_heads=16, kv_heads=2, head_dim=64, dtype=torch.float32, device=device)
        for window in (0, 128):
            assert_matches(attention_triton(*args, window, 0.125), attention_torch(*args, window, 0.125))
    finally:
        KV_LEN, CACHE = saved


def test_attention_never_reads_padding(device):
    clean = make_inputs(7, 4, 4, 16, torch.float32, device)
    dirty = make_inputs(7, 4, 4, 16, torch.float32, device, garbage_padding=True)
    assert torch.equal(attention_triton(*clean, 0, 0.25), attention_triton(*dirty, 0, 0.25))


def test_attention_sinks_are_in_the_denominator(device):
    q, k_cache, v_cache, sinks, positions, kv_len = make_inputs(1, 8, 2, 16, torch.float32, device)
    base = attention_triton(q, k_cache, v_cache, sinks, positions, kv_len, 0, 0.25)
    drowned = attention_triton(q, k_cache, v_cache, sinks + 30, positions, kv_len, 0, 0.25)
    assert drowned.abs().max() < 1e-6 < base.abs().max()
