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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [0, 5], ids=["full", "window"])
@pytest.mark.parametrize("q_len", [1, 7], ids=["decode", "prefill"])
def test_attention_lse_matches_reference(q_len, window, dtype, device, assert_matches):
    args = make_inputs(q_len, q_heads=8, kv_heads=2, head_dim=16, dtype=dtype, device=device)
    out, lse = attention_triton(*args, window, 0.25, return_lse=True)
    ref_out, ref_lse = attention_torch(*args, window, 0.25, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == args[0].shape[:3]
    assert torch.equal(out, attention_triton(*args, window, 0.25)), "return_lse must not change the output"
    assert_matches(out, ref_out)
    # The sink is in the denominator: the row with no keys has lse == its head's sink.
    sinks = args[3]
    assert torch.allclose(lse[3], sinks.expand_as(lse[3]), atol=1e-6)
    assert (lse - ref_lse).abs().max().item() <= (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_kv_decode_matches_reference(splits, dtype, device, assert_matches):
    from ossbatch.kernels.configs import AttentionConfig

    config = AttentionConfig(block_m=16, block_n=16, num_warps=4, num_stages=2, num_splits=splits)
    args = make_inputs(1, q_heads=8, kv_heads=2, head_dim=16, dtype=dtype, device=device)
    for window in (0, 5):
        out, lse = attention_triton(*args, window, 0.25, return_lse=True, config=config)
        ref_out, ref_lse = attention_torch(*args, window, 0.25, return_lse=True)
        assert_matches(out, ref_out)
        assert (lse - ref_lse).abs().max().item() <= (1e-4 if dtype == torch.float32 else 2e-2)
        assert out[3].abs().max() == 0


def test_cascade_merge_over_a_shared_prefix_equals_full_attention(device, assert_matches):
    """Keys [0, 16) (a shared prefix) and [16, kv_len) attended apart, the sink given to one part only,
    then merged by their log-sum-exps: the same as attending over all keys at once."""
    from ossbatch.kernels.attention import merge_attention

    q, k_cache, v_cache, sinks, positions, kv_len = make_inputs(1, 8, 2, 16, torch.float32, device)
    prefix = 16
    full = attention_triton(q, k_cache, v_cache, sinks, positions, kv_len, 0, 0.25)
    # Prefix part: the first 16 keys, every row sees all of them (kv_len capped at the prefix).
    prefix_out, prefix_lse = attention_triton(q, k_cache, v_cache, sinks, positions, kv_len.clamp(max=prefix), 0, 0.25,
                                              return_lse=True)
    # Suffix part: the cache from position 16 on, positions shifted to match; no sink here.
    no_sink = torch.full_like(sinks, float("-inf"))
    suffix_out, suffix_lse = attention_triton(q, k_cache[:, prefix:], v_cache[:, prefix:], no_sink,
                                              (positions - prefix).clamp(min=-1), (kv_len - prefix).clamp(min=0), 0, 0.25,
                                              return_lse=True)
    merged, _ = merge_attention(torch.stack([prefix_out, suffix_out]), torch.stack([prefix_lse, suffix_lse]))
    assert_matches(merged, full)
    _, ref_lse = attention_torch(q, k_cache, v_cache, sinks, positions, kv_len, 0, 0.25, return_lse=True)
    _, merged_lse = merge_attention(torch.stack([prefix_out, suffix_out]), torch.stack([prefix_lse, suffix_lse]))
    assert torch.allclose(merged_lse, ref_lse, atol=1e-4)
