"""Every performance target of the project, measured on this machine, in one table.

    python benchmarks/run_all.py [--with-20b] [--quick]

Targets (issue 7, and the padding target of issue 5):
- CPU throughput: the whole `ossbatch run` (start-up included) >= 10x transformers' generate()
  tokens/s on the 4-layer, 32-expert, hidden-512 model, 32 prompts of 20-200 words, 24 new tokens;
- model FLOPs >= 40% of this machine's measured float32 matmul peak (over the engine's time);
- gpt-oss-20b shapes through `ossbatch run`, inside a 16 GiB memory cgroup, at process-tree peak RSS < 16 GiB,
  with the memory's breakdown and tokens/s inside the limit against outside it (--with-20b: writes ~13 GB;
  --small: the same harness on the 4-layer model in a 2 GiB cgroup, alone);
- decode_slots <= 1.25x generated tokens on a long-tailed mix of answer lengths;
- padded prompt slots <= 1.10x prompt tokens on 1,500 lognormal prompt lengths (bucketed vs arrival order);
- pipeline overhead (everything but forward passes) < 5% of wall on a 20k-row job.
"""

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import CACHE, ROOT, bench_model_dir, matmul_peak_gflops, prompts_text, rendered_prompts, table
from engine_throughput import transformers_generate

from ossbatch.engine.config import ModelConfig, read_config
from ossbatch.engine.memory_plan import parse_bytes

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


def checkpoint_20b() -> Path:
    """The gpt-oss-20b-shaped random checkpoint (~13 GB), written once."""
    path = CACHE / "gpt-oss-20b-random"
    if not (path / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, "-m", "ossbatch.flows.cli", "make-tiny-model", str(path), "--preset", "gpt-oss-20b",
                        "--layers-per-shard", "4"], check=True, cwd=ROOT)
    return path


def run_cli_measured(model: Path, limit: int | None, orchestrator: str, rows: int = 2, new_tokens: int = 4) -> dict:
    """`ossbatch run` (benchmarks/cli_memory.py: the command line's own main, with the engine's
    memory report) on `rows` short prompts, in a memory cgroup of `limit` bytes when given and the
    machine has one; the process tree sampled from outside (the Prefect server included)."""
    from memory_tree import MemoryCgroup, sample_tree

    with tempfile.TemporaryDirectory() as tmp:
        inp, report = Path(tmp) / "rows.jsonl", Path(tmp) / "report.json"
        inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": t}) + "\n" for i, t in enumerate(prompts_text(rows, 20, 60))))
        cmd = [sys.executable, str(ROOT / "benchmarks" / "cli_memory.py"), str(report), "run", "--model", str(model),
               "--input", str(inp), "--output", str(Path(tmp) / "out"), "--max-tokens", str(new_tokens), "--temperature", "0",
               "--dtype", "bfloat16", "--orchestrator", orchestrator, "--quiet"]
        cgroup = MemoryCgroup(limit) if limit else None
        inside = cgroup.__enter__() if cgroup else None
        try:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, preexec_fn=inside.enter if inside else None,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            peak = sample_tree(proc, interval=0.2)
            wall = time.perf_counter() - started
            stderr = proc.stderr.read()
            out = {"rc": proc.returncode, "tree": peak, "wall": wall, "limited": inside is not None,
                   "oom_kills": inside.oom_kills if inside else 0, "cgroup_peak": inside.max_usage if inside else 0}
        finally:
            if cgroup:
                cgroup.__exit__(None, None, None)
        if proc.returncode == 0:
            out["report"] = json.loads(report.read_text())
            manifest = json.loads((Path(tmp) / "out" / "_manifest.json").read_text())
            out["tokens"], out["engine_seconds"] = manifest["tokens"]["completion"], manifest.get("engine_seconds") or 0.0
        else:
            out["error"] = stderr[-2000:]
    return out


def bench_cli_memory(model: Path, limit: int, orchestrator: str) -> dict:
    """The same `ossbatch run` inside the memory cgroup and outside it."""
    return {"disk_bytes": sum(p.stat().st_size for p in model.glob("*.safetensors")), "limit": limit,
            "inside": run_cli_measured(model, limit, orchestrator), "outside": run_cli_measured(model, None, orchestrator)}


def cli_memory_rows(label: str, mem: dict) -> list[list]:
    rows = []
    for where in ("inside", "outside"):
        run = mem[where]
        place = f"in a {mem['limit'] / GIB:.0f} GiB cgroup" if where == "inside" else "no limit"
        if where == "inside" and not run["limited"]:
            place = "no memory cgroup on this machine: unlimited"
        if run["rc"] != 0:
            rows.append([f"{label}, {place}", "completes", f"exit {run['rc']} ({run['oom_kills']} OOM kills)", "FAILED"])
            continue
        tree, report = run["tree"], run["report"]
        tok_s = run["tokens"] / report["seconds"]  # over the whole command, start-up included
        engine = f", {run['tokens'] / run['engine_seconds']:.3f} in the engine" if run["engine_seconds"] else ""
        goal = "< 16 GiB" if label.startswith("gpt-oss-20b") else f"< {mem['limit'] / GIB:.0f} GiB"
        rows.append([f"{label}, `ossbatch run`, {place}: process tree peak RSS (sampled)", goal,
                     f"{tree.rss / GIB:.2f} GiB = {tree.file / GIB:.2f} file-backed + {tree.anon / GIB:.2f} anonymous, "
                     f"{tree.processes} processes; {run['tokens']} tokens at {tok_s:.3f} tok/s{engine}",
                     f"{tree.rss / mem['limit']:.2f}"])
        if where == "inside" and run["limited"]:
            rows.append(["  cgroup peak charge (page cache included), OOM kills", "(info)",
                         f"{run['cgroup_peak'] / GIB:.2f} GiB, {run['oom_kills']}", ""])
    inside, outside = mem["inside"], mem["outside"]
    if inside["rc"] == 0 and outside["rc"] == 0:
        ratio = (inside["tokens"] / inside["report"]["seconds"]) / (outside["tokens"] / outside["report"]["seconds"])
        rows.append(["  tokens/s inside the limit / outside it (whole command)", "(info)",
                     f"{inside['report']['seconds']:.1f} s vs {outside['report']['seconds']:.1f} s", f"{ratio:.2f}"])
    return rows


def memory_breakdown(report: dict) -> list[list]:
    """The engine's own account of the run's memory (Transformer.memory_report())."""
    gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    budget = report.get("host_budget")
    return [
        ["file-backed", "weights used in place from the checkpoint's mapping", gib(report["weights_mapped"])],
        ["file-backed", "resident at the peak sample (mapped weights touched, libraries)", gib(report["peak_file"])],
        ["anonymous", "weights copied out of the mapping (q/k/v biases, float32 sinks; all under float32)", gib(report["weights_copied"])],
        ["anonymous", f"expert cache, peak (budget {gib(report['expert_cache_budget'])})", gib(report["expert_cache"])],
        ["anonymous", "KV cache, largest", gib(report["kv_cache"])],
        ["anonymous", "logits buffer, largest", gib(report["logits"])],
        ["anonymous", "other at the end (Python, torch, tokenizer, Arrow, oneDNN caches)", gib(report["other"])],
        ["anonymous", "the process, peak (sampled every 10 ms)", gib(report["peak_anonymous"])],
        ["budget", "--memory-budget (default: machine or cgroup less the mapping)", gib(budget["budget_bytes"]) if budget else "none (no shard was planned)"],
    ]


def main():
    parser = argparse.ArgumentParser(description="Measure every performance target on this machine.")
    parser.add_argument("--with-20b", action="store_true", help="write (once) and run the ~13 GB gpt-oss-20b-shaped checkpoint")
    parser.add_argument("--pipeline-rows", type=int, default=20000)
    parser.add_argument("--small", action="store_true",
                        help="only the memory row, on the 4-layer benchmark model in a 2 GiB cgroup (proves the harness)")
    parser.add_argument("--model", type=Path, help="the memory row's checkpoint (default: the 20b-shaped one)")
    parser.add_argument("--memory-limit", default=None, help="the memory row's cgroup limit (default: 16GiB; --small: 2GiB)")
    parser.add_argument("--orchestrator", choices=["prefect", "none"], default="prefect",
                        help="the memory row's --orchestrator (default: prefect, as a user runs it: its server joins the tree)")
    args = parser.parse_args()
    if args.small or args.model:
        return print_memory_row(args)

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
    mem = None
    if args.with_20b:
        mem = bench_cli_memory(checkpoint_20b(), parse_bytes(args.memory_limit or "16GiB"), args.orchestrator)
        rows += cli_memory_rows(f"gpt-oss-20b shapes ({mem['disk_bytes'] / 1e9:.1f} GB, bf16)", mem)
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
    if mem and mem["inside"]["rc"] == 0:
        print("\nWhere the 20b run's memory went, inside the limit (the engine's report):")
        print(table(["kind", "owner", "bytes"], memory_breakdown(mem["inside"]["report"])))
    print(f"\nWhere the {args.pipeline_rows}-row job's {pipe['wall']:.1f} s went (busy seconds per stage; threads overlap):")
    print(table(["stage", "seconds", "of wall"],
                [[label, f"{s:.2f}", f"{s / pipe['wall']:.1%}"] for label, s in pipe["stages"].items()]))


def print_memory_row(args) -> None:
    model = args.model or bench_model_dir()
    limit = parse_bytes(args.memory_limit or ("2GiB" if args.small else "16GiB"), "--memory-limit")
    mem = bench_cli_memory(model, limit, args.orchestrator)
    print(table(["target", "goal", "measured", "ratio"], cli_memory_rows(f"{model.name} (bf16)", mem)))
    for where in ("inside", "outside"):
        if mem[where]["rc"] == 0:
            print(f"\nWhere the run's memory went, {where} the limit (the engine's report):")
            print(table(["kind", "owner", "bytes"], memory_breakdown(mem[where]["report"])))
        else:
            print(f"\n{where}: exit {mem[where]['rc']}\n{mem[where].get('error', '')}")


if __name__ == "__main__":
    main()
