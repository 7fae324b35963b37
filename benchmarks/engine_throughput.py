"""Engine tokens/s against transformers' generate() on the same prompts.

The 4-layer, 32-expert, hidden-512 random model (full 201088 vocabulary),
32 prompts of 20-200 words, greedy, float32, 24 new tokens per row, at batch
1, 8 and 32.  Prints a table.

    python benchmarks/engine.py [--new-tokens 24] [--hf-prompts 8]
"""

import argparse
import time

import torch
from common import bench_model_dir, matmul_peak_gflops, rendered_prompts, table

from ossbatch.engine.generate import SamplingParams, generate
from ossbatch.engine.model import Transformer


def ours(model, prompts, batch, new_tokens) -> tuple[int, float]:
    generated, started = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        completions, _ = generate(model, chunk, [SamplingParams(max_tokens=new_tokens, temperature=0.0)] * len(chunk), stop_token_ids=[])
        generated += sum(len(c.token_ids) for c in completions)
    return generated, time.perf_counter() - started


def transformers_generate(hf, prompts, batch, new_tokens) -> tuple[int, float]:
    generated, started = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])  # left padding, as generate() wants
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
        generated += (out.shape[1] - width) * len(chunk)
    return generated, time.perf_counter() - started


def run(new_tokens: int = 24, hf_prompts: int = 8, batches=(1, 8, 32)) -> list[dict]:
    import transformers

    path = bench_model_dir()
    prompts = rendered_prompts(32)
    model = Transformer.from_checkpoint(path, torch.float32, expert_cache_bytes=1 << 30)
    hf = transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)
    ).eval()
    ours(model, prompts[:2], 2, 2)  # warm up: thread pools, the expert cache
    results = []
    for batch in batches:
        tokens, seconds = ours(model, prompts, batch, new_tokens)
        # transformers is slow at batch 1: time a subset of the prompts there, the rate is what counts.
        subset = prompts if batch > 1 else prompts[:hf_prompts]
        hf_tokens, hf_seconds = transformers_generate(hf, subset, batch, new_tokens)
        results.append({"batch": batch, "ours_tok_s": tokens / seconds, "hf_tok_s": hf_tokens / hf_seconds})
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--hf-prompts", type=int, default=8)
    args = parser.parse_args()
    results = run(args.new_tokens, args.hf_prompts)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32; "
          f"float32 matmul peak in this run: {matmul_peak_gflops():.0f} GFLOP/s (IEEE)")
    print(table(["batch", "ossbatch tok/s", "transformers tok/s", "speed-up"],
                [[r["batch"], f"{r['ours_tok_s']:.1f}", f"{r['hf_tok_s']:.1f}", f"{r['ours_tok_s'] / r['hf_tok_s']:.1f}x"] for r in results]))


if __name__ == "__main__":
    main()
