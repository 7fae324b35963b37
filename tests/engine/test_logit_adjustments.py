"""logit_bias and presence/frequency penalties: the engine function against OpenAI's definition
computed token by token, and their effect in generate() on the tiny model."""

import pytest
import torch

from ossbatch.engine.generate import Outputs, RowSettings, SamplingParams, generate, sample_and_stop
from ossbatch.engine.model import Transformer
from ossbatch.engine.sampling import adjust_logits
from ossbatch.engine.tiny_model import preset_config, write_random_checkpoint

V = 50


def _direct(logits, generated, presence, frequency, bias):
    """OpenAI's definition, one token at a time: mu[j] - c[j] * frequency - (c[j] > 0) * presence + bias[j]."""
    out = logits.clone()
    for j in range(logits.shape[-1]):
        c = generated.count(j)
        out[j] = out[j] - c * frequency - (1.0 if c > 0 else 0.0) * presence + bias.get(j, 0.0)
    return out


def test_adjust_logits_is_openais_definition():
    gen = torch.Generator().manual_seed(3)
    params = [
        SamplingParams(max_tokens=8, presence_penalty=0.5, frequency_penalty=0.25, logit_bias={3: -100.0, 7: 2.5}),
        SamplingParams(max_tokens=8),  # untouched
        SamplingParams(max_tokens=8, frequency_penalty=-1.5),
        SamplingParams(max_tokens=8, presence_penalty=2.0, logit_bias={0: 100.0}),
    ]
    settings = RowSettings(params)
    history = {0: [3, 5, 5, 5, 9], 1: [1, 1], 2: [4, 4, 8], 3: []}
    outputs = Outputs(len(params), 8, logprobs=False)
    for row, tokens in history.items():
        outputs.tokens[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        outputs.count[row] = len(tokens)
    live = torch.tensor([2, 0, 3, 1])  # the step's rows, not in batch order
    logits = torch.randn(len(live), V, generator=gen)
    before = logits.clone()
    adjusted = adjust_logits(logits, live, settings.presence, settings.frequency, settings.bias, outputs.tokens, outputs.count)
    assert torch.equal(logits, before)  # the raw logits are left as they were
    for k, row in enumerate(live.tolist()):
        p = params[row]
        expected = _direct(before[k], history[row], p.presence_penalty, p.frequency_penalty, p.logit_bias)
        assert torch.allclose(adjusted[k], expected), row
    # Into a mask's buffer: the same values, written there, the raw logits still untouched.
    buffer = torch.full((len(live) + 2, V), float("nan"))
    into = adjust_logits(logits, live, settings.presence, settings.frequency, settings.bias, outputs.tokens, outputs.count,
                         out=buffer[: len(live)])
    assert into.data_ptr() == buffer.data_ptr() and torch.equal(into, adjusted) and torch.equal(logits, before)


def test_nothing_asked_returns_the_logits_themselves():
    settings = RowSettings([SamplingParams(max_tokens=4)] * 2)
    outputs = Outputs(2, 4, logprobs=False)
    logits = torch.randn(2, V)
    assert adjust_logits(logits, torch.tensor([0, 1]), settings.presence, settings.frequency, settings.bias,
                         outputs.tokens, outputs.count) is logits
    buffer = torch.zeros(2, V)  # a mask's buffer still gets them, copied
    into = adjust_logits(logits, torch.tensor([0, 1]), settings.presence, settings.frequency, settings.bias,
                         outputs.tokens, outputs.count, out=buffer)
    assert into.data_ptr() == buffer.data_ptr() and torch.equal(buffer, logits)


def test_bias_steers_sampling_but_logprobs_stay_raw():
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(5))
    greedy = logits.argmax(-1)
    forced = (greedy + 1) % V
    params = [SamplingParams(max_tokens=4, logit_bias={int(greedy[0]): -100.0}),
              SamplingParams(max_tokens=4, logit_bias={int(forced[1]): 100.0})]
    settings, outputs = RowSettings(params), Outputs(2, 4, logprobs=True)
    sample_and_stop(logits.clone(), torch.tensor([0, 1]), settings, outputs, torch.tensor([V + 1]), None, None)
    tokens = outputs.tokens[:, 0]
    assert tokens[0] != greedy[0] and tokens[0] == logits[0].topk(2).indices[1]  # the runner-up
    assert tokens[1] == forced[1]
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(outputs.logprobs[:, 0], raw[[0, 1], tokens])  # the model's, not the biased ones


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    checkpoint = write_random_checkpoint(tmp_path_factory.mktemp("bias"), preset_config("tiny"), seed=4)
    return Transformer.from_checkpoint(checkpoint, torch.float32)


def test_logit_bias_minus_100_changes_the_greedy_token(model):
    prompt = [200006, 1428, 200008, 4827, 200007, 200006, 173781]
    (plain,), _ = generate(model, [prompt], [SamplingParams(max_tokens=6)], stop_token_ids=[200002])
    first = plain.token_ids[0]
    (biased,), _ = generate(model, [prompt], [SamplingParams(max_tokens=6, logit_bias={first: -100.0})], stop_token_ids=[200002])
    assert biased.token_ids[0] != first
    assert first not in biased.token_ids  # -100 bans it at every step


def test_frequency_penalty_cuts_repeats(model):
    prompt = [200006, 1428, 200008, 4827, 200007, 200006, 173781]
    (plain,), _ = generate(model, [prompt], [SamplingParams(max_tokens=24)], stop_token_ids=[200002])
    repeats = len(plain.token_ids) - len(set(plain.token_ids))
    assert repeats > 0, "the tiny model's greedy output repeats itself: what the penalty is for"
    (penalised,), _ = generate(model, [prompt], [SamplingParams(max_tokens=24, frequency_penalty=2.0, presence_penalty=2.0)],
                               stop_token_ids=[200002])
    assert len(penalised.token_ids) - len(set(penalised.token_ids)) < repeats
