"""ossbatch.pipeline.masks: BatchConstraint through the engine's protocol (prepare/apply/advance over a step's rows)."""

import json
import math

import pytest
import torch

from ossbatch.pipeline.grammar import compile_row_grammar
from ossbatch.pipeline.harmony import CHANNEL, MESSAGE, RETURN, TOKENIZER_VOCAB_SIZE, harmony_encoding
from ossbatch.pipeline.masks import BatchConstraint, banned_numpy, banned_torch

LABEL = json.dumps({
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
    "required": ["label"],
    "additionalProperties": False,
})


def _walk(bc, row_tokens, batch):
    """Feed fixed token sequences through prepare/apply/advance, each row in the steps until its
    tokens run out (as the engine leaves a finished row out); return each step's logits by batch row."""
    seen = []
    for step in range(max(len(t) for t in row_tokens)):
        rows = [i for i, t in enumerate(row_tokens) if step < len(t)]
        bc.prepare(rows)
        step_logits = torch.zeros(len(rows), TOKENIZER_VOCAB_SIZE + 64)
        bc.apply(step_logits, rows)
        logits = torch.zeros(batch, TOKENIZER_VOCAB_SIZE + 64)
        logits[rows] = step_logits
        seen.append(logits)
        bc.advance(torch.tensor([row_tokens[i][step] for i in rows]), rows)
    return seen


def test_masks_forced_header_and_untouched_rows():
    enc = harmony_encoding()
    g = compile_row_grammar(LABEL, None)
    answer = [CHANNEL] + enc.encode("final") + [MESSAGE] + enc.encode('{"label":"neutral"}') + [RETURN]
    free = enc.encode("anything at all, unconstrained")
    bc = BatchConstraint([g, None, g], TOKENIZER_VOCAB_SIZE + 64)
    seen = _walk(bc, [answer, free, answer[:3]], 3)
    first = seen[0]
    assert torch.isfinite(first[0]).sum() == 1 and first[0, CHANNEL] == 0  # only <|channel|>
    assert torch.equal(first[1], torch.zeros_like(first[1]))  # unconstrained row untouched
    assert torch.isinf(first[0, TOKENIZER_VOCAB_SIZE:]).all()  # padded vocab masked
    # row 2 left the steps after its 3 tokens: masked while in them, never touched again
    assert not torch.equal(seen[2][2], torch.zeros_like(seen[2][2]))
    assert all(torch.equal(s[2], torch.zeros_like(s[2])) for s in seen[3:])
    last = seen[len(answer) - 1]
    assert torch.isfinite(last[0]).sum() == 1 and last[0, RETURN] == 0  # only <|return|> after the JSON
    assert bc.errors() == [None, None, None]


def test_rejected_token_fails_row_and_forces_return():
    enc = harmony_encoding()
    g = compile_row_grammar(LABEL, None)
    bc = BatchConstraint([g, g], TOKENIZER_VOCAB_SIZE)
    bc.prepare([0, 1])
    bc.apply(torch.zeros(2, TOKENIZER_VOCAB_SIZE), [0, 1])
    bad = enc.encode("hello")[0]
    bc.advance(torch.tensor([bad, CHANNEL]), [0, 1])
    errs = bc.errors()
    assert errs[0] is not None and "rejected" in errs[0] and str(bad) in errs[0] and "at token 1:" in errs[0]
    assert errs[1] is None
    bc.prepare([0, 1])
    logits = torch.zeros(2, TOKENIZER_VOCAB_SIZE)
    bc.apply(logits, [0, 1])
    assert torch.isfinite(logits[0]).sum() == 1 and logits[0, RETURN] == 0
    assert torch.isfinite(logits[1]).sum() > 1  # "analysis"/"final" prefixes


def test_vocab_checks():
    g = compile_row_grammar(LABEL, None)
    with pytest.raises(ValueError, match="smaller"):
        BatchConstraint([g], 1000)
    bc = BatchConstraint([g, None], TOKENIZER_VOCAB_SIZE)
    bc.prepare([0, 1])
    with pytest.raises(ValueError, match=r"\[2, V\]"):
        bc.apply(torch.zeros(3, TOKENIZER_VOCAB_SIZE), [0, 1])


def test_all_unconstrained_is_a_no_op():
    bc = BatchConstraint([None, None], TOKENIZER_VOCAB_SIZE)
    logits = torch.randn(2, TOKENIZER_VOCAB_SIZE)
    before = logits.clone()
    bc.prepare([0, 1])
    bc.apply(logits, [0, 1])
    bc.advance(torch.tensor([1, 2]), [0, 1])
    assert torch.equal(logits, before)
    assert bc.errors() == [None, None]


def test_half_precision_logits():
    g = compile_row_grammar(LABEL, None)
    bc = BatchConstraint([g], TOKENIZER_VOCAB_SIZE)
    bc.prepare([0])
    logits = torch.zeros(1, TOKENIZER_VOCAB_SIZE, dtype=torch.bfloat16)
    bc.apply(logits, [0])
    assert logits[0, CHANNEL] == 0 and logits[0, 0] == -math.inf


def test_bitmask_unpacking_numpy_and_torch_agree():
    """apply() unpacks with numpy for CPU logits and with torch ops on a GPU: same bits."""
    gen = torch.Generator().manual_seed(3)
    vocab = 201088
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, vocab // 32), dtype=torch.int32, generator=gen)
    bitmask[0, 0] = 0b101  # tokens 0 and 2 allowed, 1 and 3..31 not
    bitmask[1, -1] = -(2**31)  # only the last token of the last word allowed
    a = banned_numpy(bitmask, vocab)
    b = banned_torch(bitmask, vocab)
    assert a.shape == b.shape == (3, vocab) and torch.equal(a, b)
    assert a[0, :4].tolist() == [False, True, False, True]
    assert not a[1, -1] and a[1, -32:-1].all()
    assert torch.equal(banned_numpy(bitmask, 1000), a[:, :1000])


def test_rows_of_a_step_mask_and_advance_only_those_rows():
    """Logits hold just the step's rows (in any order); rows not listed keep their state."""
    enc = harmony_encoding()
    g = compile_row_grammar(LABEL, None)
    bc = BatchConstraint([g, None, g, g], TOKENIZER_VOCAB_SIZE + 64)
    bc.prepare([3, 1])
    logits = torch.zeros(2, TOKENIZER_VOCAB_SIZE + 64)
    bc.apply(logits, [3, 1])
    assert torch.isfinite(logits[0]).sum() == 1 and logits[0, CHANNEL] == 0  # row 3: only <|channel|>
    assert torch.equal(logits[1], torch.zeros_like(logits[1]))  # row 1: unconstrained
    bc.advance(torch.tensor([CHANNEL, 5]), rows=[3, 1])
    # Row 3 moved on to the channel name; rows 0 and 2 (not yet in a step) still start at <|channel|>.
    bc.prepare([0, 3])
    logits = torch.zeros(2, TOKENIZER_VOCAB_SIZE + 64)
    bc.apply(logits, [0, 3])
    assert torch.isfinite(logits[0]).sum() == 1 and logits[0, CHANNEL] == 0
    assert logits[1, CHANNEL] == -math.inf and logits[1, enc.encode("final")[0]] == 0
    assert bc.errors() == [None] * 4
