"""One run on the first GPU available: are the kernels right there, how close to their
roofline, and what the engine does at gpt-oss shapes.  Run through `benchmarks/gpu_check.sh`.

    python benchmarks/gpu_check.py [--out DIR] [--dry-run]

Made for a bare H100/H200 image (torch + triton + safetensors, no package index): it
imports the repository's kernels/ and engine/ as `ossbatch.*` without installing the
project, never imports the pipeline's libraries (harmony, pyarrow, ...: checked at the
end), makes random weights on the GPU (nothing written to disk), and gives each section
its own error row so one failure does not hide the rest.  Writes ``DIR/gpu_check.md``
(one table) and ``DIR/gpu_check.json``.

``--dry-run``: the same sections at tiny shapes on the CPU under the Triton interpreter,
so the script is exercised by `make test` and cannot rot.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# What the check must never pull in: the pipeline's and flows' libraries.
FORBIDDEN_MODULES = ("openai_harmony", "pyarrow", "polars", "prefect", "llguidance", "jsonschema", "fsspec", "ray",
                     "ossbatch.pipeline", "ossbatch.flows")


def use_repository_package() -> None:
    """`ossbatch.kernels` / `ossbatch.engine` from this checkout, installed or not: a namespace
    package of two links in a temp dir, first on sys.path (and PYTHONPATH, for subprocesses)."""
    holder = Path(tempfile.mkdtemp(prefix="ossbatch-pkg-"))
    (holder / "ossbatch").mkdir()
    for part in ("kernels", "engine"):
        (holder / "ossbatch" / part).symlink_to(ROOT / part, target_is_directory=True)
    sys.path.insert(0, str(holder))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(holder), *filter(None, [os.environ.get("PYTHONPATH")])])


class Report:
    """The table; with `path` set it is rewritten after every row, so a run cut short by the
    time limit still leaves everything it measured."""

    def __init__(self, path: Path | None = None, title: str = ""):
        self.rows: list[dict] = []
        self.path, self.title = path, title

    def add(self, section: str, item: str, value: str, reference: str = "", verdict: str = "") -> None:
        row = dict(section=section, item=item, value=value, reference=reference, verdict=verdict)
        self.rows.append(row)
        if self.path is not None:
            self.path.write_text(self.markdown(self.title))
        print(f"[{section}] {item}: {value}" + (f"  ({reference})" if reference else "") + (f"  {verdict}" if verdict else ""),
              flush=True)

    def section(self, name: str, run) -> None:
        started = time.perf_counter()
        try:
            run()
        except Exception as error:  # one section's failure is that section's row
            self.add(name, "error", f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}",
                     verdict="FAIL")
            traceback.print_exc()
        self.add(name, "section wall time", f"{time.perf_counter() - started:.1f} s")

    def markdown(self, title: str) -> str:
        lines = [f"# {title}", "", "| section | item | value | reference | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {r['section']} | {r['item']} | {r['value']} | {r['reference']} | {r['verdict']} |" for r in self.rows]
        return "\n".join(lines) + "\n"


def fmt_s(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.1f} us" if seconds >= 1e-6 else f"{seconds * 1e9:.1f} ns"


class Bench:
    """Timing: CUDA events via triton.testing.do_bench on a GPU; best of a few calls on the CPU."""

    def __init__(self, device: str, dry_run: bool):
        self.device, self.dry_run = device, dry_run

    def time(self, fn) -> float:
        if self.device == "cuda":
            import triton.testing

            return triton.testing.do_bench(fn, warmup=3, rep=30) / 1e3
        if self.dry_run:  # the interpreter: one call proves the path, timing means nothing
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        fn()
        best = math.inf
        for _ in range(2):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best


# ----------------------------------------------------------------------------- sections


def kernel_tests(report: Report, device: str, seconds_left: float) -> None:
    """The repository's kernel tests, compiled (TRITON_INTERPRET=0), when pytest is on the image;
    run last, in the time the measurements left (each parametrization compiles its own kernels)."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        report.add("kernel tests", "pytest", "not installed on this image: the built-in checks below stand in", verdict="SKIP")
        return
    env = dict(os.environ, TRITON_INTERPRET="0")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT / "tests" / "kernels"),
               "--confcutdir", str(ROOT / "tests" / "kernels"), str(ROOT / "tests" / "kernels"),
               "--ignore", str(ROOT / "tests" / "kernels" / "test_kernel_compile.py"),
               "--ignore", str(ROOT / "tests" / "kernels" / "test_gpu_check.py")]
    if seconds_left < 30:
        report.add("kernel tests", "pytest tests/kernels", f"not run: {seconds_left:.0f} s of the budget left", verdict="SKIP")
        return
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=seconds_left, cwd=ROOT / "tests" / "kernels")
    except subprocess.TimeoutExpired as timeout:
        done = (timeout.stdout or b"").decode(errors="replace") if isinstance(timeout.stdout, bytes) else (timeout.stdout or "")
        report.add("kernel tests", "pytest tests/kernels, TRITON_INTERPRET=0",
                   f"cut at {seconds_left:.0f} s: {done.count('.')} passed, {done.count('F')} failed so far",
                   verdict="FAIL" if "F" in done else "partial")
        return
    summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
    report.add("kernel tests", "pytest tests/kernels, TRITON_INTERPRET=0", summary, verdict="ok" if result.returncode == 0 else "FAIL")
    if result.returncode:
        print(result.stdout[-6000:], result.stderr[-3000:], sep="\n")


def tolerance_ok(out, reference) -> tuple[bool, str]:
    """tests/kernels/conftest.py's bf16 tolerance: max 2e-2, mean 5e-3 of the reference's magnitude."""
    scale = max(reference.float().abs().max().item(), 1.0)
    err = (out.float() - reference.float()).abs()
    ok = bool(torch.isfinite(out).all()) and err.max().item() <= 2e-2 * scale and err.mean().item() <= 5e-3 * scale
    return ok, f"max err {err.max().item():.3g}, mean {err.mean().item():.3g} (scale {scale:.3g})"


def builtin_checks(report: Report, device: str, dry_run: bool) -> None:
    """Every kernel, every table configuration, against its torch reference (bf16)."""
    from ossbatch.kernels import configs
    from ossbatch.kernels.attention import attention_torch, attention_triton
    from ossbatch.kernels.moe import moe_torch, moe_triton
    from ossbatch.kernels.mxfp4 import quantize_mxfp4
    from ossbatch.kernels.rmsnorm import rmsnorm_torch, rmsnorm_triton
    from ossbatch.kernels.routing import plan_routing_torch, route_torch, route_triton

    gen = torch.Generator(device="cpu").manual_seed(0)
    randn = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    hidden, inter, experts, k, tokens = (64, 48, 8, 2, 24) if dry_run else (2880, 2880, 32, 4, 300)
    x = randn(tokens, hidden).bfloat16()
    weight = randn(hidden).bfloat16()
    ok, detail = tolerance_ok(rmsnorm_triton(x, weight), rmsnorm_torch(x, weight))
    report.add("correctness", f"rmsnorm [{tokens}, {hidden}]", detail, verdict="ok" if ok else "FAIL")
    logits = randn(tokens, experts)
    w_t, e_t = route_triton(logits, k)
    w_r, e_r = route_torch(logits, k)
    ok = torch.equal(e_t, e_r) and torch.allclose(w_t, w_r, atol=1e-6)
    report.add("correctness", f"route top-{k} of {experts}", "experts equal, weights within 1e-6" if ok else "differ", verdict="ok" if ok else "FAIL")

    padded = lambda t: torch.nn.functional.pad(t, (0, -t.shape[-1] % 32))  # noqa: E731 -- as checkpoints store K
    w1 = quantize_mxfp4(padded(randn(experts, 2 * inter, hidden) * 0.3))
    w2 = quantize_mxfp4(padded(randn(experts, hidden, inter) * 0.3))
    b1, b2 = randn(experts, 2 * inter).bfloat16(), randn(experts, hidden).bfloat16()
    weights, chosen = route_torch(randn(tokens, experts) * 2, k)
    for bucket, config in configs.MOE_BY_ROWS_PER_EXPERT.items():
        plan = plan_routing_torch(chosen, experts, block_m=config.block_m)
        args = (x, weights, plan, w1[0], w1[1], b1, w2[0], w2[1], b2, 7.0)
        ok, detail = tolerance_ok(moe_triton(*args, config=config), moe_torch(*args))
        report.add("correctness", f"moe {config.name} ({bucket}), {tokens} tokens", detail, verdict="ok" if ok else "FAIL")

    batch, q_heads, kv_heads, dim, cache = (3, 8, 2, 16, 40) if dry_run else (4, 64, 8, 64, 1000)
    kv_len = torch.tensor([cache, cache // 2, 7][:batch] + [cache] * (batch - 3), device=device)
    k_cache, v_cache = randn(batch, cache, kv_heads, dim).bfloat16(), randn(batch, cache, kv_heads, dim).bfloat16()
    sinks = randn(q_heads)
    for bucket, config in configs.ATTENTION_BY_BUCKET.items():
        q_len = 1 if bucket.startswith("decode") else 9
        q = randn(batch, q_len, q_heads, dim).bfloat16()
        positions = (kv_len[:, None] - q_len + torch.arange(q_len, device=device)).clamp(min=0)
        for window in (0, 8 if dry_run else 128):
            out, lse = attention_triton(q, k_cache, v_cache, sinks, positions, kv_len, window, dim ** -0.5, return_lse=True, config=config)
            ref, ref_lse = attention_torch(q, k_cache, v_cache, sinks, positions, kv_len, window, dim ** -0.5, return_lse=True)
            ok, detail = tolerance_ok(out, ref)
            lse_err = (lse - ref_lse).abs().max().item()
            ok = ok and lse_err <= 2e-2
            report.add("correctness", f"attention {config.name} ({bucket}), q_len {q_len}, window {window}",
                       f"{detail}; lse max err {lse_err:.3g}", verdict="ok" if ok else "FAIL")


def kernel_rooflines(report: Report, device: str, dry_run: bool, bench: Bench, kernel_roofline) -> None:
    """Each kernel at gpt-oss-120b shapes, timed, against its roofline."""
    from ossbatch.engine.config import GPT_OSS_120B, ModelConfig
    from ossbatch.kernels.attention import attention_triton
    from ossbatch.kernels.moe import moe_triton
    from ossbatch.kernels.rmsnorm import rmsnorm_triton
    from ossbatch.kernels.routing import plan_routing_torch, route_triton

    config = tiny_config(2) if dry_run else GPT_OSS_120B
    h, i, e, k = config.hidden_size, config.intermediate_size, config.num_local_experts, config.num_experts_per_tok
    hq, hkv, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    experts = random_experts(config, device)
    context = 64 if dry_run else 4096
    steps = [(1, 1), (4, 1)] if dry_run else [(1, 1), (64, 1), (256, 1), (2, 4096)]
    for batch, q_len in steps:
        tokens = batch * q_len
        label = f"decode {batch}" if q_len == 1 else f"prefill {batch}x{q_len}"
        x = torch.randn(tokens, h, device=device, dtype=torch.bfloat16)
        rows = {r.kernel.split()[0]: r for r in kernel_roofline.kernel_rows(config, tokens, context)}
        measured = [("rmsnorm", rows["rmsnorm"], lambda: rmsnorm_triton(x, experts["norm"]))]
        logits = torch.randn(tokens, e, device=device)
        measured.append(("route", rows["route"], lambda: route_triton(logits, k)))
        weights, chosen = route_triton(logits, k)
        plan = plan_routing_torch(chosen, e)
        measured.append(("moe", rows["moe"], lambda: moe_triton(x, weights, plan, experts["w1_blocks"], experts["w1_scales"], experts["w1_bias"],
                                                          experts["w2_blocks"], experts["w2_scales"], experts["w2_bias"], config.swiglu_limit)))
        for window in (0, config.sliding_window):
            q = torch.randn(batch, q_len, hq, d, device=device, dtype=torch.bfloat16)
            k_cache = torch.randn(batch, context, hkv, d, device=device, dtype=torch.bfloat16)
            kv_len = torch.full((batch,), context, device=device)
            positions = (kv_len[:, None] - q_len + torch.arange(q_len, device=device))
            sinks = torch.randn(hq, device=device)
            row = kernel_roofline.attention_roofline(config, batch, q_len, context, window)
            measured.append((f"attention {'window ' + str(window) if window else 'full'} ctx {context}", row,
                             lambda q=q, k_cache=k_cache, kv_len=kv_len, positions=positions, sinks=sinks, window=window:
                             attention_triton(q, k_cache, k_cache, sinks, positions, kv_len, window, config.sm_scale)))
        for name, row, fn in measured:
            seconds = bench.time(fn)
            report.add("kernel vs roofline (120b)" if not dry_run else "kernel vs roofline (tiny)", f"{name}, {label}",
                       fmt_s(seconds), f"roofline {fmt_s(row.roofline_s)} ({row.bound})", f"{100 * row.roofline_s / seconds:.1f}% of roofline")


def tiny_config(layers: int):
    from ossbatch.engine.config import ModelConfig

    return ModelConfig(num_hidden_layers=layers, num_local_experts=8, num_experts_per_tok=2, vocab_size=512, hidden_size=64,
                       intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=8)


def random_experts(config, device: str, scale_exponent: int = 118) -> dict:
    """MXFP4 experts of `config`'s shape made on `device`: random e2m1 codes, one shared e8m0 scale."""
    e, h, i = config.num_local_experts, config.hidden_size, config.intermediate_size
    gh, gi = -(-h // 32), -(-i // 32)
    u8 = lambda *s: torch.randint(0, 256, s, dtype=torch.uint8, device=device)  # noqa: E731
    return dict(
        w1_blocks=u8(e, 2 * i, gh, 16), w1_scales=torch.full((e, 2 * i, gh), scale_exponent, dtype=torch.uint8, device=device),
        w1_bias=torch.randn(e, 2 * i, device=device, dtype=torch.bfloat16) * 0.01,
        w2_blocks=u8(e, h, gi, 16), w2_scales=torch.full((e, h, gi), scale_exponent, dtype=torch.uint8, device=device),
        w2_bias=torch.randn(e, h, device=device, dtype=torch.bfloat16) * 0.01,
        norm=torch.ones(h, device=device, dtype=torch.bfloat16),
    )


def random_model(config, device: str, backend: str):
    """A Transformer with random bf16 weights made on `device` (nothing read from or written to disk)."""
    from ossbatch.engine.model import Transformer
    from ossbatch.engine.weights import LayerWeights, ModelWeights

    h, hq, hkv, d, e = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.num_local_experts
    bf16 = lambda *s, std=0.02: torch.randn(*s, device=device, dtype=torch.bfloat16) * std  # noqa: E731
    layers = []
    for _ in range(config.num_hidden_layers):
        experts = random_experts(config, device)
        layers.append(LayerWeights(
            attn_norm=torch.ones(h, device=device, dtype=torch.bfloat16), qkv_weight=bf16((hq + 2 * hkv) * d, h), qkv_bias=bf16((hq + 2 * hkv) * d),
            sinks=torch.randn(hq, device=device), out_weight=bf16(h, hq * d), out_bias=bf16(h),
            mlp_norm=torch.ones(h, device=device, dtype=torch.bfloat16), router_weight=bf16(e, h, std=1.0), router_bias=bf16(e),
            **{name: experts[name] for name in ("w1_blocks", "w1_scales", "w1_bias", "w2_blocks", "w2_scales", "w2_bias")},
        ))
    weights = ModelWeights(config, bf16(config.vocab_size, h, std=1.0), layers, torch.ones(h, device=device, dtype=torch.bfloat16),
                           bf16(config.vocab_size, h))
    return Transformer(weights, backend=backend, max_positions=8192, device=device)


def decode_step(model, batch: int, context: int, device: str):
    """A callable running one decode step of `batch` rows, each at position `context - 1`."""
    from ossbatch.engine.kv_cache import KVCache
    from ossbatch.engine.model import Step

    cache = KVCache.for_model(model.config, batch, context, torch.bfloat16, device)
    kv_len = torch.full((batch,), context, dtype=torch.long)
    step = Step.build(torch.arange(batch), kv_len - 1, kv_len, batch).to(device)
    tokens = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    logits_at = torch.arange(batch, device=device)
    return lambda: model.forward(tokens, step, cache, logits_at)


def prefill_step(model, rows: int, length: int, device: str):
    from ossbatch.engine.kv_cache import KVCache
    from ossbatch.engine.model import Step

    cache = KVCache.for_model(model.config, rows, length, torch.bfloat16, device)
    kv_len = torch.full((rows,), length, dtype=torch.long)
    step = Step.build(torch.arange(rows).repeat_interleave(length), torch.arange(length).repeat(rows), kv_len, rows).to(device)
    tokens = torch.randint(0, model.config.vocab_size, (rows * length,), device=device)
    logits_at = (torch.arange(rows, device=device) + 1) * length - 1  # each row's last token, as prefill samples
    return lambda: model.forward(tokens, step, cache, logits_at)


def engine_20b(report: Report, device: str, dry_run: bool, bench: Bench, backend: str) -> None:
    from ossbatch.engine.config import GPT_OSS_20B

    config = tiny_config(2) if dry_run else GPT_OSS_20B
    label = "engine (tiny)" if dry_run else "engine, gpt-oss-20b shapes"
    model = random_model(config, device, backend)
    context = 32 if dry_run else 1024
    for batch in ((1, 4) if dry_run else (1, 64, 256)):
        seconds = bench.time(decode_step(model, batch, context, device))
        report.add(label, f"decode batch {batch}, context {context}", f"{batch / seconds:,.1f} tok/s", f"step {fmt_s(seconds)}")
    rows, length = (2, 16) if dry_run else (4, 2048)
    seconds = bench.time(prefill_step(model, rows, length, device))
    report.add(label, f"prefill {rows} x {length} tokens", f"{rows * length / seconds:,.0f} tok/s", f"step {fmt_s(seconds)}")


def engine_120b_scaled(report: Report, device: str, dry_run: bool, bench: Bench, backend: str, kernel_roofline) -> None:
    """A decode step of a 2- and a 4-layer gpt-oss-120b (one windowed + one full layer per pair),
    scaled to 36 layers: t(2) + (t(4) - t(2)) / 2 * 34, so embedding and lm_head are counted once."""
    from ossbatch.engine.config import GPT_OSS_120B, ModelConfig

    batch, context = (4, 32) if dry_run else (64, 1024)
    times = {}
    for layers in (2, 4):
        config = tiny_config(layers) if dry_run else ModelConfig(num_hidden_layers=layers)
        model = random_model(config, device, backend)
        times[layers] = bench.time(decode_step(model, batch, context, device))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    per_layer = max((times[4] - times[2]) / 2, 0.0)
    full = times[2] + per_layer * (GPT_OSS_120B.num_hidden_layers - 2)
    roofline = kernel_roofline.decode_step_estimate(GPT_OSS_120B, batch, context)["step_s"]
    label = "engine, gpt-oss-120b shapes" if not dry_run else "engine, 120b scaling (tiny)"
    report.add(label, f"decode step, 2 / 4 layers, batch {batch}, context {context}", f"{fmt_s(times[2])} / {fmt_s(times[4])}",
               f"{fmt_s(per_layer)} per layer")
    report.add(label, f"decode step scaled to 36 layers, batch {batch}", f"{fmt_s(full)}: {batch / full:,.0f} tok/s",
               f"roofline {fmt_s(roofline)}: {batch / roofline:,.0f} tok/s", f"{100 * roofline / full:.1f}% of roofline")


def imports_check(report: Report) -> bool:
    loaded = sorted(name for name in FORBIDDEN_MODULES if name in sys.modules)
    report.add("imports", "pipeline libraries imported", ", ".join(loaded) or "none", ", ".join(FORBIDDEN_MODULES),
               "FAIL" if loaded else "ok")
    return not loaded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu-check"))
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_TIMEOUT", 480)),
                        help="seconds for the whole run; the kernel tests get what the measurements leave")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    else:
        os.environ.setdefault("TRITON_INTERPRET", "0")
    use_repository_package()
    import importlib.util

    import triton

    spec = importlib.util.spec_from_file_location("kernel_roofline", ROOT / "benchmarks" / "kernel_roofline.py")
    kernel_roofline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_roofline)

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on a CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    machine = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.machine()}), Triton interpreter"
    title = f"gpu_check{' --dry-run' if args.dry_run else ''}: {machine}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    report = Report(args.out / "gpu_check.md", title)
    report.add("environment", "device", machine)
    report.add("environment", "torch / triton / python", f"{torch.__version__} / {triton.__version__} / {platform.python_version()}")
    bench = Bench(device, args.dry_run)
    started = time.perf_counter()
    report.section("correctness", lambda: builtin_checks(report, device, args.dry_run))
    report.section("kernel vs roofline", lambda: kernel_rooflines(report, device, args.dry_run, bench, kernel_roofline))
    report.section("engine 20b", lambda: engine_20b(report, device, args.dry_run, bench, "triton"))
    report.section("engine 120b", lambda: engine_120b_scaled(report, device, args.dry_run, bench, "triton", kernel_roofline))
    if not args.dry_run:
        left = args.budget - (time.perf_counter() - started) - 20
        report.section("kernel tests", lambda: kernel_tests(report, device, left))
    clean = imports_check(report)
    report.add("total", "wall time", f"{time.perf_counter() - started:.0f} s")
    (args.out / "gpu_check.md").write_text(report.markdown(title))
    (args.out / "gpu_check.json").write_text(json.dumps({"title": title, "rows": report.rows}, indent=1))
    print(f"\nwrote {args.out / 'gpu_check.md'}")
    failed = [r for r in report.rows if r["verdict"] == "FAIL"]
    return 1 if failed or not clean else 0


if __name__ == "__main__":
    sys.exit(main())
