"""The roofline arithmetic in benchmarks/kernel_roofline.py (no kernels run)."""

import importlib.util
from pathlib import Path

import pytest

from ossbatch.engine.config import GPT_OSS_120B
from ossbatch.engine.memory_plan import expert_bytes

_path = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_roofline.py"
_spec = importlib.util.spec_from_file_location("benchmark_kernels", _path)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_expert_hits_follow_uniform_routing():
    assert bench.experts_hit(GPT_OSS_120B, 1) == pytest.approx(4)
    assert 127.9 < bench.experts_hit(GPT_OSS_120B, 256) < 128


def test_moe_decode_at_batch_1_reads_four_experts():
    moe = next(r for r in bench.kernel_rows(GPT_OSS_120B, 1, 4096) if r.kernel.startswith("moe"))
    assert expert_bytes(GPT_OSS_120B) == 5760 * 90 * 17 + 2880 * 90 * 17 + (5760 + 2880) * 2
    assert 4 * expert_bytes(GPT_OSS_120B) < moe.bytes < 4 * expert_bytes(GPT_OSS_120B) * 1.01
    assert moe.bound == "memory"


def test_decode_step_at_batch_256_is_bandwidth_bound():
    est = bench.decode_step_estimate(GPT_OSS_120B, 256, 1024)
    # Nearly every expert of every layer is read: ~61 GB of the ~65 GB checkpoint, plus KV.
    assert 70e9 < est["total_bytes"] < 85e9
    assert est["step_s"] == pytest.approx(est["total_bytes"] / bench.HBM_BYTES_PER_S)
    longer = bench.decode_step_estimate(GPT_OSS_120B, 256, 4096)
    assert longer["total_bytes"] - est["total_bytes"] == pytest.approx(18 * 256 * 3072 * 2 * 8 * 64 * 2)


def test_roofline_only_prints_the_table(capsys):
    bench.main(["--roofline-only", "--batches", "1,256"])
    out = capsys.readouterr().out
    assert "| moe (MXFP4 experts)" in out and "decode step, batch 256" in out
