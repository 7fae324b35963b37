"""Scoring continuations as rows finish (`generate(continuations=...)`): each finished row's
candidates are scored from its own KV slot (and the shared prefix it read) before the slot is
reused, and the scores equal `score_continuations` on the same context (|Δ| <= 1e-5), which is
itself checked against transformers (tests/engine/test_score.py). Generation is unchanged by it,
and no context is prefilled again."""

import pytest
import torch

from ossbatch.engine.generate import Continuations, SamplingParams, SharedPrefix, generate
from ossbatch.engine.model import Transformer
from ossbatch.engine.score import ScoreRequest, score_continuations
from ossbatch.engine.tiny_model import preset_config, write_random_checkpoint

WINDOW = 6


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    config = preset_config("tiny", num_hidden_layers=3, sliding_window=WINDOW)  # windowed, full, windowed
    return Transformer.from_checkpoint(write_random_checkpoint(tmp_path_factory.mktemp("score-gen"), config, seed=3),
                                       torch.float32)


def _tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 200000, (n,), generator=gen).tolist()


def _batch(nested: bool):
    """Rows under two prefixes (one longer than the window, one the whole of a row's prompt), under a
    common root of both when `nested`, a one-token prompt, and a row sharing nothing."""
    gen = torch.Generator().manual_seed(7)
    root = _tokens(gen, 16) if nested else []
    short, long = root + _tokens(gen, 4), root + _tokens(gen, 3 * WINDOW)
    prompts = [short + _tokens(gen, 3), long + _tokens(gen, 2), short + _tokens(gen, 9), long, _tokens(gen, 1),
               long + _tokens(gen, 5), _tokens(gen, 7)]
    shared = [SharedPrefix((0, 2), len(short)), SharedPrefix((1, 3, 5), len(long))]
    return prompts, shared


def _ask(gen_seed: int):
    """Per finished row: score after a row-dependent share of its tokens (none, some, all); candidates
    of one and several tokens, two sharing their first tokens. Row 6 asks for nothing."""
    gen = torch.Generator().manual_seed(gen_seed)
    shared_start = _tokens(gen, 2)
    candidates = [[501], shared_start + [9], shared_start + [120000], _tokens(gen, 4)]
    asked = {}

    def continuations(row: int, tokens: list[int], finish_reason: str):
        assert finish_reason == "length"
        if row == 6:
            return None
        asked[row] = Continuations([0, len(tokens) // 2, len(tokens)][row % 3], candidates)
        return asked[row]

    return continuations, asked


@pytest.mark.parametrize("nested", [False, True], ids=["two-prefixes", "root-above-prefixes"])
@pytest.mark.parametrize("slots", [None, 3], ids=["a-slot-each", "refilled"])
def test_scores_equal_scoring_the_context_afresh(model, nested, slots):
    prompts, shared = _batch(nested)
    params = [SamplingParams(max_tokens=2 + (3 * i) % 7, temperature=0.8, seed=i) for i in range(len(prompts))]
    plain, plain_stats = generate(model, prompts, params, [], logprobs=True, shared_prefixes=shared, slots=slots)
    continuations, asked = _ask(1)
    scored, stats = generate(model, prompts, params, [], logprobs=True, shared_prefixes=shared, slots=slots,
                             continuations=continuations)
    for row, (a, b) in enumerate(zip(plain, scored)):  # generation is not disturbed
        assert b.token_ids == a.token_ids and b.logprobs == pytest.approx(a.logprobs, abs=1e-6), f"row {row}"
    assert stats.prompt_computed == plain_stats.prompt_computed  # no context computed twice
    assert scored[6].continuation_logprobs is None and sorted(asked) == [0, 1, 2, 3, 4, 5]
    requests = [ScoreRequest(prompts[row] + scored[row].token_ids[: asked[row].after], asked[row].candidates) for row in asked]
    for row, expected in zip(asked, score_continuations(model, requests)):
        assert scored[row].continuation_logprobs == pytest.approx(expected, abs=1e-5), f"row {row}"
    # the two candidates sharing their first tokens are told apart
    assert abs(scored[0].continuation_logprobs[1] - scored[0].continuation_logprobs[2]) > 1e-4


def test_a_bad_continuation_names_its_row(model):
    prompts, _ = _batch(False)
    params = [SamplingParams(max_tokens=3)] * len(prompts)
    with pytest.raises(ValueError, match="row 2: continuations need"):
        generate(model, prompts, params, [], continuations=lambda row, tokens, _: Continuations(len(tokens) + (row == 2), [[1]]))
    with pytest.raises(ValueError, match="row 0: continuations need"):
        generate(model, prompts, params, [], continuations=lambda row, tokens, _: Continuations(0, [[1], []]))
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=f"row 0: continuations need .* token ids below {vocab}"):
        generate(model, prompts, params, [], continuations=lambda row, tokens, _: Continuations(0, [[1], [vocab]]))
