"""Shared-prefix batches: a labeling job whose rows share one long developer
message, and `synth --n` (n samples of each prompt), with and without prefix
sharing, on the benchmark model.

For each case: prompt tokens in the job, unique prompt tokens (a radix tree's
count: every distinct prefix once), prompt tokens the engine computed, the KV
cache held, and the wall time of `generate`. Goals (issue 11): computed <= 1.15x
unique; wall time >= 4x faster with sharing. Run it alone on the machine: with
other processes on the cores every timing is invalid.

    python benchmarks/shared_prefix.py                      # 512 rows, 1,500-token developer message
    python benchmarks/shared_prefix.py --rows 8 --prefix-tokens 40 --item-tokens 5 20 --new-tokens 2 --n-prompts 2
"""

import argparse
import random
import time

import torch
from common import bench_model_dir, table

from ossbatch.engine.generate import SamplingParams, SharedPrefix, generate
from ossbatch.engine.model import Transformer
from ossbatch.pipeline.bucket import pack_batches_by_prefix
from ossbatch.pipeline.render import render_prompt

_WORDS = ("label positive negative neutral invoice refund shipping delay account billing spam urgent "
          "customer product review complaint praise question request cancel upgrade password login").split()


def _text(rng: random.Random, tokens: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(tokens))  # ~1 token per word


def labeling_job(rows: int, prefix_tokens: int, item_tokens: tuple[int, int], seed: int = 0) -> list[list[int]]:
    """Every row: the same developer message (instructions, label definitions, examples), its own item."""
    rng = random.Random(seed)
    developer = "Label each customer message. " + _text(rng, prefix_tokens)
    return [render_prompt([{"role": "user", "content": _text(rng, rng.randint(*item_tokens))}], developer) for _ in range(rows)]


def unique_tokens(prompts: list[list[int]]) -> int:
    """Tokens in a radix tree of the prompts: each distinct prefix counted once."""
    ordered = sorted(prompts)
    common = 0
    for a, b in zip(ordered, ordered[1:]):
        n = min(len(a), len(b))
        common += next((i for i in range(n) if a[i] != b[i]), n)
    return sum(map(len, prompts)) - common


def run_case(model, prompts, params, share: bool, slots: int, batch_tokens: int) -> dict:
    buckets = pack_batches_by_prefix(prompts, [p.max_tokens for p in params], batch_tokens, slots, share=share)
    order = [r for rows, _ in buckets for r in rows]
    position = {r: i for i, r in enumerate(order)}
    groups = [[position[r] for r in rows] for rows, _ in buckets]
    prefix_groups = {id(g): g for _, g in buckets if g.length}.values()
    shared = [SharedPrefix(tuple(position[r] for r in g.rows), g.length) for g in prefix_groups]
    started = time.perf_counter()
    completions, stats = generate(model, [prompts[r] for r in order], [params[r] for r in order], [], prefill_groups=groups,
                                  slots=min(slots, len(order)), shared_prefixes=shared)
    return {"seconds": time.perf_counter() - started, "computed": stats.prompt_computed, "kv": stats.kv_cache_bytes,
            "generated": sum(len(c.token_ids) for c in completions)}


def report(name: str, model, prompts, params, slots: int, batch_tokens: int) -> list[list]:
    total, unique = sum(map(len, prompts)), unique_tokens(prompts)
    rows, results = [], {}
    for share in (False, True):
        results[share] = r = run_case(model, prompts, params, share, slots, batch_tokens)
        rows.append([name, "shared" if share else "not shared", len(prompts), total, unique, r["computed"],
                     f"{r['computed'] / unique:.2f}x", f"{r['kv'] / 2**20:.1f} MiB", f"{r['seconds']:.1f}",
                     f"{r['generated'] / r['seconds']:.1f}"])
    rows[-1][-2] += f" ({results[False]['seconds'] / results[True]['seconds']:.1f}x faster)"
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--prefix-tokens", type=int, default=1500)
    parser.add_argument("--item-tokens", type=int, nargs=2, default=(50, 300))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt in the synth case")
    parser.add_argument("--n-prompts", type=int, default=32, help="prompts in the synth case")
    parser.add_argument("--slots", type=int, default=64, help="KV-cache rows (the decode batch)")
    parser.add_argument("--batch-tokens", type=int, default=1 << 20)
    args = parser.parse_args()

    model = Transformer.from_checkpoint(bench_model_dir(), torch.float32, expert_cache_bytes=1 << 30)
    labeling = labeling_job(args.rows, args.prefix_tokens, tuple(args.item_tokens))
    greedy = [SamplingParams(max_tokens=args.new_tokens)] * len(labeling)
    generate(model, labeling[:2], greedy[:2], [])  # warm up: thread pools, the expert cache
    rows = report("labeling", model, labeling, greedy, args.slots, args.batch_tokens)
    synth_prompts = [p for p in labeling_job(args.n_prompts, 200, tuple(args.item_tokens), seed=1) for _ in range(args.n)]
    sampled = [SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=i) for i in range(len(synth_prompts))]
    rows += report(f"synth --n {args.n}", model, synth_prompts, sampled, args.slots, args.batch_tokens)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, {args.new_tokens} new tokens per row, "
          f"{args.slots} slots")
    print(table(["job", "prefixes", "rows", "prompt tokens", "unique", "computed", "computed/unique", "KV held", "wall s",
                 "gen tok/s"], rows))


if __name__ == "__main__":
    main()
