"""The kernels compiled for a real GPU (sm_90, H100/H200) at every launch configuration the
engine would use at gpt-oss shapes: no GPU needed, triton's wheel ships ptxas and cuobjdump.

The compile runs once per session, in a subprocess (the tests' own process has the kernels
decorated for the interpreter), through benchmarks/gpu_compile.py into a session tmp dir;
triton's own cache keeps repeat sessions fast.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ossbatch.kernels import configs

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_compile.py"


def run_compile(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="0")
    return subprocess.run([sys.executable, str(SCRIPT), "--arch", "sm_90", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=1800)


@pytest.fixture(scope="session")
def compiled(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("cubins")
    result = run_compile(out, "--kernels", "rmsnorm,route,moe,attention")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "table.json").read_text())["rows"]


def test_every_launch_compiles_for_sm_90(compiled):
    errors = [f"{r['kernel']} {r['shape']} {r['config']}: {r['error']}" for r in compiled if "error" in r]
    assert not errors, "\n".join(errors)
    assert all(r["registers"] > 0 and Path(r["cubin"]).suffix == ".cubin" for r in compiled)
    assert {r["kernel"] for r in compiled} == {"rmsnorm", "route", "moe_up_swiglu", "moe_down_scatter", "attention"}


def test_every_configuration_in_the_table_is_compiled(compiled):
    seen = {r["config"] for r in compiled}
    table = [c.name for c in configs.MOE_BY_ROWS_PER_EXPERT.values()] + [configs.RMSNORM.name, configs.ROUTE.name]
    table += [c.name for c in configs.ATTENTION_BY_BUCKET.values()]
    # Attention's split count is capped by the keys a shape has, so compare without it.
    strip = lambda name: name.split("split")[0]
    assert {strip(name) for name in table} <= {strip(name) for name in seen}, sorted(set(map(strip, table)) - set(map(strip, seen)))


def test_no_configuration_spills_or_misfits_at_real_shapes(compiled):
    bad = [f"{r['kernel']} {r['shape']} {r['config']}: {r['spill_bytes']} B spilled, {r['ctas_per_sm']} CTAs/SM"
           for r in compiled if r["spill_bytes"] or r["spill_instructions"] or not r["ctas_per_sm"]]
    assert not bad, "\n".join(bad)


def test_moe_and_attention_use_tensor_cores(compiled):
    for r in compiled:
        if r["kernel"].startswith(("moe", "attention")):
            assert r["mma"] in ("HGMMA", "HMMA"), f"{r['kernel']} {r['shape']}: {r['mma']}"
            if ".prefill" in r["shape"]:
                assert r["mma"] == "HGMMA", f"{r['kernel']} {r['shape']} prefill tile is not a wgmma: {r['mma']}"


def test_decode_moe_issues_no_64_row_mma_for_a_few_rows(compiled):
    for r in compiled:
        if r["kernel"].startswith("moe") and ".decode" in r["shape"]:
            assert r["mma_token_rows"] <= 32, f"{r['shape']} {r['config']}: {r['mma_token_rows']} MMA rows for tokens"
            assert "swap" in r["config"]


def test_a_bad_configuration_is_caught(tmp_path):
    # 128 x 128 tiles at 4 warps: the accumulator alone is 128 float32 registers a thread.
    result = run_compile(tmp_path, "--models", "120b", "--kernels", "moe_down", "--shapes", "prefill",
                         "--moe-config", "m128n128k128w4s4", "--check")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "moe_down_scatter 120b.prefill m128n128k128w4s4 sm_90: spills" in result.stderr
