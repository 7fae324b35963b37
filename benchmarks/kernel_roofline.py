"""Per-kernel time at gpt-oss-120b shapes, beside the H100 roofline.

    python benchmarks/kernel_roofline.py                  # time the kernels: Triton on a GPU, the torch reference on a CPU
    python benchmarks/kernel_roofline.py --roofline-only  # only the roofline arithmetic (instant, no torch import)

Each row is one decode step's worth of one kernel for one layer: `batch`
sequences, one new token each.  Bytes are the least a kernel must move (weights
read once, activations in and out, the KV it attends over); FLOPs are the
matmul multiply-adds x 2.  The roofline time is max(bytes / 3.35 TB/s,
FLOPs / 990 TFLOP/s), the H100 SXM's HBM3 bandwidth and dense bf16 peak.
MoE rows assume uniform routing, so a layer reads E * (1 - (1 - k/E)**batch)
experts on average.  The script ends with a roofline estimate of a whole
gpt-oss-120b decode step.
"""

import argparse
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

# Run as a script, sys.path[0] is benchmarks/, where this file would shadow the `kernels` package.
_REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(_REPO)

from ossbatch.engine.config import GPT_OSS_120B, ModelConfig  # noqa: E402
from ossbatch.engine.memory_plan import GIB, expert_bytes, plan_memory, weight_bytes_by_part  # noqa: E402

HBM_BYTES_PER_S = 3.35e12  # H100 SXM, HBM3
BF16_FLOPS = 990e12  # H100 SXM, dense bf16 tensor cores
BATCHES = (1, 8, 64, 256, 512)
BF16 = 2


@dataclass
class Row:
    kernel: str
    batch: int
    bytes: float
    flops: float
    run: Optional[Callable] = None  # builds inputs, returns a zero-argument callable to time

    @property
    def roofline_s(self) -> float:
        return max(self.bytes / HBM_BYTES_PER_S, self.flops / BF16_FLOPS)

    @property
    def bound(self) -> str:
        return "memory" if self.bytes / HBM_BYTES_PER_S >= self.flops / BF16_FLOPS else "compute"


def experts_hit(config: ModelConfig, batch: int) -> float:
    e, k = config.num_local_experts, config.num_experts_per_tok
    return e * (1 - (1 - k / e) ** batch)


def kernel_rows(config: ModelConfig, batch: int, context: int) -> list[Row]:
    h, i, e, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    moe_activations = batch * h * BF16 * 2 + batch * k * (i * BF16 * 2 + h * 4 * 2)  # x, out; SwiGLU and per-slot rows

    def attention(window: int) -> Row:
        span = min(context, window) if window else context
        name = f"attention ctx {context}" if not window else f"attention window {window}"
        return Row(name, batch, batch * span * 2 * hkv * d * BF16 + 2 * batch * hq * d * BF16, 4 * batch * hq * span * d)

    return [
        Row("rmsnorm", batch, 2 * batch * h * BF16 + h * BF16, 4 * batch * h),
        Row("route (top-4 of 128)", batch, batch * e * BF16 + batch * k * (4 + 8), batch * e * k),
        Row("moe (MXFP4 experts)", batch, experts_hit(config, batch) * expert_bytes(config) + moe_activations,
            2 * batch * k * (2 * i * h + h * i)),
        attention(0),
        attention(config.sliding_window),
    ]


def attention_roofline(config: ModelConfig, batch: int, q_len: int, context: int, window: int) -> Row:
    """`batch` sequences of `q_len` new tokens at `context`: the KV they see read once per
    (sequence, kv head), q and out; FLOPs over the keys each query sees (causal)."""
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    span = min(context, window + q_len - 1) if window else context
    seen = min(window, context) if window else context - (q_len - 1) / 2
    bytes_ = batch * span * 2 * hkv * d * BF16 + 2 * batch * q_len * hq * d * BF16
    name = f"attention window {window}" if window else f"attention ctx {context}"
    return Row(name, batch * q_len, bytes_, 4 * batch * q_len * hq * d * seen)


def decode_step_estimate(config: ModelConfig, batch: int, context: int) -> dict:
    """Bytes and FLOPs of one decode step of the whole model (every sequence at `context`)."""
    parts = weight_bytes_by_part(config)
    layers, hq, hkv, d = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim
    windowed = sum(1 for layer in range(layers) if config.window(layer))
    full = layers - windowed
    kv_token_layer = 2 * hkv * d * BF16
    hit = experts_hit(config, batch)
    bytes_ = {
        "attention weights + sinks (bf16)": parts["attention + sinks"],
        "router (bf16)": parts["router"],
        f"experts hit (MXFP4 + bf16 bias), {hit:.1f} of {config.num_local_experts} per layer": layers * hit * expert_bytes(config),
        "lm_head (bf16)": parts["lm_head"],
        "embedding rows + norms (bf16)": batch * config.hidden_size * BF16 + parts["norms"],
        f"KV reads, {full} full layers x {context} positions": full * batch * context * kv_token_layer,
        f"KV reads, {windowed} windowed layers x {min(context, config.sliding_window)} positions":
            windowed * batch * min(context, config.sliding_window) * kv_token_layer,
        "KV writes + activations (mostly MoE slot rows)": layers * batch * (kv_token_layer + 24 * config.hidden_size * BF16),
    }
    q_dim, kv_dim = hq * d, hkv * d
    attention_params = config.hidden_size * (q_dim + 2 * kv_dim) + q_dim * config.hidden_size
    active_expert_params = config.num_experts_per_tok * 3 * config.hidden_size * config.intermediate_size
    per_token_params = layers * (attention_params + config.hidden_size * config.num_local_experts + active_expert_params)
    per_token_params += config.vocab_size * config.hidden_size  # lm_head
    attended = full * context + windowed * min(context, config.sliding_window)
    flops = 2 * batch * per_token_params + 4 * batch * hq * d * attended
    total = sum(bytes_.values())
    step = max(total / HBM_BYTES_PER_S, flops / BF16_FLOPS)
    return {"bytes": bytes_, "total_bytes": total, "flops": flops, "step_s": step, "tokens_per_s": batch / step}


# ----------------------------------------------------------------------------- compiled configurations

# What a kernel can draw from HBM is bounded by the bytes it keeps in flight (Little's law):
# an SM must have bandwidth x latency / SMs in flight to stream at the peak.
HBM_LATENCY_S = 800e-9  # loaded DRAM latency assumed for an H100 (measured figures run 600-900 ns)
H100_SMS = 132


def _tile(config_name: str) -> dict:
    return {key: int(value) for key, value in re.findall(r"([mnkws])(\d+)", config_name.split("swap")[0].split("split")[0])}


def hbm_bytes_in_flight_per_cta(kernel: str, config_name: str, head_dim: int = 64) -> int:
    """HBM bytes one CTA has requested and not yet consumed, from its tile configuration.

    MoE: the weight tiles prefetched 1 or 2 ("p2") K blocks ahead (MXFP4 bytes + e8m0 scales); its
    activations are a few KB shared by every expert's CTAs, L2-resident.  Attention: K and V
    tiles of ``stages - 1`` blocks ahead (the pipeliner's cp.async stages).
    """
    tile = _tile(config_name)
    if kernel.startswith("moe"):
        prefetch = re.search(r"swapp(\d)|s\dp(\d)", config_name)
        depth = int(next(filter(None, prefetch.groups()))) if prefetch else 1
        return depth * (tile["n"] * tile["k"] // 2 + tile["n"] * tile["k"] // 32)
    if kernel.startswith("attention"):
        return 2 * tile["n"] * head_dim * BF16 * max(tile.get("s", 2) - 1, 1)
    raise KeyError(kernel)


def bandwidth_share(kernel: str, config_name: str, ctas_per_sm: int) -> float:
    """The share of peak HBM bandwidth the compiled configuration can keep in flight, at most 1."""
    needed = HBM_BYTES_PER_S * HBM_LATENCY_S / H100_SMS
    return min(1.0, ctas_per_sm * hbm_bytes_in_flight_per_cta(kernel, config_name) / needed)


def compiled_decode_step(config: ModelConfig, batch: int, context: int, compiled: dict) -> dict:
    """`decode_step_estimate` with the compiled configurations' limits: expert and KV bytes
    stream at the bandwidth share their kernels keep in flight (from CTAs per SM and tiles),
    and MoE FLOPs count whole MMAs (rows padded to the MMA's token side, `mma_useful_share`).

    `compiled`: {kernel: table.json row} for this batch's bucket, sm_90 (from gpu_compile.py).
    """
    base = decode_step_estimate(config, batch, context)
    layers = config.num_hidden_layers
    windowed = sum(1 for layer in range(layers) if config.window(layer))
    kv_token_layer = 2 * config.num_key_value_heads * config.head_dim * BF16
    expert_bytes_ = layers * experts_hit(config, batch) * expert_bytes(config)
    kv_bytes = batch * kv_token_layer * ((layers - windowed) * context + windowed * min(context, config.sliding_window))
    other = base["total_bytes"] - expert_bytes_ - kv_bytes
    # Up-projection reads 2/3 of an expert's bytes, down-projection 1/3.
    moe_share = (2 / 3 * compiled["moe_up_swiglu"]["bandwidth_share"] + 1 / 3 * compiled["moe_down_scatter"]["bandwidth_share"])
    attention_share = compiled["attention"]["bandwidth_share"]
    memory_s = (other + expert_bytes_ / moe_share + kv_bytes / attention_share) / HBM_BYTES_PER_S
    moe_flops = 2 * batch * config.num_experts_per_tok * 3 * config.hidden_size * config.intermediate_size * layers
    useful = compiled["moe_up_swiglu"].get("mma_useful_share") or 1.0
    flops = base["flops"] - moe_flops + moe_flops / useful
    step = max(memory_s, flops / BF16_FLOPS)
    return dict(base, step_s=step, tokens_per_s=batch / step, moe_bandwidth_share=moe_share,
                attention_bandwidth_share=attention_share, moe_mma_useful_share=useful)


# ----------------------------------------------------------------------------- timing


def _torch_inputs(config: ModelConfig, device: str):
    import torch

    gen = torch.Generator(device="cpu").manual_seed(0)
    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    groups_h, groups_i = math.ceil(h / 32), math.ceil(i / 32)

    def rand_bytes(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)

    experts = dict(
        w1_blocks=rand_bytes(e, 2 * i, groups_h, 16), w1_scales=torch.full((e, 2 * i, groups_h), 122, dtype=torch.uint8, device=device),
        b1=torch.zeros(e, 2 * i, dtype=torch.bfloat16, device=device),
        w2_blocks=rand_bytes(e, h, groups_i, 16), w2_scales=torch.full((e, h, groups_i), 122, dtype=torch.uint8, device=device),
        b2=torch.zeros(e, h, dtype=torch.bfloat16, device=device),
    )
    return torch, gen, experts


def attach_runs(rows: list[Row], config: ModelConfig, backend: str, device: str, context: int) -> None:
    torch, gen, experts = _torch_inputs(config, device)
    from ossbatch.kernels import ops

    kernels = ops(backend)
    h, e, k = config.hidden_size, config.num_local_experts, config.num_experts_per_tok
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    def randn(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype).normal_(generator=gen).to(device)

    for row in rows:
        b = row.batch
        if row.kernel == "rmsnorm":
            row.run = lambda b=b: (lambda x=randn(b, h), w=randn(h): lambda: kernels.rmsnorm(x, w, 1e-5))()
        elif row.kernel.startswith("route"):
            row.run = lambda b=b: (lambda l=randn(b, e): lambda: kernels.route(l, k))()
        elif row.kernel.startswith("moe"):
            def moe(b=b):
                x, logits = randn(b, h), randn(b, e, dtype=torch.float32)
                weights, chosen = kernels.route(logits, k)
                plan = kernels.plan_routing(chosen, e)
                return lambda: kernels.moe(x, weights, plan, **experts, limit=config.swiglu_limit)
            row.run = moe
        elif row.kernel.startswith("attention"):
            window = config.sliding_window if "window" in row.kernel else 0
            span = min(context, window) if window else context

            def attention(b=b, window=window, span=span):
                # A window layer only ever needs its last `window` positions; give it just those.
                q, k_cache, v_cache = randn(b, 1, hq, d), randn(b, span, hkv, d), randn(b, span, hkv, d)
                kv_len = torch.full((b,), span, dtype=torch.long, device=device)
                positions = (kv_len - 1)[:, None]
                sinks = randn(hq, dtype=torch.float32)
                return lambda: kernels.attention(q, k_cache, v_cache, sinks, positions, kv_len, window, config.sm_scale)
            row.run = attention


def time_call(fn: Callable, device: str, repeats: int) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=5, rep=max(repeats, 20)) / 1e3
    # No warm-up on a CPU (one MoE call at batch 512 takes a minute); instead, best of
    # `repeats` calls, and of more while the row has used under a second.
    best, spent, calls = math.inf, 0.0, 0
    while calls < repeats or (spent < 1.0 and calls < 50):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
    return best


# ----------------------------------------------------------------------------- output


def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _fmt_s(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us" if s >= 1e-6 else f"{s * 1e9:.1f} ns"


def print_table(rows: list[Row], timings: dict) -> None:
    header = ("kernel", "batch", "bytes", "FLOPs", "roofline", "bound", "measured",
              f"GB/s (peak {HBM_BYTES_PER_S / 1e9:.0f})", f"TFLOP/s (peak {BF16_FLOPS / 1e12:.0f})", "% of roofline")
    lines = []
    for row in rows:
        t = timings.get(id(row))
        lines.append((
            row.kernel, str(row.batch), _fmt_bytes(row.bytes), f"{row.flops:.3g}", _fmt_s(row.roofline_s), row.bound,
            _fmt_s(t),
            f"{row.bytes / t / 1e9:.1f}" if t else "-",
            f"{row.flops / t / 1e12:.3f}" if t else "-",
            f"{100 * row.roofline_s / t:.2f}%" if t else "-",
        ))
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = lambda cells: "| " + " | ".join(f"{c:<{w}}" if j == 0 else f"{c:>{w}}" for j, (c, w) in enumerate(zip(cells, widths))) + " |"
    print(fmt(header))
    print("|" + "|".join(("-" * (w + 1) + ":") if j else ("-" * (w + 2)) for j, w in enumerate(widths)) + "|")
    for line in lines:
        print(fmt(line))


def print_decode_step(config: ModelConfig, batch: int, contexts: list[int]) -> None:
    for context in contexts:
        est = decode_step_estimate(config, batch, context)
        print(f"\nRoofline: one gpt-oss-120b decode step, batch {batch}, every sequence at context {context}")
        width = max(len(name) for name in est["bytes"])
        for name, n in est["bytes"].items():
            print(f"  {name:<{width}}  {_fmt_bytes(n):>10}")
        print(f"  {'total bytes':<{width}}  {_fmt_bytes(est['total_bytes']):>10}  -> {_fmt_s(est['total_bytes'] / HBM_BYTES_PER_S)} at 3.35 TB/s")
        print(f"  {'FLOPs':<{width}}  {est['flops']:>10.3g}  -> {_fmt_s(est['flops'] / BF16_FLOPS)} at 990 TFLOP/s")
        print(f"  step >= {_fmt_s(est['step_s'])}: at most {est['tokens_per_s']:,.0f} tokens/s per H100")
        for label, ring in (("KV stored by position (the kernels' layout)", False), ("ring buffer for windowed layers", True)):
            plan = plan_memory(config, 80 * GIB, context, ring_buffer_windowed_layers=ring)
            verdict = "fits" if plan.max_batch >= batch else "does NOT fit"
            print(f"  80 GiB memory plan, {label}: batch {batch} {verdict} (largest batch at {context}: {plan.max_batch})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roofline-only", action="store_true", help="print the roofline arithmetic only")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--context", type=int, default=4096, help="KV positions the full-attention rows attend over")
    parser.add_argument("--step-batch", type=int, default=256)
    parser.add_argument("--step-contexts", default="1024,4096", help="contexts for the decode-step estimate")
    parser.add_argument("--backend", choices=("torch", "triton"), default=None,
                        help="default: triton on a GPU, torch (the reference) on a CPU")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 20 on a GPU; on a CPU 1, and more while a row is under 1 s)")
    args = parser.parse_args(argv)
    config = GPT_OSS_120B
    batches = [int(b) for b in args.batches.split(",")]
    rows = [row for b in batches for row in kernel_rows(config, b, args.context)]
    rows.sort(key=lambda r: (r.kernel.split()[0], "window" in r.kernel, r.batch))
    timings = {}

    print(f"gpt-oss-120b shapes: hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
          f"{config.num_local_experts} experts top-{config.num_experts_per_tok}, "
          f"{config.num_attention_heads} q / {config.num_key_value_heads} kv heads x {config.head_dim}; "
          f"roofline: H100 SXM {HBM_BYTES_PER_S / 1e12:.2f} TB/s, {BF16_FLOPS / 1e12:.0f} bf16 TFLOP/s")
    if not args.roofline_only:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        backend = args.backend or ("triton" if device == "cuda" else "torch")
        if backend == "triton" and device != "cuda":
            parser.error("--backend triton needs a GPU here (the interpreter is far too slow for these shapes)")
        repeats = args.repeats or (20 if device == "cuda" else 1)
        name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
        print(f"measured: {backend} backend on {name}, best of >= {repeats} calls (bf16 activations)")
        attach_runs(rows, config, backend, device, args.context)
        for row in rows:
            fn = row.run()
            timings[id(row)] = time_call(fn, device, repeats)
            del fn
            print(f"  {row.kernel} batch {row.batch}: {_fmt_s(timings[id(row)])}", file=sys.stderr, flush=True)
    print()
    print_table(rows, timings)
    print_decode_step(config, args.step_batch, [int(c) for c in args.step_contexts.split(",")])


if __name__ == "__main__":
    main()
