"""The host-memory plumbing the --memory-budget rests on (engine/host_memory.py, engine/expert_cache.py)."""

import torch

from ossbatch.engine import host_memory
from ossbatch.engine.expert_cache import ExpertCache
from ossbatch.engine.model import Transformer
from ossbatch.engine.tiny_model import TINY, write_random_checkpoint
from ossbatch.engine.weights import RowBlocks, linear

MIB = 1 << 20


def test_process_memory_reads_this_process():
    before = host_memory.process_memory()
    assert before["rss"] > 0 and before["anonymous"] > 0 and before["file"] > 0
    block = torch.ones(64 * MIB // 4)  # 64 MiB, touched
    after = host_memory.process_memory()
    assert after["anonymous"] - before["anonymous"] >= 60 * MIB
    del block


def test_machine_memory_is_bounded_by_the_cgroup_limit(monkeypatch):
    total = host_memory.meminfo()["MemTotal"]
    assert host_memory.machine_memory() <= total
    monkeypatch.setattr(host_memory, "cgroup_memory_limit", lambda: 3 << 30)
    assert host_memory.machine_memory() == min(total, 3 << 30)
    assert host_memory.default_memory_budget(1 << 30) <= (3 << 30) - (1 << 30)
    assert host_memory.default_memory_budget(4 << 30) == 0  # the mapping alone fills the limit


def test_blocks_made_among_mapped_allocations_go_back_to_the_kernel_when_freed():
    assert host_memory.release_large_allocations()
    before = host_memory.process_memory()["anonymous"]
    with host_memory.mapped_allocations():
        blocks = [torch.ones(3 * MIB // 4) for _ in range(40)]  # 120 MiB in 3 MiB blocks
    del blocks[::2]  # interleaved frees: from the heap, none of it could be given back
    held = host_memory.process_memory()["anonymous"]
    assert held - before < 70 * MIB
    del blocks
    assert host_memory.process_memory()["anonymous"] - before < 16 * MIB


def test_expert_cache_resize_evicts_least_recently_used():
    cache = ExpertCache(3 * MIB)
    for key in range(3):
        cache.get(key, lambda: (torch.empty(MIB, dtype=torch.uint8),))
    cache.get(0, lambda: None)  # a hit: 0 is now the most recent
    assert (cache.used_bytes, cache.hits, cache.misses) == (3 * MIB, 1, 3)
    cache.resize(MIB)
    assert cache.used_bytes == MIB and cache.get(0, lambda: None) is not None  # 1 and 2 went
    assert cache.peak_bytes == 3 * MIB
    cache.resize(0)
    assert cache.used_bytes == 0
    kept = cache.get(5, lambda: (torch.empty(MIB, dtype=torch.uint8),))
    assert kept is not None and cache.used_bytes == 0  # a budget of 0 keeps nothing


def test_bf16_weights_are_used_in_place_from_the_mapping(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", TINY)
    bf16 = Transformer.from_checkpoint(path, torch.bfloat16)
    f32 = Transformer.from_checkpoint(path, torch.float32)
    c = TINY
    qkv_bias = c.num_hidden_layers * (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim * 2
    sinks = c.num_hidden_layers * c.num_attention_heads * 4
    assert bf16.weights.host_bytes()["copied"] == qkv_bias + sinks  # q/k/v biases fused, sinks in float32: the only copies
    layer = bf16.weights.layers[0]
    assert isinstance(layer.qkv_weight, RowBlocks) and layer.qkv_weight.shape == (layer.qkv_bias.shape[0], c.hidden_size)
    assert not isinstance(f32.weights.layers[0].qkv_weight, RowBlocks)  # converted anyway: fused in the copy
    # q, k and v used apart give what the fused matrix gives.
    x = torch.randn(5, c.hidden_size, dtype=torch.bfloat16)
    fused = torch.cat(layer.qkv_weight.parts)
    torch.testing.assert_close(linear(x, layer.qkv_weight, layer.qkv_bias), torch.addmm(layer.qkv_bias, x, fused.t()))
    assert f32.weights.host_bytes()["copied"] > 2 * c.vocab_size * c.hidden_size * 4 // 2  # float32 copies of the bf16 file
    assert sum(f32.weights.host_bytes().values()) > sum(bf16.weights.host_bytes().values())  # the copies are float32
    report = bf16.memory_report()
    assert report["weights_mapped"] == bf16.weights.host_bytes()["mapped"] > c.vocab_size * c.hidden_size * 2
    assert report["process_anonymous"] > 0 and report["kv_cache"] == 0  # nothing generated yet
