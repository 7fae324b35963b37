"""Cascade attention: attention over a prefix block and over the rows' own keys,
merged by log-sum-exp, equals attention over the concatenated keys, the sink
counted once; the Triton merge equals its torch reference."""

import importlib
import sys

import pytest
import torch

import ossbatch.kernels.cascade

# Engine tests may have imported kernels/ compiled before tests/kernels/conftest.py chose the interpreter.
cascade = importlib.reload(sys.modules["ossbatch.kernels.cascade"])
from ossbatch.kernels.attention import attention_torch  # noqa: E402


def attention_lse(*args):
    """Attention with its log-sum-exp: the pass cascade attention runs twice."""
    return attention_torch(*args, return_lse=True)


def _inputs(q_len: int, prefix_len: int, own_len: list[int], dtype=torch.float32, heads=(8, 2), head_dim=16):
    gen = torch.Generator().manual_seed(q_len * 100 + prefix_len)
    q_heads, kv_heads = heads
    batch, span = len(own_len), max(own_len)
    q = torch.randn(batch, q_len, q_heads, head_dim, generator=gen).to(dtype)
    prefix_k, prefix_v = (torch.randn(prefix_len, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    own_k, own_v = (torch.randn(batch, span, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(2))
    sinks = torch.randn(q_heads, generator=gen)
    # Each row's q_len newest tokens, in its own cache's index space.
    own_positions = torch.tensor(own_len)[:, None] - q_len + torch.arange(q_len)[None, :]
    return q, prefix_k, prefix_v, own_k, own_v, sinks, own_positions.clamp(min=0), torch.tensor(own_len)


def _concatenated(q, prefix_k, prefix_v, own_k, own_v, sinks, own_positions, own_len, window):
    """What a row holding its own copy of the prefix computes: one attention over prefix + own keys."""
    batch, prefix_len = q.shape[0], prefix_k.shape[0]
    k = torch.cat([prefix_k.expand(batch, -1, -1, -1), own_k], dim=1)
    v = torch.cat([prefix_v.expand(batch, -1, -1, -1), own_v], dim=1)
    return attention_torch(q, k, v, sinks, own_positions + prefix_len, own_len + prefix_len, window, 0.25)


def _cascade(q, prefix_k, prefix_v, own_k, own_v, sinks, own_positions, own_len, window, merge):
    batch, q_len, q_heads, head_dim = q.shape
    prefix_len = prefix_k.shape[0]
    own, own_lse = attention_lse(q, own_k, own_v, sinks, own_positions, own_len, window, 0.25)
    # Every row's queries in one prefix pass: the block is read once for all of them.
    folded = q.reshape(1, batch * q_len, q_heads, head_dim)
    shared, shared_lse = attention_lse(
        folded, prefix_k[None], prefix_v[None], torch.full_like(sinks, cascade.NO_SINK),
        (own_positions + prefix_len).reshape(1, -1), torch.tensor([prefix_len]), window, 0.25)
    flat = lambda t: t.reshape(batch * q_len, *t.shape[2:])  # noqa: E731
    out = merge(flat(own), flat(own_lse), flat(shared), flat(shared_lse))
    return out.reshape(batch, q_len, q_heads, head_dim)


@pytest.mark.parametrize("window", [0, 4, 100], ids=["full", "window_inside_own_keys", "window_longer"])
@pytest.mark.parametrize("q_len", [1, 5], ids=["decode", "prefill"])
def test_cascade_equals_attention_over_concatenated_keys(q_len, window):
    args = _inputs(q_len, prefix_len=11, own_len=[9, 5, 6])
    expected = _concatenated(*args, window)
    torch.testing.assert_close(_cascade(*args, window, cascade.merge_attention_torch), expected, rtol=1e-5, atol=1e-6)


def test_sink_counted_once():
    """With the prefix pass given the sink too, the merge would count it twice and the output shrink."""
    args = _inputs(1, prefix_len=7, own_len=[4, 3])
    q, prefix_k, prefix_v, own_k, own_v, sinks, own_positions, own_len = args
    own, own_lse = attention_lse(q, own_k, own_v, sinks, own_positions, own_len, 0, 0.25)
    twice, twice_lse = attention_lse(q, prefix_k[None].expand(2, -1, -1, -1), prefix_v[None].expand(2, -1, -1, -1),
                                                   sinks, own_positions + 7, torch.tensor([7, 7]), 0, 0.25)
    wrong = cascade.merge_attention_torch(own[:, 0], own_lse[:, 0], twice[:, 0], twice_lse[:, 0])
    expected = _concatenated(*args, 0)[:, 0]
    assert (wrong - expected).abs().max() > 1e-3
    torch.testing.assert_close(_cascade(*args, 0, cascade.merge_attention_torch)[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_query_that_sees_no_prefix_key():
    """A windowed layer far past the prefix: the prefix pass is empty (output 0, weight 0), not NaN."""
    args = _inputs(1, prefix_len=5, own_len=[12, 9])
    out = _cascade(*args, 3, cascade.merge_attention_torch)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, _concatenated(*args, 3), rtol=1e-5, atol=1e-6)


def test_attention_lse_matches_reference_output():
    args = _inputs(3, prefix_len=4, own_len=[6, 3, 5])
    q, _, _, own_k, own_v, sinks, positions, own_len = args
    for window in (0, 2):
        out, lse = attention_lse(q, own_k, own_v, sinks, positions, own_len, window, 0.25)
        torch.testing.assert_close(out, attention_torch(q, own_k, own_v, sinks, positions, own_len, window, 0.25), rtol=1e-5, atol=1e-6)
        assert lse.shape == q.shape[:3] and torch.isfinite(lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_triton_matches_torch(dtype, device, assert_matches):
    gen = torch.Generator().manual_seed(7)
    tokens, heads, head_dim = 13, 6, 24  # neither a power of two: masked lanes
    out_a, out_b = (torch.randn(tokens, heads, head_dim, generator=gen).to(dtype).to(device) for _ in range(2))
    lse_a, lse_b = (3 * torch.randn(tokens, heads, generator=gen).to(device) for _ in range(2))
    lse_b[0] = cascade.NO_SINK  # a query that saw no key in one part
    merged = cascade.merge_attention_triton(out_a, lse_a, out_b, lse_b)
    assert_matches(merged, cascade.merge_attention_torch(out_a, lse_a, out_b, lse_b))
    torch.testing.assert_close(merged[0], out_a[0])
