"""gpt-oss-120b on one H100, on paper: a roofline model of the ShareGPT-like
mix behind vLLM's published 2,901 output tokens/s, for our static batches
(rows leave when they finish, no refill) and with freed KV slots refilled from
the queue, as `generate(..., slots=N)` now does (it refills once an eighth of the
slots are free, so its batch averages ~15/16 full; this model assumes full).

    python benchmarks/roofline_120b.py [--requests 1000] [--seed 0]

Assumptions, stated so they can be argued with:
- ShareGPT-like lengths: prompts lognormal (median 120, sigma 1.0, capped 4096),
  outputs lognormal (median 130, sigma 1.0, capped 4096) -- means ~200 / ~215 tokens.
- A decode step's time is its roofline (benchmarks/kernel_roofline.py decode_step_estimate):
  max(bytes / 3.35 TB/s, FLOPs / 990 TFLOP/s) over every weight and KV byte it must read.
- Prefill is compute-bound at 50% of the bf16 peak.
- "compiled configs": the same, but expert and KV bytes stream only at the bandwidth share the
  compiled sm_90 kernels keep in flight (CTAs per SM x tile bytes, against bandwidth x 800 ns
  latency), and MoE FLOPs count whole MMAs; from `benchmarks/gpu_compile.py`'s table.json
  (--compiled; by default compiled into benchmarks/.cache/gpu_compile on first use, ~20 s).
- Static batch: rows sorted by prompt length, `batch` rows at a time; the batch
  decodes until its longest answer ends, and each step costs the roofline of its
  live rows (fewer rows read fewer experts, but attention/lm_head weights are read
  regardless).  Refill: a freed slot takes the next row at once, so every step
  runs `batch` rows.
"""

import argparse
import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[0:0] = [str(ROOT)]

from ossbatch.engine.config import GPT_OSS_120B  # noqa: E402
from ossbatch.kernels import configs  # noqa: E402

_spec = importlib.util.spec_from_file_location("kernel_bench", ROOT / "benchmarks" / "kernel_roofline.py")
kernel_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_bench)

VLLM_OUTPUT_TOKENS_PER_S = 2901
PREFILL_MFU = 0.5
ACTIVE_PARAMS = 5.13e9  # per token: attention, router, 4 of 128 experts, lm_head


def lengths(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(min(4096, max(4, int(rng.lognormvariate(4.8, 1.0)))), min(4096, max(1, int(rng.lognormvariate(4.87, 1.0)))))
            for _ in range(n)]


DEFAULT_COMPILED = ROOT / "benchmarks" / ".cache" / "gpu_compile" / "table.json"


def load_compiled(path: Path) -> dict:
    """{decode bucket: {kernel: row}} for gpt-oss-120b on sm_90 from gpu_compile.py's table.json,
    each row with its `bandwidth_share`; compiled first when `path` is the default and missing."""
    if not path.exists():
        if path != DEFAULT_COMPILED:
            raise SystemExit(f"--compiled {path}: no such table.json (write one with benchmarks/gpu_compile.py)")
        print(f"compiling the sm_90 kernels into {path.parent} (once) ...", file=sys.stderr)
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_compile.py"), "--arch", "sm_90", "--models", "120b",
                               "--kernels", "moe,attention", "--shapes", "decode", "--out", str(path.parent)],
                              capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"gpu_compile.py failed:\n{done.stderr[-3000:]}")
    by_bucket: dict = {}
    for row in json.loads(path.read_text())["rows"]:
        if row["arch"] != "sm_90" or not row["shape"].startswith("120b.decode") or "error" in row:
            continue
        if row["kernel"] == "attention" and not row["shape"].endswith(".ctx4k.full"):
            continue
        bucket = row["shape"].split(".")[1]
        row = dict(row, bandwidth_share=kernel_bench.bandwidth_share(row["kernel"], row["config"], row["ctas_per_sm"]))
        by_bucket.setdefault(bucket, {})[row["kernel"]] = row
    return by_bucket


def step_time(live: int, context: int, cache: dict, compiled: dict | None = None) -> float:
    """One decode step's roofline; with `compiled` (load_compiled), limited by the compiled configurations."""
    key = (live, context // 64, compiled is not None)
    if key not in cache:
        context = max(64, context // 64 * 64)
        if compiled is None:
            cache[key] = kernel_bench.decode_step_estimate(GPT_OSS_120B, live, context)["step_s"]
        else:
            rows = compiled[configs.bucket(live)]
            cache[key] = kernel_bench.compiled_decode_step(GPT_OSS_120B, live, context, rows)["step_s"]
    return cache[key]


def prefill_seconds(tokens: int) -> float:
    return 2 * ACTIVE_PARAMS * tokens / (kernel_bench.BF16_FLOPS * PREFILL_MFU)


def static_batches(mix, batch: int, cache: dict, compiled: dict | None = None) -> float:
    """Output tokens/s with static batches that drop finished rows."""
    rows = sorted(mix)
    seconds = outputs = 0.0
    for start in range(0, len(rows), batch):
        group = rows[start : start + batch]
        seconds += prefill_seconds(sum(p for p, _ in group))
        prompt = max(p for p, _ in group)
        answers = sorted(o for _, o in group)
        done = 0
        for step in range(answers[-1]):
            while answers[done] <= step:
                done += 1
            seconds += step_time(len(group) - done, prompt + step, cache, compiled)
        outputs += sum(answers)
    return outputs / seconds


def refill(mix, batch: int, cache: dict, compiled: dict | None = None) -> float:
    """Output tokens/s when a finished row's slot is refilled at once."""
    mean_context = sum(p + o / 2 for p, o in mix) / len(mix)
    outputs = sum(o for _, o in mix)
    decode = outputs / batch * step_time(batch, int(mean_context), cache, compiled)
    return outputs / (decode + prefill_seconds(sum(p for p, _ in mix)))


def shared_prefix_case(prefix: int = 1500, item: int = 300, output: int = 500, gpu_bytes: int = 80 * 10**9) -> list[str]:
    """Issue 11's labeling job on paper: rows behind one `prefix`-token developer message, each with an
    `item`-token item and `output` generated tokens. Rows that fit come from engine/memory_plan.py
    (windowed layers as the engine stores them, by position, and as a ring buffer would); every slot
    is kept full by refill. Without sharing, each row prefills and holds the prefix and each decode
    step reads every row's copy; with it, the prefix is prefilled once, held once and read once a step
    (cascade attention), its KV bytes added to the step's roofline."""
    from ossbatch.engine.memory_plan import plan_memory

    cache: dict = {}
    context = prefix + item + output
    kv_token = 2 * GPT_OSS_120B.num_key_value_heads * GPT_OSS_120B.head_dim * 2
    full = sum(1 for layer in range(GPT_OSS_120B.num_hidden_layers) if not GPT_OSS_120B.window(layer))
    lines = [f"shared prefix: {prefix}-token developer message, {item}-token items, {output} output tokens, "
             f"{gpu_bytes / 1e9:.0f} GB H100; refill keeps every slot full"]
    lines.append(f"{'windowed layers':>15} | {'prefixes':>10} | {'rows fit':>8} | {'step ms':>7} | {'output tok/s':>12} | {'vs vLLM':>7}")
    for ring in (False, True):
        plan = plan_memory(GPT_OSS_120B, gpu_bytes, context, ring_buffer_windowed_layers=ring, shared_prefix_tokens=prefix)
        for shared in (False, True):
            rows = plan.max_batch if shared else plan.max_batch_unshared
            if shared:  # each row's own tokens, mid-answer; the prefix read once per step on the full layers
                step = step_time(rows, item + output // 2, cache) + full * prefix * kv_token / kernel_bench.HBM_BYTES_PER_S
                prefill = prefill_seconds(prefix) / rows + prefill_seconds(item)  # per row
            else:
                step = step_time(rows, prefix + item + output // 2, cache)
                prefill = prefill_seconds(prefix + item)
            per_row = prefill + output * step / rows
            rate = output / per_row
            lines.append(f"{'ring buffer' if ring else 'by position':>15} | {'shared' if shared else 'not shared':>10} | {rows:>8} | "
                         f"{step * 1e3:>7.2f} | {rate:>12,.0f} | {rate / VLLM_OUTPUT_TOKENS_PER_S:>6.2f}x")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compiled", type=Path, default=DEFAULT_COMPILED, help="gpu_compile.py's table.json (sm_90, 120b)")
    args = parser.parse_args()
    mix = lengths(args.requests, args.seed)
    compiled = load_compiled(args.compiled)
    cache: dict = {}
    print(f"{args.requests} requests, mean prompt {sum(p for p, _ in mix) / len(mix):.0f}, "
          f"mean output {sum(o for _, o in mix) / len(mix):.0f} tokens; H100 roofline; vLLM published {VLLM_OUTPUT_TOKENS_PER_S} output tok/s")
    print_compiled_limits(compiled)
    header = f"{'batch':>5} | {'static (drop finished)':>22} | {'vs vLLM':>7} | {'refill slots':>13} | {'vs vLLM':>7} | {'refill, compiled configs':>24} | {'vs vLLM':>7}"
    print(header)
    for batch in (32, 64, 128, 256):
        s, r = static_batches(mix, batch, cache), refill(mix, batch, cache)
        c = refill(mix, batch, cache, compiled)
        print(f"{batch:>5} | {s:>18,.0f} tok/s | {s / VLLM_OUTPUT_TOKENS_PER_S:>6.2f}x | {r:>9,.0f} tok/s | {r / VLLM_OUTPUT_TOKENS_PER_S:>6.2f}x"
              f" | {c:>20,.0f} tok/s | {c / VLLM_OUTPUT_TOKENS_PER_S:>6.2f}x")
    print()
    print("\n".join(shared_prefix_case()))


def print_compiled_limits(compiled: dict) -> None:
    print("compiled sm_90 configurations per decode bucket (share of HBM peak kept in flight; MoE MMA rows used):")
    for bucket, rows in sorted(compiled.items(), key=lambda item: int(item[0][len("decode"):])):
        moe, attention = rows["moe_up_swiglu"], rows["attention"]
        print(f"  {bucket:>9}: moe {moe['config']} {moe['ctas_per_sm']} CTAs/SM -> {100 * moe['bandwidth_share']:.0f}% of HBM, "
              f"MMA rows {100 * (moe['mma_useful_share'] or 1):.0f}% used; attention {attention['config']} "
              f"{attention['ctas_per_sm']} CTAs/SM -> {100 * attention['bandwidth_share']:.0f}%")


if __name__ == "__main__":
    main()
