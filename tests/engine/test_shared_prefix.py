"""Shared-prefix batches: rows that begin with the same tokens prefill the prefix
once, store its KV once and read it through cascade attention, and every row's
greedy tokens and logprobs are what it gets without sharing (|Δ| <= 1e-5) and
what transformers gives (<= 1e-3)."""

import pytest
import torch

from ossbatch.engine.generate import MIN_ROOT_TOKENS, Continuations, SamplingParams, SharedPrefix, generate
from ossbatch.engine.model import Transformer
from ossbatch.engine.tiny_model import preset_config, write_random_checkpoint

WINDOW = 6
NEW_TOKENS = 8


def _tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, 200000, (n,), generator=gen).tolist()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = preset_config("tiny", num_hidden_layers=3, sliding_window=WINDOW)  # windowed, full, windowed
    return write_random_checkpoint(tmp_path_factory.mktemp("shared-prefix"), config, seed=11)


@pytest.fixture(scope="module")
def model(checkpoint):
    return Transformer.from_checkpoint(checkpoint, torch.float32)


def _batch(seed: int):
    """Two prefixes (one shorter, one longer than the window), their rows' own items (one row's
    prompt is its whole prefix), and a row that shares nothing."""
    gen = torch.Generator().manual_seed(seed)
    short, long = _tokens(gen, WINDOW - 2), _tokens(gen, 3 * WINDOW + 1)
    prompts = [short + _tokens(gen, 3), long + _tokens(gen, 2), short + _tokens(gen, 9), long,
               _tokens(gen, 7), long + _tokens(gen, 11), short + _tokens(gen, 1)]
    shared = [SharedPrefix((0, 2, 6), len(short)), SharedPrefix((1, 3, 5), len(long))]
    return prompts, shared


def _assert_same(expected, actual, tolerance=1e-5):
    for row, (a, b) in enumerate(zip(expected, actual)):
        assert b.token_ids == a.token_ids, f"row {row}"
        assert b.finish_reason == a.finish_reason, f"row {row}"
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= tolerance, f"row {row}"


def test_sharing_gives_every_row_its_unshared_tokens(model):
    prompts, shared = _batch(1)
    params = [SamplingParams(max_tokens=NEW_TOKENS)] * len(prompts)
    alone, alone_stats = generate(model, prompts, params, [], logprobs=True)
    together, stats = generate(model, prompts, params, [], logprobs=True, shared_prefixes=shared)
    _assert_same(alone, together)
    long_len = len(prompts[3]) - 1  # row 3's prompt is the whole prefix: the prefix stops a token short
    assert [c.cached_prompt_tokens for c in together] == [WINDOW - 2, long_len, WINDOW - 2, long_len, 0, long_len, WINDOW - 2]
    unique = sum(len(p) for p in prompts) - 2 * (WINDOW - 2) - 2 * long_len
    assert stats.prompt_computed == unique < alone_stats.prompt_computed == alone_stats.prompt_tokens
    assert stats.kv_cache_bytes < alone_stats.kv_cache_bytes
    assert stats.kv_bytes_saved == alone_stats.kv_cache_bytes - stats.kv_cache_bytes and alone_stats.kv_bytes_saved == 0
    assert stats.decode_slots == alone_stats.decode_slots
    assert stats.padded_prompt_slots >= stats.prompt_computed  # the prefixes' prefill is counted too


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_rows_refilled_into_a_sharing_run(model, temperature):
    """Three slots for seven rows: rows of a prefix are admitted into freed slots after the
    prefix was prefilled, next to rows of another prefix or none."""
    prompts, shared = _batch(2)
    params = [SamplingParams(max_tokens=2 + (3 * i) % NEW_TOKENS, temperature=temperature, seed=i) for i in range(len(prompts))]
    groups = [[0, 1, 2], [3, 4], [5, 6]]
    static, _ = generate(model, prompts, params, [], logprobs=True, prefill_groups=groups)
    refilled, stats = generate(model, prompts, params, [], logprobs=True, prefill_groups=groups, slots=3, shared_prefixes=shared)
    _assert_same(static, refilled)
    assert stats.steps > max(p.max_tokens for p in params)  # refill really happened


def test_n_samples_of_one_prompt(model):
    """n rows over one whole prompt, each its own seed: one prefill of the prompt, n streams."""
    prompt = _tokens(torch.Generator().manual_seed(3), 2 * WINDOW)
    params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=s) for s in range(4)]
    alone, _ = generate(model, [prompt] * 4, params, [], logprobs=True)
    shared, stats = generate(model, [prompt] * 4, params, [], logprobs=True, shared_prefixes=[SharedPrefix((0, 1, 2, 3), len(prompt))])
    _assert_same(alone, shared)
    assert len({tuple(c.token_ids) for c in shared}) > 1
    assert stats.prompt_computed == len(prompt) - 1 + 4


class _EveryThirdToken:
    """A stand-in for structured outputs: row r may only emit tokens t with t % 3 == r % 3."""

    def __init__(self):
        self.seen: list[list[int]] = []

    def prepare(self, rows):
        pass

    def apply(self, logits, rows):
        allowed = torch.arange(logits.shape[1])[None, :] % 3 == torch.tensor(rows)[:, None] % 3
        logits.masked_fill_(~allowed, float("-inf"))

    def advance(self, tokens, rows):
        self.seen.append(rows)


def test_constrained_rows_share_as_unconstrained_ones_do(model):
    prompts, shared = _batch(7)
    params = [SamplingParams(max_tokens=NEW_TOKENS)] * len(prompts)
    alone, _ = generate(model, prompts, params, [], logprobs=True, constraint=_EveryThirdToken(), slots=4)
    together, _ = generate(model, prompts, params, [], logprobs=True, constraint=_EveryThirdToken(), slots=4, shared_prefixes=shared)
    _assert_same(alone, together)
    assert all(t % 3 == row % 3 for row, c in enumerate(together) for t in c.token_ids)


def test_shared_prefix_is_checked(model):
    prompts, _ = _batch(4)
    params = [SamplingParams(max_tokens=2)] * len(prompts)
    with pytest.raises(ValueError, match=r"row 4's prompt does not begin with the prefix"):
        generate(model, prompts, params, [], shared_prefixes=[SharedPrefix((0, 4), 3)])
    with pytest.raises(ValueError, match=r"row 2 is named by more than one shared prefix"):
        generate(model, prompts, params, [], shared_prefixes=[SharedPrefix((0, 2), 2), SharedPrefix((2, 6), 2)])
    with pytest.raises(ValueError, match=r"row 9 is not a row of this batch"):
        generate(model, prompts, params, [], shared_prefixes=[SharedPrefix((0, 9), 2)])


def test_sharing_equals_transformers(checkpoint, model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.GptOssForCausalLM.from_pretrained(
        checkpoint, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    prompts, shared = _batch(5)
    completions, _ = generate(model, prompts, [SamplingParams(max_tokens=NEW_TOKENS)] * len(prompts), [], logprobs=True,
                              shared_prefixes=shared)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
        assert completion.token_ids == tokens, f"row {row}"
        assert max(abs(a - b) for a, b in zip(completion.logprobs, logprobs)) <= 1e-3, f"row {row}"


TRITON_SCRIPT = """
import json, sys, torch
from ossbatch.engine.generate import MIN_ROOT_TOKENS, Continuations, SamplingParams, SharedPrefix, generate
from ossbatch.engine.model import Transformer
prompts, shared, candidates = json.loads(sys.argv[2])
score = lambda row, tokens, _: Continuations(len(tokens) // 2, candidates)  # noqa: E731
shared = [SharedPrefix(tuple(rows), length) for rows, length in shared]
params = [SamplingParams(max_tokens=5)] * len(prompts)
model = Transformer.from_checkpoint(sys.argv[1], torch.float32, backend="triton")
out = {}
half = [list(range(4)), list(range(4, len(prompts)))]
for name, kwargs in (("alone", {}), ("shared", dict(shared_prefixes=shared, slots=4, prefill_groups=half, continuations=score))):
    completions, _ = generate(model, prompts, params, [], logprobs=True, **kwargs)
    out[name] = [(c.token_ids, c.logprobs, c.continuation_logprobs) for c in completions]
print(json.dumps(out))
"""


@pytest.mark.parametrize("nested", [False, True], ids=["two-prefixes", "header-above-prefixes"])
def test_triton_backend_shares_as_torch_does(checkpoint, model, nested):
    """The Triton backend under the interpreter (a subprocess: the interpreter is chosen at import),
    scoring continuations from the finished rows' slots as the torch backend does."""
    import json
    import os
    import subprocess
    import sys

    prompts, shared = _header_batch(6, MIN_ROOT_TOKENS)[:2] if nested else _batch(6)
    candidates = [[1, 2], [1, 3], [40]]  # scored after half of each row's tokens
    arg = json.dumps([prompts, [[list(s.rows), s.length] for s in shared], candidates])
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT, str(checkpoint), arg], capture_output=True, text=True,
                          env=os.environ | {"TRITON_INTERPRET": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    torch_rows, _ = generate(model, prompts, [SamplingParams(max_tokens=5)] * len(prompts), [], logprobs=True,
                             continuations=lambda row, tokens, _: Continuations(len(tokens) // 2, candidates))
    for row, ((alone_tokens, alone_lp, _), (shared_tokens, shared_lp, shared_scores), expected) in enumerate(
            zip(result["alone"], result["shared"], torch_rows)):
        assert shared_tokens == alone_tokens == expected.token_ids, f"row {row}"
        assert shared_scores == pytest.approx(expected.continuation_logprobs, abs=1e-4), f"row {row}"
        assert max(abs(a - b) for a, b in zip(alone_lp, shared_lp)) <= 1e-5, f"row {row}"
        assert max(abs(a - b) for a, b in zip(expected.logprobs, shared_lp)) <= 1e-3, f"row {row}"


def test_prefix_is_stored_once_and_windowed_layers_keep_the_tail():
    from ossbatch.engine.kv_cache import KVCache, PrefixKV

    config = preset_config("tiny", num_hidden_layers=2, sliding_window=4)  # layer 0 windowed, layer 1 full
    store = PrefixKV(config, [9, 2], torch.float32)
    assert store.k[0].shape[:2] == (2, 3) and store.k[1].shape[:2] == (2, 9)
    assert store.start[0].tolist() == [6, 0] and store.start[1].tolist() == [0, 0]
    filled = KVCache.for_model(config, 2, 9, torch.float32)
    for layer in range(2):
        filled.k[layer][:] = torch.arange(9, dtype=torch.float32)[None, :, None, None]
    store.store([0, 1], filled)
    assert store.k[0][0, :, 0, 0].tolist() == [6, 7, 8]  # positions 6..8: all a query at 9+ sees through a window of 4
    assert store.k[1][0, :, 0, 0].tolist() == list(range(9)) and store.k[1][1, :2, 0, 0].tolist() == [0, 1]


def _header_batch(seed: int, header_len: int):
    """A job-wide header above three prompts, each sampled by several rows (synth --n over a
    shared developer message): the prompts are the shared prefixes, the header their common root."""
    gen = torch.Generator().manual_seed(seed)
    header = _tokens(gen, header_len)
    items = [header + _tokens(gen, n) for n in (3, 2 * WINDOW, 5)]
    prompts = [items[0]] * 3 + [items[1]] * 2 + [items[2] + _tokens(gen, 2)] + [items[2] + _tokens(gen, 4)] + [_tokens(gen, 6)]
    shared = [SharedPrefix((0, 1, 2), len(items[0])), SharedPrefix((3, 4), len(items[1])), SharedPrefix((5, 6), len(items[2]))]
    return prompts, shared, header


@pytest.mark.parametrize("header_len", [MIN_ROOT_TOKENS, 3 * MIN_ROOT_TOKENS])
def test_a_header_above_the_prefixes_is_computed_once(model, header_len):
    """Nested prefixes: the prefixes' common root is prefilled once; each prefix computes only what
    follows it (slots refilled, sampled rows), and every row's tokens are its unshared tokens."""
    prompts, shared, header = _header_batch(8, header_len)
    params = [SamplingParams(max_tokens=NEW_TOKENS, temperature=0.8, seed=i) for i in range(len(prompts))]
    alone, _ = generate(model, prompts, params, [], logprobs=True)
    together, stats = generate(model, prompts, params, [], logprobs=True, shared_prefixes=shared, slots=5)
    _assert_same(alone, together)
    prefix_lengths = [min(s.length, *(len(prompts[r]) - 1 for r in s.rows)) for s in shared]
    own = sum(len(prompts[r]) - n for s, n in zip(shared, prefix_lengths) for r in s.rows) + len(prompts[7])
    assert stats.prompt_computed == len(header) + sum(n - len(header) for n in prefix_lengths) + own


def test_no_root_when_prefixes_share_little(model):
    prompts, shared, header = _header_batch(9, MIN_ROOT_TOKENS - 1)
    params = [SamplingParams(max_tokens=3)] * len(prompts)
    alone, _ = generate(model, prompts, params, [], logprobs=True)
    together, stats = generate(model, prompts, params, [], logprobs=True, shared_prefixes=shared)
    _assert_same(alone, together)
    prefix_lengths = [min(s.length, *(len(prompts[r]) - 1 for r in s.rows)) for s in shared]
    assert stats.prompt_computed == sum(prefix_lengths) + sum(len(prompts[r]) - n for s, n in zip(shared, prefix_lengths) for r in s.rows) + len(prompts[7])


def test_a_child_prefix_stores_only_its_own_keys():
    """A prefix that continues another holds the positions past its parent's length (windowed
    layers: their tail); the parent's keys are stored once, in the parent."""
    from ossbatch.engine.kv_cache import KVCache, PrefixKV

    config = preset_config("tiny", num_hidden_layers=2, sliding_window=4)  # layer 0 windowed, layer 1 full
    store = PrefixKV(config, [12, 5], torch.float32, parents=[1, -1])  # prefix 0 (12 tokens) continues prefix 1 (5)
    assert store.begins.tolist() == [5, 0] and store.start[0].tolist() == [9, 2] and store.start[1].tolist() == [5, 0]
    parent = KVCache.for_model(config, 1, 5, torch.float32)
    child = KVCache.for_model(config, 1, 7, torch.float32)
    for layer in range(2):
        parent.k[layer][:] = torch.arange(5, dtype=torch.float32)[None, :, None, None]
        child.k[layer][:] = torch.arange(5, 12, dtype=torch.float32)[None, :, None, None]
    store.store([1], parent)
    store.store([0], child)
    assert store.k[1][0, :7, 0, 0].tolist() == list(range(5, 12)) and store.k[1][1, :5, 0, 0].tolist() == list(range(5))
    assert store.k[0][0, :, 0, 0].tolist() == [9, 10, 11] and store.k[0][1, :3, 0, 0].tolist() == [2, 3, 4]
    with pytest.raises(ValueError, match="longer than its parent"):
        PrefixKV(config, [5, 5], torch.float32, parents=[1, -1])


def test_a_finished_slot_is_gathered_with_its_whole_chain():
    """Scoring's copy of a row's context: the root's, its prefix's, then the slot's own positions."""
    from ossbatch.engine.kv_cache import KVCache, PrefixKV

    config = preset_config("tiny", num_hidden_layers=2, sliding_window=4)
    chain = PrefixKV(config, [6, 4], torch.float32, parents=[1, -1])  # root: 0..3, prefix: 4..5
    for layer in range(2):
        for p in range(2):
            kept = chain.k[layer].shape[1]
            chain.k[layer][p] = (torch.arange(kept) + chain.start[layer][p]).float()[:, None, None]
    slot = KVCache.for_model(config, 2, 5, torch.float32)
    for layer in range(2):
        slot.k[layer][1] = torch.arange(6, 11, dtype=torch.float32)[:, None, None]  # the row's own positions 6..10
    context = PrefixKV(config, [9], torch.float32)  # positions 0..8
    context.gather([0], slot, [1], chain, [0])
    assert context.k[1][0, :, 0, 0].tolist() == list(range(9))  # full layer: root, prefix, slot
    assert context.k[0][0, :, 0, 0].tolist() == [6, 7, 8]  # windowed: the tail
    short = PrefixKV(config, [7], torch.float32)  # positions 0..6: the window reaches back into the prefix
    short.gather([0], slot, [1], chain, [0])
    assert short.k[0][0, :, 0, 0].tolist() == [4, 5, 6]
