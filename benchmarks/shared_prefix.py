"""Shared-prefix batches end to end: a labeling job whose rows share one long
developer message, and `synth --n` (n samples of each prompt), through the run
stage (render, bucket, generate, parse) with and without prefix sharing, on the
benchmark model.

For each case: prompt tokens in the job, unique prompt tokens (a radix tree's
count: every distinct prefix once), prompt tokens the engine computed, the
largest KV cache held, and the wall time. Goals (issue 11): computed <= 1.15x
unique; wall time >= 4x faster with sharing. Run it alone on the machine: with
other processes on the cores every timing is invalid.

    python benchmarks/shared_prefix.py                      # 512 rows, 1,500-token developer message
    python benchmarks/shared_prefix.py --rows 6 --prefix-tokens 40 --item-tokens 5 20 --new-tokens 2 --n 2 --n-prompts 2
    python benchmarks/shared_prefix.py --new-tokens 8 --shared-only   # the shared runs alone (minutes, not half an hour)
"""

import argparse
import random
import time

from common import bench_model_dir, matmul_peak_gflops, table

from ossbatch.pipeline.config import Job, JobOptions
from ossbatch.pipeline.infer import ShardInferencer
from ossbatch.pipeline.render import render_prompt

_WORDS = ("label positive negative neutral invoice refund shipping delay account billing spam urgent "
          "customer product review complaint praise question request cancel upgrade password login").split()


def _text(rng: random.Random, tokens: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(tokens))  # ~1 token per word


def labeling_requests(rows: int, prefix_tokens: int, item_tokens: tuple[int, int], seed: int = 0) -> list[dict]:
    """Every row: the same developer message (instructions, label definitions, examples), its own item."""
    rng = random.Random(seed)
    developer = "Label each customer message. " + _text(rng, prefix_tokens)
    return [{"id": f"row{i}", "instructions": developer, "messages": [{"role": "user", "content": _text(rng, rng.randint(*item_tokens))}]}
            for i in range(rows)]


def synth_requests(prompts: int, n: int, prefix_tokens: int, item_tokens: tuple[int, int]) -> list[dict]:
    """What `ossbatch synth --n` sends: each prompt (the job's developer message and its own item)
    n times, each copy its own seed; the prompts share the developer message, the copies all."""
    return [dict(request, id=f"{request['id']}#{k}", seed=k)
            for request in labeling_requests(prompts, prefix_tokens, item_tokens, seed=1) for k in range(n)]


def unique_tokens(prompts: list[list[int]]) -> int:
    """Tokens in a radix tree of the prompts: each distinct prefix counted once."""
    ordered = sorted(prompts)
    common = 0
    for a, b in zip(ordered, ordered[1:]):
        n = min(len(a), len(b))
        common += next((i for i in range(n) if a[i] != b[i]), n)
    return sum(map(len, prompts)) - common


def report(name: str, requests: list[dict], options: dict, modes: tuple[bool, ...] = (False, True)) -> list[list]:
    prompts = [render_prompt(r["messages"], r["instructions"]) for r in requests]
    total, unique = sum(map(len, prompts)), unique_tokens(prompts)
    rows, seconds = [], {}
    for sharing in modes:
        job = Job(model=str(bench_model_dir()), inputs=["-"], output="-", options=JobOptions(**options, prefix_sharing=sharing))
        infer = ShardInferencer(job)
        infer(requests[:2])  # warm up: the model, thread pools, the expert cache
        started = time.perf_counter()
        results, stats = infer(requests)
        seconds[sharing] = time.perf_counter() - started
        generated = sum(r["completion_tokens"] for r in results)
        rows.append([name, "shared" if sharing else "not shared", len(requests), total, unique, stats["prompt_computed"],
                     f"{stats['prompt_computed'] / unique:.2f}x", f"{stats['kv_cache_bytes'] / 2**20:.1f} MiB",
                     f"{seconds[sharing]:.1f}", f"{generated / seconds[sharing]:.1f}"])
    if len(seconds) == 2:
        rows[-1][-2] += f" ({seconds[False] / seconds[True]:.1f}x faster)"
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--prefix-tokens", type=int, default=1500)
    parser.add_argument("--item-tokens", type=int, nargs=2, default=(50, 300))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt in the synth case")
    parser.add_argument("--n-prompts", type=int, help="prompts in the synth case (default: rows / n, as many rows as labeling)")
    parser.add_argument("--batch-tokens", type=int, default=1 << 18, help="KV budget of one run (rows x own tokens)")
    parser.add_argument("--max-batch-rows", type=int, default=64)
    parser.add_argument("--shared-only", action="store_true",
                        help="skip the runs without sharing (the slow baseline; no speed-up is printed)")
    args = parser.parse_args()
    modes = (True,) if args.shared_only else (False, True)

    options = dict(max_tokens=args.new_tokens, batch_tokens=args.batch_tokens, max_batch_rows=args.max_batch_rows,
                   expert_cache_bytes=1 << 30)
    item = tuple(args.item_tokens)
    rows = report("labeling", labeling_requests(args.rows, args.prefix_tokens, item), dict(options, temperature=0.0), modes)
    rows += report(f"synth --n {args.n}", synth_requests(args.n_prompts or max(1, args.rows // args.n), args.n, args.prefix_tokens, item),
                   dict(options, temperature=1.0), modes)
    print(f"float32, torch backend, {args.new_tokens} new tokens per row, batch tokens {args.batch_tokens}, "
          f"at most {args.max_batch_rows} rows a run; float32 matmul peak in this run: {matmul_peak_gflops():.0f} GFLOP/s (IEEE)")
    print(table(["job", "prefixes", "rows", "prompt tokens", "unique", "computed", "computed/unique", "KV held", "wall s",
                 "gen tok/s"], rows))


if __name__ == "__main__":
    main()
