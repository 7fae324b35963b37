"""ossbatch.pipeline.constrain: tokenizer, response-format section, schema refusal, validation, batch protocol."""

import json
import math

import pytest
import torch
from openai_harmony import Conversation, DeveloperContent, Message, Role, SystemContent

from ossbatch.pipeline import constrain as C

LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
    "required": ["label"],
    "additionalProperties": False,
}
LABEL = json.dumps(LABEL_SCHEMA)


# ----------------------------------------------------------------------------- tokenizer


def test_special_token_ids_match_harmony(tokenizer):
    enc = C.harmony_encoding()
    expected = {"<|start|>": 200006, "<|end|>": 200007, "<|message|>": 200008, "<|channel|>": 200005,
                "<|return|>": 200002, "<|call|>": 200012, "<|constrain|>": 200003}
    for name, tid in expected.items():
        assert enc.encode(name, allowed_special="all") == [tid]
        assert tokenizer.is_special_token(tid)
        assert tokenizer.decode_bytes([tid]) == name.encode()
    assert tokenizer.vocab_size == C.TOKENIZER_VOCAB_SIZE == 201088
    assert tokenizer.eos_token == C.RETURN
    assert tokenizer is C.lltokenizer()  # built once


@pytest.mark.parametrize("text", ['{"label": "positive", "n": [1, 2.5e-3, null]}', "Grüße, 世界! \n\n  x\t=1",
                                  "The user asks: what's 2+2? We'll answer 4."])
def test_tokenizer_matches_harmony_encoding(tokenizer, text):
    enc = C.harmony_encoding()
    ids = enc.encode(text)
    assert tokenizer.tokenize_str(text) == ids
    assert tokenizer.decode_str(ids) == text


# ----------------------------------------------------------------------------- response format section


def test_response_format_section_layout():
    text = json.dumps(LABEL_SCHEMA, indent=2)
    section = C.response_format_section(text, "sentiment")
    assert section == ("# Response Formats\n\n## sentiment\n\n"
                       '{"type":"object","properties":{"label":{"enum":["positive","negative","neutral"]}},'
                       '"required":["label"],"additionalProperties":false}')
    assert C.response_format_section(text).startswith("# Response Formats\n\n## response\n\n{")


def test_response_format_section_description_comment():
    schema = {"description": "The sentiment\nof the review", "enum": ["a", "b"]}
    section = C.response_format_section(json.dumps(schema), "label")
    assert section.splitlines()[4] == "// The sentiment of the review"
    assert json.loads(section.splitlines()[5]) == schema


def test_response_format_section_renders_in_developer_message():
    enc = C.harmony_encoding()
    section = C.response_format_section(LABEL, "sentiment")
    dev = DeveloperContent.new().with_instructions("Label the review.\n\n" + section)
    convo = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, SystemContent.new()),
        Message.from_role_and_content(Role.DEVELOPER, dev),
        Message.from_role_and_content(Role.USER, "Great product!"),
    ])
    tokens = enc.render_conversation_for_completion(convo, Role.ASSISTANT)
    rendered = enc.decode(tokens)
    assert "<|start|>developer<|message|># Instructions\n\nLabel the review.\n\n# Response Formats\n\n## sentiment\n\n{" in rendered
    assert rendered.endswith("<|start|>assistant")


def test_response_format_section_refuses_non_json():
    with pytest.raises(C.SchemaRefused, match="not valid JSON"):
        C.response_format_section("{nope")


# ----------------------------------------------------------------------------- compile / refuse


def test_no_constraint_is_none():
    assert C.compile_row_grammar(None, None) is None


def test_strict_compile_and_cache():
    g = C.compile_row_grammar(LABEL, None)
    assert not g.lenient and g.strict_error is None
    assert "%json" in g.lark and "<|return|>" in g.lark
    assert C.compile_row_grammar(LABEL, None) is g  # cached per (schema, budget)
    assert C.compile_row_grammar(LABEL, 10) is not g


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"if": {"type": "string"}, "then": {"minLength": 2}, "else": {"type": "integer"}}, "if"),
    ({"type": "string", "format": "x-custom"}, "x-custom"),
])
def test_lenient_fallback(schema, keyword):
    g = C.compile_row_grammar(json.dumps(schema), None)
    assert g.lenient
    assert keyword in g.strict_error


@pytest.mark.parametrize("text, match", [
    ('{"type": "strin"}', r"invalid JSON Schema at type: .*strin"),
    ('{"type": "object", "properties": {"a": {"minLength": -1}}}', r"invalid JSON Schema at properties/a/minLength"),
    ('{"type": ', "not valid JSON"),
    ("[1, 2]", "must be an object or a boolean"),
    ('{"type": "number", "minimum": NaN}', "not valid JSON"),
    ("false", "accepts no value"),
    ('{"type": "string", "pattern": "(?<=a)b"}', "look-around"),
    ('{"type": "integer", "minimum": 5, "maximum": 1}', "Unsatisfiable"),
    ('{"type": "object", "patternProperties": {"a.*": {}, "ab.*": {"type": "integer"}}}', "not disjoint"),
])
def test_schema_refused_messages(text, match):
    with pytest.raises(C.SchemaRefused, match=match) as exc:
        C.compile_row_grammar(text, None)
    assert "\n" not in str(exc.value)  # llguidance's grammar listing is stripped
    with pytest.raises(C.SchemaRefused):  # the refusal is cached, and raised again
        C.compile_row_grammar(text, None)


@pytest.mark.parametrize("budget", [-1, 1.5, True, "10"])
def test_bad_reasoning_budget(budget):
    with pytest.raises(C.SchemaRefused, match="max_reasoning_tokens"):
        C.compile_row_grammar(None, budget)


def test_remote_ref_is_never_fetched(no_network):
    remote = json.dumps({"type": "object", "properties": {"a": {"$ref": "https://example.com/schemas/a.json"}}})
    with pytest.raises(C.SchemaRefused, match=r"remote schema reference 'https://example.com/schemas/a.json' .* never fetched"):
        C.compile_row_grammar(remote, None)
    assert C.validate_answer('{"a": 1}', remote) == ('{"a":1}', False)
    assert no_network == []
    # the guard is real: jsonschema's default validator would have tried to fetch it
    import jsonschema

    with pytest.raises(Exception):
        jsonschema.validate({"a": 1}, json.loads(remote))
    assert no_network, "the no-network guard did not see jsonschema's retrieval"


# ----------------------------------------------------------------------------- validate_answer


@pytest.mark.parametrize("text, schema, expected", [
    ('{"label": "positive"}', LABEL, ('{"label":"positive"}', True)),
    (' {"label":"meh"} ', LABEL, ('{"label":"meh"}', False)),
    ("not json", LABEL, (None, False)),
    ('{"label": "positive"} trailing', LABEL, (None, False)),
    ("NaN", None, (None, None)),
    ('{"x": Infinity}', LABEL, (None, False)),
    ('{"a": "é"}', None, ('{"a":"é"}', None)),
    ("free text answer", None, (None, None)),
    ("[1, 2]", '{"type": "array", "uniqueItems": true}', ("[1,2]", True)),
    ("[1, 1]", '{"type": "array", "uniqueItems": true}', ("[1,1]", False)),
    ('{"a": 1}', '{"type": "strin"}', ('{"a":1}', False)),
])
def test_validate_answer(text, schema, expected):
    assert C.validate_answer(text, schema) == expected


# ----------------------------------------------------------------------------- batch protocol


def _walk(bc, row_tokens, batch):
    """Feed fixed token sequences through prepare/apply/advance; return the logits of each step."""
    seen = []
    for step in range(max(len(t) for t in row_tokens)):
        bc.prepare()
        logits = torch.zeros(batch, C.TOKENIZER_VOCAB_SIZE + 64)
        bc.apply(logits)
        seen.append(logits)
        toks = torch.tensor([t[step] if step < len(t) else 0 for t in row_tokens])
        active = torch.tensor([step < len(t) for t in row_tokens])
        bc.advance(toks, active)
    return seen


def test_masks_forced_header_and_untouched_rows():
    enc = C.harmony_encoding()
    g = C.compile_row_grammar(LABEL, None)
    answer = [C.CHANNEL] + enc.encode("final") + [C.MESSAGE] + enc.encode('{"label":"neutral"}') + [C.RETURN]
    free = enc.encode("anything at all, unconstrained")
    bc = C.BatchConstraint([g, None, g], C.TOKENIZER_VOCAB_SIZE + 64)
    seen = _walk(bc, [answer, free, answer[:3]], 3)
    first = seen[0]
    assert torch.isfinite(first[0]).sum() == 1 and first[0, C.CHANNEL] == 0  # only <|channel|>
    assert torch.equal(first[1], torch.zeros_like(first[1]))  # unconstrained row untouched
    assert torch.isinf(first[0, C.TOKENIZER_VOCAB_SIZE:]).all()  # padded vocab masked
    # row 2 went inactive after 3 tokens (the engine says so at the 4th advance): never touched again
    assert not torch.equal(seen[3][2], torch.zeros_like(seen[3][2]))
    assert all(torch.equal(s[2], torch.zeros_like(s[2])) for s in seen[4:])
    last = seen[len(answer) - 1]
    assert torch.isfinite(last[0]).sum() == 1 and last[0, C.RETURN] == 0  # only <|return|> after the JSON
    assert bc.errors() == [None, None, None]
    assert bc.is_finished(0) and not bc.is_finished(2)
    bc.close()


def test_rejected_token_fails_row_and_forces_return():
    enc = C.harmony_encoding()
    g = C.compile_row_grammar(LABEL, None)
    bc = C.BatchConstraint([g, g], C.TOKENIZER_VOCAB_SIZE)
    bc.prepare()
    bc.apply(torch.zeros(2, C.TOKENIZER_VOCAB_SIZE))
    bad = enc.encode("hello")[0]
    bc.advance(torch.tensor([bad, C.CHANNEL]), torch.tensor([True, True]))
    errs = bc.errors()
    assert errs[0] is not None and "rejected" in errs[0] and str(bad) in errs[0] and "at token 1:" in errs[0]
    assert errs[1] is None
    bc.prepare()
    logits = torch.zeros(2, C.TOKENIZER_VOCAB_SIZE)
    bc.apply(logits)
    assert torch.isfinite(logits[0]).sum() == 1 and logits[0, C.RETURN] == 0
    assert torch.isfinite(logits[1]).sum() > 1  # "analysis"/"final" prefixes
    bc.close()


def test_vocab_checks():
    g = C.compile_row_grammar(LABEL, None)
    with pytest.raises(ValueError, match="smaller"):
        C.BatchConstraint([g], 1000)
    bc = C.BatchConstraint([g, None], C.TOKENIZER_VOCAB_SIZE)
    bc.prepare()
    with pytest.raises(ValueError, match=r"\[2, V\]"):
        bc.apply(torch.zeros(3, C.TOKENIZER_VOCAB_SIZE))
    bc.close()


def test_all_unconstrained_is_a_no_op():
    bc = C.BatchConstraint([None, None], C.TOKENIZER_VOCAB_SIZE)
    logits = torch.randn(2, C.TOKENIZER_VOCAB_SIZE)
    before = logits.clone()
    bc.prepare()
    bc.apply(logits)
    bc.advance(torch.tensor([1, 2]), torch.tensor([True, True]))
    assert torch.equal(logits, before)
    assert bc.errors() == [None, None]


def test_half_precision_logits():
    g = C.compile_row_grammar(LABEL, None)
    bc = C.BatchConstraint([g], C.TOKENIZER_VOCAB_SIZE)
    bc.prepare()
    logits = torch.zeros(1, C.TOKENIZER_VOCAB_SIZE, dtype=torch.bfloat16)
    bc.apply(logits)
    assert logits[0, C.CHANNEL] == 0 and logits[0, 0] == -math.inf
    bc.close()


def test_bitmask_unpacking_numpy_and_torch_agree():
    """apply() unpacks with numpy for CPU logits and with torch ops on a GPU: same bits."""
    gen = torch.Generator().manual_seed(3)
    vocab = 201088
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, vocab // 32), dtype=torch.int32, generator=gen)
    bitmask[0, 0] = 0b101  # tokens 0 and 2 allowed, 1 and 3..31 not
    bitmask[1, -1] = -(2**31)  # only the last token of the last word allowed
    a = C._banned_numpy(bitmask, vocab)
    b = C._banned_torch(bitmask, vocab)
    assert a.shape == b.shape == (3, vocab) and torch.equal(a, b)
    assert a[0, :4].tolist() == [False, True, False, True]
    assert not a[1, -1] and a[1, -32:-1].all()
    assert torch.equal(C._banned_numpy(bitmask, 1000), a[:, :1000])


def test_rows_of_a_step_mask_and_advance_only_those_rows():
    """With `rows`, logits hold just the step's rows (in any order); rows not listed keep their state."""
    enc = C.harmony_encoding()
    g = C.compile_row_grammar(LABEL, None)
    bc = C.BatchConstraint([g, None, g, g], C.TOKENIZER_VOCAB_SIZE + 64)
    bc.prepare([3, 1])
    logits = torch.zeros(2, C.TOKENIZER_VOCAB_SIZE + 64)
    bc.apply(logits, [3, 1])
    assert torch.isfinite(logits[0]).sum() == 1 and logits[0, C.CHANNEL] == 0  # row 3: only <|channel|>
    assert torch.equal(logits[1], torch.zeros_like(logits[1]))  # row 1: unconstrained
    bc.advance(torch.tensor([C.CHANNEL, 5]), torch.tensor([True, True]), rows=[3, 1])
    # Row 3 moved on to the channel name; rows 0 and 2 (not yet in a step) still start at <|channel|>.
    bc.prepare([0, 3])
    logits = torch.zeros(2, C.TOKENIZER_VOCAB_SIZE + 64)
    bc.apply(logits, [0, 3])
    assert torch.isfinite(logits[0]).sum() == 1 and logits[0, C.CHANNEL] == 0
    assert logits[1, C.CHANNEL] == -math.inf and logits[1, enc.encode("final")[0]] == 0
    assert bc.errors() == [None] * 4
