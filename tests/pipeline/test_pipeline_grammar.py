"""ossbatch.pipeline.grammar: compile a row's schema and reasoning budget, or refuse it with a reason."""

import json

import pytest

from ossbatch.pipeline.answer import validate_answer
from ossbatch.pipeline.grammar import compile_row_grammar
from ossbatch.pipeline.harmony import CHANNEL, MESSAGE, RETURN, harmony_encoding
from ossbatch.pipeline.response_format import SchemaRefused

LABEL_SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
    "required": ["label"],
    "additionalProperties": False,
}
LABEL = json.dumps(LABEL_SCHEMA)


def test_no_constraint_is_none():
    assert compile_row_grammar(None, None) is None


def test_strict_compile_and_cache():
    g = compile_row_grammar(LABEL, None)
    assert not g.lenient and g.strict_error is None
    assert "%json" in g.lark and "<|return|>" in g.lark
    assert compile_row_grammar(LABEL, None) is g  # cached per (schema, budget)
    assert compile_row_grammar(LABEL, 10) is not g


def test_grammar_finishes_at_return():
    """A matcher that took a whole answer is finished (stopped and accepting); a partial one is not."""
    enc = harmony_encoding()
    g = compile_row_grammar(LABEL, None)
    answer = [CHANNEL] + enc.encode("final") + [MESSAGE] + enc.encode('{"label":"neutral"}') + [RETURN]
    done, partial = g.new_matcher(), g.new_matcher()
    assert all(done.consume_token(t) for t in answer)
    assert all(partial.consume_token(t) for t in answer[:3])
    assert done.is_stopped() and done.is_accepting() and not done.is_error()
    assert not (partial.is_stopped() and partial.is_accepting())


@pytest.mark.parametrize("schema, keyword", [
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
    ({"if": {"type": "string"}, "then": {"minLength": 2}, "else": {"type": "integer"}}, "if"),
    ({"type": "string", "format": "x-custom"}, "x-custom"),
])
def test_lenient_fallback(schema, keyword):
    g = compile_row_grammar(json.dumps(schema), None)
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
    with pytest.raises(SchemaRefused, match=match) as exc:
        compile_row_grammar(text, None)
    assert "\n" not in str(exc.value)  # llguidance's grammar listing is stripped
    with pytest.raises(SchemaRefused):  # the refusal is cached, and raised again
        compile_row_grammar(text, None)


@pytest.mark.parametrize("budget", [-1, 1.5, True, "10"])
def test_bad_reasoning_budget(budget):
    with pytest.raises(SchemaRefused, match="max_reasoning_tokens"):
        compile_row_grammar(None, budget)


def test_remote_ref_is_never_fetched(no_network):
    remote = json.dumps({"type": "object", "properties": {"a": {"$ref": "https://example.com/schemas/a.json"}}})
    with pytest.raises(SchemaRefused, match=r"remote schema reference 'https://example.com/schemas/a.json' .* never fetched"):
        compile_row_grammar(remote, None)
    assert validate_answer('{"a": 1}', remote) == ('{"a":1}', False)
    assert no_network == []
    # the guard is real: jsonschema's default validator would have tried to fetch it
    import jsonschema

    with pytest.raises(Exception):
        jsonschema.validate({"a": 1}, json.loads(remote))
    assert no_network, "the no-network guard did not see jsonschema's retrieval"
