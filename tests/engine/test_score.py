"""Teacher-forced scoring of continuations against transformers' GptOssForCausalLM in float32:
each candidate's summed logprob within 1e-3, for candidates of one and several tokens, two sharing
their first tokens, contexts past the sliding window, and several requests batched together."""

import pytest
import torch

from ossbatch.engine.model import Transformer
from ossbatch.engine.score import ScoreRequest, score_continuations
from ossbatch.engine.tiny_model import preset_config, write_random_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=[dict(sliding_window=4), dict(num_hidden_layers=3, sliding_window=6,
                                                                          num_key_value_heads=1, head_dim=8)])
def checkpoint(request, tmp_path_factory):
    config = preset_config("tiny", **request.param)
    path = write_random_checkpoint(tmp_path_factory.mktemp("score"), config, seed=5)
    hf = transformers.GptOssForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    return Transformer.from_checkpoint(path, torch.float32), hf


def _hf_score(hf, context: list[int], candidate: list[int]) -> float:
    with torch.no_grad():
        logits = hf(torch.tensor([context + candidate])).logits[0].float()
    logprobs = torch.log_softmax(logits[len(context) - 1 : -1], -1)
    return float(logprobs[torch.arange(len(candidate)), torch.tensor(candidate)].double().sum())


def _requests() -> list[ScoreRequest]:
    gen = torch.Generator().manual_seed(4)
    context = lambda n: torch.randint(0, 200000, (n,), generator=gen).tolist()  # noqa: E731
    return [
        # one token; several; two sharing their first two tokens; one a prefix of another
        ScoreRequest(context(13), [[501], [7, 8, 9], [7, 8, 120000], [7, 8]]),
        ScoreRequest(context(1), [[42], [43]]),  # a one-token context
        ScoreRequest(context(20), [[3, 1, 4, 1, 5, 9, 2, 6], [3, 1, 4], [199000]]),
    ]


def test_scores_equal_transformers(checkpoint):
    model, hf = checkpoint
    requests = _requests()
    scores = score_continuations(model, requests)
    for request, got in zip(requests, scores):
        expected = [_hf_score(hf, request.context, c) for c in request.candidates]
        assert got == pytest.approx(expected, abs=1e-3)
    # the shared-first-token pair differ only in their last token, and are told apart
    assert abs(scores[0][1] - scores[0][2]) > 1e-4


def test_small_passes_give_the_same_scores(checkpoint):
    """Chunked into passes of a few tokens (one request, a few tail rows, at a time): the same numbers."""
    model, _ = checkpoint
    requests = _requests()
    whole = score_continuations(model, requests)
    chunked = score_continuations(model, requests, max_tokens=8)
    for a, b in zip(whole, chunked):
        assert a == pytest.approx(b, abs=1e-5)


def test_bad_requests_are_refused(checkpoint):
    model, _ = checkpoint
    with pytest.raises(ValueError, match="score request 1"):
        score_continuations(model, [ScoreRequest([1], [[2]]), ScoreRequest([1], [[2], []])])
