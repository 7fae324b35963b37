"""The engine against transformers' GptOssForCausalLM, in float32.

Greedy tokens must be identical and log-probabilities within 1e-3, over
several shapes, prompts longer than the sliding window, and mixed-length
batches; a row's result in a batch equals its result alone.
"""

import pytest
import torch

from ossbatch.engine.generate import SamplingParams, generate
from ossbatch.engine.model import Transformer
from ossbatch.engine.tiny_model import preset_config, write_random_checkpoint

transformers = pytest.importorskip("transformers")

SHAPES = {
    "tiny": dict(),
    "deep-window4-mqa": dict(num_hidden_layers=4, sliding_window=4, num_attention_heads=8, num_key_value_heads=1, head_dim=8),
    "wide-top4": dict(num_local_experts=16, num_experts_per_tok=4, hidden_size=96, intermediate_size=160, sliding_window=6),
    "top1-mha": dict(num_local_experts=4, num_experts_per_tok=1, num_attention_heads=4, num_key_value_heads=4, sliding_window=5),
}
NEW_TOKENS = 10


def _prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    # Lengths below, at and well past every shape's sliding window.
    return [torch.randint(0, 200000, (n,), generator=gen).tolist() for n in (3, 17, 9, 30, 1)]


def _hf_greedy(hf, prompt: list[int]) -> tuple[list[int], list[float]]:
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        eos_token_id=None,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt) :].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


@pytest.fixture(scope="module", params=list(SHAPES))
def checkpoint(request, tmp_path_factory):
    config = preset_config("tiny", **SHAPES[request.param])
    path = write_random_checkpoint(tmp_path_factory.mktemp(request.param), config, seed=len(request.param))
    hf = transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)
    ).eval()
    return path, hf


def test_greedy_batch_equals_transformers(checkpoint):
    path, hf = checkpoint
    model = Transformer.from_checkpoint(path, torch.float32)
    prompts = _prompts(1)
    params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)] * len(prompts)
    completions, stats = generate(model, prompts, params, stop_token_ids=[200002], logprobs=True)
    assert stats.decode_slots == len(prompts) * (NEW_TOKENS - 1)
    for prompt, completion in zip(prompts, completions):
        expected_tokens, expected_logprobs = _hf_greedy(hf, prompt)
        assert completion.token_ids == expected_tokens
        assert completion.finish_reason == "length"
        deltas = [abs(a - b) for a, b in zip(completion.logprobs, expected_logprobs)]
        assert max(deltas) <= 1e-3


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (0.02, 1.0), (0.02, 0.9)])
def test_row_in_batch_equals_row_alone(checkpoint, temperature, top_p):
    """Greedy, and seeded sampling: a row's seed, not its neighbours, decides its draws.
    (A low temperature keeps float32 rounding of different batch shapes from
    moving a draw across a boundary of the random model's near-flat distribution.)"""
    path, _ = checkpoint
    model = Transformer.from_checkpoint(path, torch.float32)
    prompts = _prompts(2)
    params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=temperature, top_p=top_p, seed=i) for i in range(len(prompts))]
    together, _ = generate(model, prompts, params, stop_token_ids=[200002], logprobs=True)
    if temperature > 0:  # the draws really are samples, not the greedy path
        greedy, _ = generate(model, prompts, [SamplingParams(max_tokens=NEW_TOKENS)] * len(prompts), stop_token_ids=[200002])
        assert any(g.token_ids != s.token_ids for g, s in zip(greedy, together))
    for prompt, param, in_batch in zip(prompts, params, together):
        alone, _ = generate(model, [prompt], [param], stop_token_ids=[200002], logprobs=True)
        assert alone[0].token_ids == in_batch.token_ids
        assert max(abs(a - b) for a, b in zip(alone[0].logprobs, in_batch.logprobs)) <= 1e-4


def test_grouped_prefill_equals_transformers_and_pads_less(checkpoint):
    """Rows prefilled in length groups, then decoded together, give the reference's tokens."""
    path, hf = checkpoint
    model = Transformer.from_checkpoint(path, torch.float32)
    prompts = _prompts(3)  # lengths 3, 17, 9, 30, 1
    params = [SamplingParams(max_tokens=NEW_TOKENS)] * len(prompts)
    grouped, grouped_stats = generate(model, prompts, params, [200002], logprobs=True, prefill_groups=[[0, 2, 4], [1, 3]])
    _, single_stats = generate(model, prompts, params, [200002])
    assert grouped_stats.padded_prompt_slots == 3 * 9 + 2 * 30 < single_stats.padded_prompt_slots == 5 * 30
    for prompt, completion in zip(prompts, grouped):
        expected_tokens, expected_logprobs = _hf_greedy(hf, prompt)
        assert completion.token_ids == expected_tokens
        assert max(abs(a - b) for a, b in zip(completion.logprobs, expected_logprobs)) <= 1e-3


def test_refilled_slots_equal_transformers(checkpoint):
    """Two KV-cache slots for five rows of different budgets: a row that takes a freed slot (a longer
    row's stale keys behind its length, sliding windows over them) still gives the reference's tokens."""
    path, hf = checkpoint
    model = Transformer.from_checkpoint(path, torch.float32)
    prompts = _prompts(5)  # lengths 3, 17, 9, 30, 1: the 1-token row lands in the 30-token row's slot
    budgets = [2, NEW_TOKENS, 4, 7, NEW_TOKENS]
    completions, stats = generate(model, prompts, [SamplingParams(max_tokens=b) for b in budgets], [], logprobs=True, slots=2)
    for prompt, budget, completion in zip(prompts, budgets, completions):
        expected_tokens, expected_logprobs = _hf_greedy(hf, prompt)
        assert completion.token_ids == expected_tokens[:budget]
        assert max(abs(a - b) for a, b in zip(completion.logprobs, expected_logprobs)) <= 1e-3
    assert stats.decode_slots == sum(budgets) - len(prompts)  # every decode slot made a kept token


# Not top-p here: a random model's next-token distribution is nearly flat (logprobs ~ -12.2 across
# the vocabulary), so the nucleus sort orders ~10^5 near-equal probabilities by float noise that
# differs with the batch's composition, static or refilled alike.
@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (0.9, 1.0)])
def test_a_row_is_the_same_whatever_slot_it_gets(checkpoint, temperature, top_p):
    path, _ = checkpoint
    model = Transformer.from_checkpoint(path, torch.float32)
    prompts = _prompts(7) + _prompts(8)
    params = [SamplingParams(max_tokens=1 + (3 * i) % NEW_TOKENS, temperature=temperature, top_p=top_p, seed=i)
              for i in range(len(prompts))]
    groups = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    static, static_stats = generate(model, prompts, params, [], logprobs=True, prefill_groups=groups)
    refilled, refill_stats = generate(model, prompts, params, [], logprobs=True, prefill_groups=groups, slots=3)
    for a, b in zip(static, refilled):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-4
    assert refill_stats.decode_slots == static_stats.decode_slots
    assert refill_stats.steps > static_stats.steps  # three slots for ten rows: narrower steps, more of them


def test_slots_are_checked(checkpoint):
    path, _ = checkpoint
    model = Transformer.from_checkpoint(path, torch.float32)
    prompts, params = _prompts(1)[:2], [SamplingParams(max_tokens=2)] * 2
    with pytest.raises(ValueError, match="slots must be from 1 to the number of rows"):
        generate(model, prompts, params, [], slots=3)
