"""Every performance target of the project, measured on this machine, in one table.

    python benchmarks/run_all.py [--with-20b] [--quick]

Targets (issue 7, and the padding target of issue 5):
- CPU throughput: the whole `ossbatch run` (start-up included) >= 10x transformers' generate()
  tokens/s on the 4-layer, 32-expert, hidden-512 model, 32 prompts of 20-200 words, 24 new tokens;
- model FLOPs >= 40% of this machine's measured float32 matmul peak (over the engine's time);
- gpt-oss-20b shapes load memory-mapped and generate at peak RSS < 16 GiB (--with-20b: writes ~13 GB);
- decode_slots <= 1.25x generated tokens on a long-tailed mix of answer lengths;
- padded prompt slots <= 1.10x prompt tokens on 1,500 lognormal prompt lengths (bucketed vs arrival order);
- pipeline overhead (everything but forward passes) < 5% of wall on a 20k-row job.
"""

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import CACHE, ROOT, bench_model_dir, matmul_peak_gflops, prompts_text, rendered_prompts, table
from engine_throughput import transformers_generate

from ossbatch.engine.config import ModelConfig, read_config

GIB = 1 << 30


def import_torch_seconds() -> float:
    """A floor under any `ossbatch run`: a fresh interpreter importing torch."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True)
    return time.perf_counter() - started


def forward_flops(config: ModelConfig, prompt_tokens: int, generated_tokens: int, rows: int) -> float:
    """Model FLOPs: 2 x active weights per token (attention, router, the top-k experts), the LM head
    once per generated token, and attention scores over the context (approximated by the mean)."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = c.hidden_size * (q + 2 * kv) + q * c.hidden_size
    experts = c.num_experts_per_tok * 3 * c.hidden_size * c.intermediate_size
    router = c.num_local_experts * c.hidden_size
    per_token = 2 * c.num_hidden_layers * (attention + experts + router)
    tokens = prompt_tokens + generated_tokens
    mean_context = tokens / max(rows, 1) / 2
    scores = 4 * c.num_hidden_layers * q * mean_context
    return tokens * (per_token + scores) + generated_tokens * 2 * c.hidden_size * c.vocab_size


def bench_cpu_throughput(new_tokens: int = 24) -> dict:
    import transformers

    path = bench_model_dir()
    with tempfile.TemporaryDirectory() as tmp:
        inp = Path(tmp) / "prompts.jsonl"
        inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(prompts_text(32))))
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "ossbatch.flows.cli", "run", "--model", str(path), "--input", str(inp), "--output",
                        str(Path(tmp) / "out"), "--max-tokens", str(new_tokens), "--temperature", "0", "--orchestrator",
                        "none", "--quiet"], check=True, cwd=ROOT)
        wall = time.perf_counter() - started
        manifest = json.loads((Path(tmp) / "out" / "_manifest.json").read_text())
    tokens = manifest["tokens"]
    ours = tokens["completion"] / wall
    hf = transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    hf_tokens, hf_seconds = transformers_generate(hf, rendered_prompts(32), 32, new_tokens)
    engine_seconds = manifest.get("engine_seconds") or manifest.get("seconds", {}).get("engine")
    flops = forward_flops(read_config(path), tokens["prompt"], tokens["completion"], 32)
    return {"ours_tok_s": ours, "hf_tok_s": hf_tokens / hf_seconds, "wall": wall, "engine_seconds": engine_seconds, "flops": flops,
            "tokens": tokens["completion"]}


def bench_decode_waste(rows: int = 256, slots: int = 32) -> dict:
    """Long-tailed answer lengths (lognormal budgets, no early stop) on `slots` KV-cache rows:
    static batches whose finished rows leave, against refilling freed slots from the queue."""
    from ossbatch.engine.generate import SamplingParams, generate
    from ossbatch.engine.model import Transformer
    from ossbatch.engine.tiny_model import TINY, write_random_checkpoint

    rng = random.Random(0)
    budgets = [max(1, min(256, int(rng.lognormvariate(2.5, 1.0)))) for _ in range(rows)]
    params = [SamplingParams(max_tokens=b) for b in budgets]
    prompts = [[rng.randrange(1000, 100000) for _ in range(rng.randint(5, 40))] for _ in range(rows)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Transformer.from_checkpoint(write_random_checkpoint(tmp, TINY))
        generate(model, prompts[:4], params[:4], stop_token_ids=[])  # warm up
        for policy in ("leave", "refill"):
            started, generated, decode_slots, decode_steps = time.perf_counter(), 0, 0, 0
            chunks = [range(i, min(i + slots, rows)) for i in range(0, rows, slots)] if policy == "leave" else [range(rows)]
            for chunk in chunks:
                completions, stats = generate(model, [prompts[i] for i in chunk], [params[i] for i in chunk], stop_token_ids=[],
                                              slots=min(slots, len(chunk)))
                generated += sum(len(c.token_ids) for c in completions)
                decode_slots += stats.decode_slots + len(chunk)  # + each row's first token, from its prefill
                decode_steps += stats.steps
            out[policy] = {"seconds": time.perf_counter() - started, "generated": generated, "decode_slots": decode_slots,
                           "width": (decode_slots - rows) / max(1, decode_steps), "tok_s": generated / (time.perf_counter() - started)}
    out["static_slots"] = sum(len(c) * max(budgets[i] for i in c) for c in
                              [range(i, min(i + slots, rows)) for i in range(0, rows, slots)])  # rows kept until the longest ends
    return out


def bench_padding(rows: int = 1500) -> dict:
    from ossbatch.pipeline.bucket import pack_batches

    rng = random.Random(1)
    lengths = [max(8, int(rng.lognormvariate(5.0, 0.9))) for _ in range(rows)]
    budgets = [256] * rows
    bucketed = pack_batches(lengths, budgets, batch_tokens=65536, max_batch_rows=64)
    arrival = [list(range(i, min(i + 64, rows))) for i in range(0, rows, 64)]

    def slots(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    return {"prompt_tokens": sum(lengths), "bucketed": slots(bucketed), "arrival": slots(arrival)}


# Where a job's time goes: (module, attribute, label), patched where the shard driver looks them up.
# Reading runs in a thread ahead of the engine, so its seconds overlap the engine's.
_STAGES = [
    ("ossbatch.engine.model", "Transformer.forward", "forward passes"),
    ("ossbatch.pipeline.infer", "generate", "generate() (forward + sampling, KV cache, stops)"),
    ("ossbatch.pipeline.driver", "read_shard", "read + validate (thread, ahead)"),
    ("ossbatch.pipeline.infer", "ShardInferencer._prepare", "render (harmony) + sampling params"),
    ("ossbatch.pipeline.infer", "ShardInferencer._result", "parse (harmony) + result rows"),
    ("ossbatch.pipeline.driver", "commit_shard", "write Parquet + commit"),
    ("ossbatch.pipeline.driver", "plan_job", "plan (scan inputs, shards)"),
]


def _timed_stages(seconds: dict):
    import importlib

    patched = []
    for module_name, attribute, label in _STAGES:
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        def timed(*args, _original=original, _label=label, **kwargs):
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_label] = seconds.get(_label, 0.0) + time.perf_counter() - started

        setattr(owner, name, timed)
        patched.append((owner, name, original))
    return patched


def bench_pipeline_overhead(rows: int = 20000) -> dict:
    """A 20k-row job on the tiny model, in process; forward passes timed apart from everything else."""
    from ossbatch.engine.tiny_model import TINY, write_random_checkpoint
    from ossbatch.flows.cli import main as cli

    seconds: dict[str, float] = {}
    patched = _timed_stages(seconds)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = write_random_checkpoint(Path(tmp) / "model", TINY)
            rng = random.Random(2)
            inp = Path(tmp) / "rows.jsonl"
            texts = prompts_text(200, 5, 40, seed=3)
            inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": rng.choice(texts), "k": i}) + "\n" for i in range(rows)))
            started = time.perf_counter()
            cli(["run", "--model", str(path), "--input", str(inp), "--output", str(Path(tmp) / "out"), "--max-tokens", "2",
                 "--temperature", "0", "--orchestrator", "none", "--quiet", "--shard-rows", "5000"])
            wall = time.perf_counter() - started
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
    return {"wall": wall, "forward": seconds.get("forward passes", 0.0), "stages": seconds}


def bench_20b_memory() -> dict:
    path = CACHE / "gpt-oss-20b-random"
    if not (path / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, "-m", "ossbatch.flows.cli", "make-tiny-model", str(path), "--preset", "gpt-oss-20b",
                        "--layers-per-shard", "4"], check=True, cwd=ROOT)
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    code = (
        "import resource, time, torch\n"
        "from engine.model import Transformer\n"
        "from engine.generate import SamplingParams, generate\n"
        f"m = Transformer.from_checkpoint({str(path)!r}, torch.bfloat16, expert_cache_bytes=1 << 30)\n"
        "t = time.perf_counter()\n"
        "c, s = generate(m, [[200006, 1428, 200008, 3686] * 8, [17, 42]], [SamplingParams(max_tokens=4)] * 2, [])\n"
        "print(sum(len(x.token_ids) for x in c), time.perf_counter() - t)\n"
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True).stdout.split()
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"disk_bytes": size, "peak_rss": max(peak_kib, before) * 1024, "tokens": int(out[0]), "seconds": float(out[1])}


def main():
    parser = argparse.ArgumentParser(description="Measure every performance target on this machine.")
    parser.add_argument("--with-20b", action="store_true", help="write (once) and run the ~13 GB gpt-oss-20b-shaped checkpoint")
    parser.add_argument("--pipeline-rows", type=int, default=20000)
    args = parser.parse_args()

    from ossbatch.engine.precision import bf16_mode_keeps_fp32_accuracy

    peak = matmul_peak_gflops()
    fast_peak = matmul_peak_gflops(onednn_precision="bf16") if bf16_mode_keeps_fp32_accuracy() else peak
    rows = []
    cpu = bench_cpu_throughput()
    rows.append(["CPU throughput vs transformers generate()", ">= 10x",
                 f"{cpu['ours_tok_s']:.1f} vs {cpu['hf_tok_s']:.1f} tok/s", f"{cpu['ours_tok_s'] / cpu['hf_tok_s']:.1f}x"])
    # The most any implementation could reach here: importing torch, then the model's FLOPs at the
    # fastest float32-accurate matmul peak, nothing else.
    floor = import_torch_seconds() + cpu["flops"] / fast_peak / 1e9
    rows.append(["  ceiling: import torch + model FLOPs at the fast peak", "(info)",
                 f"{cpu['tokens'] / floor:.1f} tok/s ({floor:.2f} s)", f"{cpu['tokens'] / floor / cpu['hf_tok_s']:.1f}x"])
    if cpu["engine_seconds"]:
        achieved = cpu["flops"] / cpu["engine_seconds"] / 1e9
        rows.append(["model FLOPs / IEEE float32 matmul peak (engine time)", ">= 40%", f"{achieved:.1f} of {peak:.1f} GFLOP/s", f"{achieved / peak:.0%}"])
        rows.append(["  the same / oneDNN bf16-mode float32 peak", "(info)", f"{achieved:.1f} of {fast_peak:.1f} GFLOP/s", f"{achieved / fast_peak:.0%}"])
    util_wall = cpu["flops"] / cpu["wall"] / 1e9 / peak
    rows.append(["model FLOPs / IEEE peak (whole run)", "(info)", f"{cpu['flops'] / cpu['wall'] / 1e9:.1f} GFLOP/s over {cpu['wall']:.1f} s", f"{util_wall:.0%}"])
    if args.with_20b:
        mem = bench_20b_memory()
        rows.append(["gpt-oss-20b shapes, peak RSS (bf16, MXFP4 experts)", "< 16 GiB",
                     f"{mem['peak_rss'] / GIB:.2f} GiB ({mem['disk_bytes'] / 1e9:.1f} GB on disk)", f"{mem['peak_rss'] / (16 * GIB):.2f}"])
    waste = bench_decode_waste()
    leave, refill = waste["leave"], waste["refill"]
    rows.append(["decode slots / generated tokens (long tail, 256 rows, 32 slots)", "<= 1.25",
                 f"{refill['decode_slots']} / {refill['generated']} (rows kept to the longest: {waste['static_slots']})",
                 f"{refill['decode_slots'] / refill['generated']:.2f}"])
    rows.append(["  rows leave vs refill freed slots: mean decode width, tok/s", "(info)",
                 f"leave {leave['width']:.1f} rows, {leave['tok_s']:.0f} tok/s; refill {refill['width']:.1f} rows, {refill['tok_s']:.0f} tok/s",
                 f"{refill['tok_s'] / leave['tok_s']:.2f}x"])
    pad = bench_padding()
    rows.append(["padded prompt slots / prompt tokens (1,500 lognormal)", "<= 1.10",
                 f"bucketed {pad['bucketed']} vs arrival {pad['arrival']} / {pad['prompt_tokens']}", f"{pad['bucketed'] / pad['prompt_tokens']:.3f} (arrival {pad['arrival'] / pad['prompt_tokens']:.2f})"])
    pipe = bench_pipeline_overhead(args.pipeline_rows)
    rows.append([f"pipeline overhead, {args.pipeline_rows} rows", "< 5%",
                 f"forward {pipe['forward']:.1f} s of {pipe['wall']:.1f} s wall", f"{1 - pipe['forward'] / pipe['wall']:.1%}"])
    engine = pipe["stages"].get("generate() (forward + sampling, KV cache, stops)", 0.0)
    rows.append(["  the same, counting sampling as the engine's", "(info)",
                 f"generate() {engine:.1f} s of {pipe['wall']:.1f} s wall", f"{1 - engine / pipe['wall']:.1%}"])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, float32 matmul peak {peak:.1f} GFLOP/s (IEEE), {fast_peak:.1f} (oneDNN bf16 mode)")
    print(table(["target", "goal", "measured", "ratio"], rows))
    print(f"\nWhere the {args.pipeline_rows}-row job's {pipe['wall']:.1f} s went (busy seconds per stage; threads overlap):")
    print(table(["stage", "seconds", "of wall"],
                [[label, f"{s:.2f}", f"{s / pipe['wall']:.1%}"] for label, s in pipe["stages"].items()]))


if __name__ == "__main__":
    main()
