"""Shared set-up for the benchmark scripts: the benchmark model and prompts."""

import os
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
_shared = ROOT.parent / "shared" / "tiktoken"
if (_shared / "o200k_base.tiktoken").exists():
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(_shared))

from ossbatch.engine.tiny_model import preset_config, write_random_checkpoint  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"

# The issues' benchmark model: 4 layers, 32 experts (top-4), hidden 512, full vocabulary.
BENCH_SHAPE = dict(
    num_hidden_layers=4, num_local_experts=32, num_experts_per_tok=4, hidden_size=512, intermediate_size=512,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64, sliding_window=128,
)

_WORDS = ("batch token model expert router shard bucket prompt answer schema label nightly parquet "
          "reason final analysis kernel cache window sink layer norm rotary scale vector matrix").split()


def bench_model_dir() -> Path:
    path = CACHE / "bench-4L-32E-512"
    if not (path / "config.json").exists():
        write_random_checkpoint(path, preset_config("tiny", **BENCH_SHAPE), seed=0)
    return path


def prompts_text(count: int = 32, low: int = 20, high: int = 200, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high))) for _ in range(count)]


def rendered_prompts(count: int = 32, seed: int = 0) -> list[list[int]]:
    from ossbatch.pipeline.render import render_prompt

    return [render_prompt([{"role": "user", "content": text}]) for text in prompts_text(count, seed=seed)]


def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def matmul_peak_gflops(n: int = 2048, repeats: int = 10, onednn_precision: str = "ieee") -> float:
    """float32 `torch.mm` at n^3; with onednn_precision="bf16", oneDNN's bf16 fpmath mode (what
    `--fp32-matmul auto` picks when its probe shows float32-level error)."""
    import time

    import torch

    from ossbatch.engine.precision import onednn_fp32_precision

    a, b = torch.randn(n, n), torch.randn(n, n)
    with onednn_fp32_precision(onednn_precision):
        torch.mm(a, b)
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9
