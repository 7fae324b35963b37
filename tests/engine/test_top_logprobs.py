"""Top-K logprobs per generated token against transformers' GptOssForCausalLM, in float32:
the same ids (but where two logprobs nearly tie) and logprobs within 1e-3, from the raw
distribution even when a constraint masks the sampled token's choices."""

import pytest
import torch

from ossbatch.engine.generate import SamplingParams, generate
from ossbatch.engine.model import Transformer
from ossbatch.engine.tiny_model import preset_config, write_random_checkpoint

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 6
TIE = 1e-3  # logprobs closer than this may swap places between the two implementations


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = preset_config("tiny", sliding_window=4)
    path = write_random_checkpoint(tmp_path_factory.mktemp("top"), config, seed=3)
    hf = transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    return Transformer.from_checkpoint(path, torch.float32), hf


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(0, 200000, (n,), generator=gen).tolist() for n in (5, 12, 2)]


def _hf_top(hf, prompt: list[int], generated: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced: the log-softmax at every position that predicts a generated token, its top k."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + generated])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(generated) - 1], -1)
    values, ids = logprobs.topk(k + 1, dim=-1)  # one more: to tell a near-tie at the K-th place
    return values, ids


def _check(completion, hf, prompt, k):
    values, ids = _hf_top(hf, prompt, completion.token_ids, k)
    assert len(completion.top_logprobs) == len(completion.token_ids)
    for position, alternatives in enumerate(completion.top_logprobs):
        assert len(alternatives) == k
        got_ids = [t for t, _ in alternatives]
        got_values = torch.tensor([v for _, v in alternatives])
        assert (got_values[:-1] >= got_values[1:]).all()  # most likely first
        assert torch.allclose(got_values, values[position, :k], atol=1e-3)
        for rank, token in enumerate(got_ids):
            if token != int(ids[position, rank]):  # only where the reference's neighbours nearly tie
                near = (values[position] - got_values[rank]).abs() <= TIE
                assert token in ids[position][near].tolist()


def test_top_logprobs_equal_transformers(checkpoint):
    model, hf = checkpoint
    prompts = _prompts()
    params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)] * len(prompts)
    completions, _ = generate(model, prompts, params, stop_token_ids=[], logprobs=True, top_logprobs=5)
    for prompt, completion in zip(prompts, completions):
        _check(completion, hf, prompt, 5)
        # greedy: the sampled token is the top one, and its logprob is output_logprobs'
        assert [alt[0][0] for alt in completion.top_logprobs] == completion.token_ids
        assert [alt[0][1] for alt in completion.top_logprobs] == pytest.approx(completion.logprobs, abs=1e-6)


def test_per_row_k_and_sampled_rows(checkpoint):
    """Each row keeps its own K (0: none); a sampled (not greedy) path is scored the same way."""
    model, hf = checkpoint
    prompts = _prompts()
    params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=i) for i in range(len(prompts))]
    completions, _ = generate(model, prompts, params, stop_token_ids=[], top_logprobs=[3, 0, 20], slots=2)
    assert completions[1].top_logprobs is None
    _check(completions[0], hf, prompts[0], 3)
    _check(completions[2], hf, prompts[2], 20)


class _OnlyTokens:
    """A constraint allowing a fixed handful of tokens: the mask moves the samples, not the alternatives."""

    def __init__(self, allowed: list[int]):
        self.allowed = torch.tensor(allowed)

    def prepare(self, rows):
        pass

    def apply(self, logits, rows):
        keep = logits[:, self.allowed].clone()
        logits.fill_(float("-inf"))
        logits[:, self.allowed] = keep

    def advance(self, tokens, rows):
        pass


def test_alternatives_are_the_raw_distribution_under_a_mask(checkpoint):
    model, hf = checkpoint
    prompts = _prompts()
    allowed = [17, 4242, 90001]
    params = [SamplingParams(max_tokens=NEW_TOKENS)] * len(prompts)
    completions, _ = generate(model, prompts, params, [], constraint=_OnlyTokens(allowed), top_logprobs=4)
    for prompt, completion in zip(prompts, completions):
        assert set(completion.token_ids) <= set(allowed)
        _check(completion, hf, prompt, 4)


def test_top_logprobs_are_checked(checkpoint):
    model, _ = checkpoint
    with pytest.raises(ValueError, match="top_logprobs"):
        generate(model, _prompts(), [SamplingParams(max_tokens=2)] * 3, [], top_logprobs=[1, 2])


def test_masked_distribution_is_the_raw_one_renormalised_over_the_allowed_tokens(checkpoint):
    model, hf = checkpoint
    prompts = _prompts()
    allowed = [17, 4242, 90001]
    params = [SamplingParams(max_tokens=NEW_TOKENS)] * len(prompts)
    completions, _ = generate(model, prompts, params, [], constraint=_OnlyTokens(allowed), logprobs=True,
                              top_logprobs=5, masked_logprobs=True)
    for prompt, completion in zip(prompts, completions):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + completion.token_ids])).logits[0].float()
        steps = logits[len(prompt) - 1 : len(prompt) + NEW_TOKENS - 1]
        renormalised = torch.log_softmax(steps[:, allowed], -1)  # over the allowed tokens only
        for position, alternatives in enumerate(completion.top_logprobs):
            assert len(alternatives) == len(allowed)  # K=5, but only three tokens are allowed: no -inf entries
            expected = {t: float(renormalised[position, n]) for n, t in enumerate(allowed)}
            assert {t for t, _ in alternatives} == set(allowed)
            assert all(abs(v - expected[t]) <= 1e-3 for t, v in alternatives)
            token = completion.token_ids[position]
            assert abs(completion.logprobs[position] - expected[token]) <= 1e-3
