"""Cost of structured outputs: llguidance mask time per step, and the engine's step-time overhead.

1. Mask time per decoding step for a labeling schema at batch 1, 64 and 256: each row
   replays a plausible completion (analysis text, then the JSON answer) through
   `BatchConstraint`; the medians over the steps where every row is still generating of:
   `mask` (llguidance, in a background thread: hidden behind the forward pass up to its
   length), `apply` (masking [B, 201088] float32 logits on the CPU) and `advance`
   (consuming the sampled tokens), each timed by `TimedConstraint` below.
2. The engine with and without constraints: `engine.generate` on the 4-layer, 32-expert,
   hidden-512 random model (full vocabulary), rendered prompts carrying the labeling
   schema (reasoning budget 16), greedy, no stop tokens (equal work), at batch 1, 8 and 32:
   milliseconds per generated token, the overhead of the constrained run, and the median
   time per step the engine spent blocked in the constraint (wait + apply + advance).

    python benchmarks/constraints.py [--steps 0] [--new-tokens 24] [--skip-engine]
"""

import argparse
import json
import random
import statistics
import time

import torch
from common import bench_model_dir, prompts_text, table

from ossbatch.pipeline.grammar import compile_row_grammar
from ossbatch.pipeline.harmony import CHANNEL, END, MESSAGE, RETURN, START, TOKENIZER_VOCAB_SIZE, harmony_encoding, lltokenizer
from ossbatch.pipeline.masks import BatchConstraint
from ossbatch.pipeline.response_format import response_format_section

LABEL_SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral", "mixed"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "evidence": {"type": "string", "maxLength": 200},
    },
    "required": ["label", "confidence", "evidence"],
    "additionalProperties": False,
}
REASONING_BUDGET = 64

_REASONS = ["The user wants a sentiment label for the review.", "Review mentions late delivery but good quality.",
            "Mostly complaints about the battery; some praise for the screen.", "Short and enthusiastic.",
            "The customer says the product broke after two days, clearly unhappy.", "Neutral description, no opinion."]
_EVIDENCE = ["arrived late", "battery died fast but the screen is lovely", "love it!!", "it is a phone",
             "broke after two days, want a refund", "works as described, nothing special"]


class TimedConstraint(BatchConstraint):
    """BatchConstraint timing each call, in seconds per step: `mask` (the background fill),
    `wait` (`apply` blocked on the masks), `apply` (masking the logits), `advance`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timings: dict[str, list[float]] = {"mask": [], "wait": [], "apply": [], "advance": []}
        self._waited = 0.0

    def _fill(self, rows, bitmask):
        started = time.perf_counter()
        super()._fill(rows, bitmask)
        self.timings["mask"].append(time.perf_counter() - started)

    def _finish_pending(self):
        started = time.perf_counter()
        super()._finish_pending()
        self._waited = time.perf_counter() - started

    def apply(self, logits, rows):
        started = time.perf_counter()
        super().apply(logits, rows)
        self.timings["wait"].append(self._waited)
        self.timings["apply"].append(time.perf_counter() - started - self._waited)

    def advance(self, tokens, rows):
        started = time.perf_counter()
        super().advance(tokens, rows)
        self.timings["advance"].append(time.perf_counter() - started)


def scripted_completions(count: int, seed: int = 0) -> list[list[int]]:
    """Plausible constrained completions: analysis, then the final JSON answer."""
    enc = harmony_encoding()
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        analysis = " ".join(rng.choice(_REASONS) for _ in range(rng.randint(1, 3)))
        answer = json.dumps({"label": rng.choice(LABEL_SCHEMA["properties"]["label"]["enum"]),
                             "confidence": round(rng.random(), 2), "evidence": rng.choice(_EVIDENCE)})
        tokens = ([CHANNEL] + enc.encode("analysis") + [MESSAGE] + enc.encode(analysis)[:REASONING_BUDGET]
                  + [END, START] + enc.encode("assistant") + [CHANNEL] + enc.encode("final") + [MESSAGE]
                  + enc.encode(answer) + [RETURN])
        out.append(tokens)
    return out


def mask_times(batch: int, steps: int = 0) -> dict:
    grammar = compile_row_grammar(json.dumps(LABEL_SCHEMA), REASONING_BUDGET)
    scripts = scripted_completions(batch)
    shortest = min(map(len, scripts))
    steps = min(steps or shortest, shortest)
    bc = TimedConstraint([grammar] * batch, TOKENIZER_VOCAB_SIZE)
    logits = torch.zeros(batch, TOKENIZER_VOCAB_SIZE)
    rows = list(range(batch))
    for step in range(steps):
        bc.prepare(rows)
        bc.apply(logits, rows)
        bc.advance(torch.tensor([s[step] for s in scripts]), rows)
    assert bc.errors() == [None] * batch, bc.errors()
    t = bc.timings
    return {"batch": batch, "steps": steps,
            **{k: 1e3 * statistics.median(v) for k, v in t.items() if k != "wait"}}


def engine_overhead(batch: int, new_tokens: int, model, prompts: list[list[int]], repeats: int = 3) -> dict:
    """ms per generated token with and without constraints, the same work in both: no stop
    tokens, so every row runs `new_tokens` steps (a finished constrained row keeps sampling
    `<|return|>`, the only token its grammar then allows).  Runs alternate; best of `repeats`."""
    from ossbatch.engine.generate import SamplingParams, generate

    grammar = compile_row_grammar(json.dumps(LABEL_SCHEMA), 16)
    params = [SamplingParams(max_tokens=new_tokens, temperature=0.0)] * batch
    best = {"plain": float("inf"), "constrained": float("inf")}
    blocking: list[float] = []
    for _ in range(repeats):
        for name in best:
            seconds = tokens = 0
            for i in range(0, len(prompts) - batch + 1, batch):
                chunk = prompts[i : i + batch]
                bc = TimedConstraint([grammar] * batch, model.config.vocab_size) if name == "constrained" else None
                started = time.perf_counter()
                completions, _ = generate(model, chunk, params, [], constraint=bc)
                seconds += time.perf_counter() - started
                tokens += sum(len(c.token_ids) for c in completions)
                if bc is not None:
                    assert bc.errors() == [None] * batch, bc.errors()
                    t = bc.timings
                    blocking += [w + a + d for w, a, d in zip(t["wait"], t["apply"], t["advance"])]
            best[name] = min(best[name], 1e3 * seconds / tokens)
    return {"batch": batch, **best, "overhead": best["constrained"] / best["plain"] - 1,
            "blocking_ms_per_step": 1e3 * statistics.median(blocking)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=0, help="mask steps per batch (0: the shortest script)")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()

    started = time.perf_counter()
    lltokenizer()
    print(f"llguidance tokenizer built in {time.perf_counter() - started:.2f} s; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    started = time.perf_counter()
    compile_row_grammar(json.dumps(LABEL_SCHEMA), REASONING_BUDGET)
    print(f"labeling grammar compiled in {1e3 * (time.perf_counter() - started):.1f} ms\n")

    rows = [mask_times(b, args.steps) for b in (1, 64, 256)]
    print("Mask time per step, labeling schema (median ms):")
    print(table(["batch", "steps", "mask (background)", "apply (CPU logits)", "advance"],
                [[r["batch"], r["steps"], f"{r['mask']:.3f}", f"{r['apply']:.3f}", f"{r['advance']:.3f}"] for r in rows]))

    if args.skip_engine:
        return
    from ossbatch.engine.model import Transformer
    from ossbatch.pipeline.render import render_prompt

    model = Transformer.from_checkpoint(bench_model_dir(), torch.float32, expert_cache_bytes=1 << 30)
    section = response_format_section(json.dumps(LABEL_SCHEMA), "sentiment")
    prompts = [render_prompt([{"role": "user", "content": text}], "Label the review's sentiment.", "low", section)
               for text in prompts_text(32)]
    engine_overhead(8, 4, model, prompts[:8], repeats=1)  # warm up: thread pools, the expert cache
    rows = [engine_overhead(b, args.new_tokens, model, prompts[:n]) for b, n in ((1, 2), (8, 8), (32, 32))]
    print(f"\nEngine, 4-layer 32-expert random model, greedy, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} torch threads (ms per generated token, best of 3):")
    print(table(["batch", "unconstrained", "constrained", "overhead (wall)", "blocked in constraint, ms/step",
                 "blocked / step"],
                [[r["batch"], f"{r['plain']:.2f}", f"{r['constrained']:.2f}", f"{100 * r['overhead']:+.1f}%",
                  f"{r['blocking_ms_per_step']:.2f}",
                  f"{100 * r['blocking_ms_per_step'] / (r['plain'] * r['batch']):.1f}%"] for r in rows]))
    print("(wall-clock overhead is within this machine's run-to-run noise; the blocked time is the\n"
          " constraint's own cost per step: waiting for masks not yet ready, masking, consuming tokens)")


if __name__ == "__main__":
    main()
