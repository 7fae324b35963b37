"""ossbatch.pipeline.answer: the final answer re-serialised as JSON and checked against its schema."""

import json

import pytest

from ossbatch.pipeline import answer
from ossbatch.pipeline.answer import AnswerCheckFailed, answer_fields, validate_answer

LABEL = json.dumps({
    "type": "object",
    "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
    "required": ["label"],
    "additionalProperties": False,
})


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
    assert validate_answer(text, schema) == expected


# Issue 12's reproduction: the grammar lets the model write the long key, and a backtracking
# engine matching it against ^(a+)+c$ runs for minutes (12 a's: 14 s; 40: never finished).
LONG_KEY = "a" * 41 + "b"
NESTED_QUANTIFIER = {"type": "object", "patternProperties": {"^(a+)+c$": {"const": 1}},
                     "properties": {LONG_KEY: {"const": 1}}, "required": [LONG_KEY],
                     "additionalProperties": False, "maxProperties": 1}


def test_nested_quantifier_pattern_is_matched_in_linear_time():
    schema = json.dumps(NESTED_QUANTIFIER)
    assert validate_answer(json.dumps({LONG_KEY: 1}), schema) == (f'{{"{LONG_KEY}":1}}', True)
    assert validate_answer(json.dumps({LONG_KEY: 2}), schema)[1] is False
    assert validate_answer(json.dumps({"a" * 5000 + "c": 2}), schema)[1] is False  # matches the pattern: const 1 fails
    assert validate_answer(json.dumps({"a" * 5000 + "c": 1}), schema)[1] is False  # required key missing
    ok = json.dumps({"type": "string", "pattern": "^(a+)+c$"})
    assert validate_answer(json.dumps("a" * 100000 + "c"), ok)[1] is True
    assert validate_answer(json.dumps("a" * 100000 + "b"), ok)[1] is False


@pytest.mark.parametrize("keyword_schema, good, bad", [
    ({"patternProperties": {"^x-": {"type": "integer"}}, "additionalProperties": False}, {"x-a": 1}, {"y": 1}),
    ({"patternProperties": {"^x-": True}, "unevaluatedProperties": False}, {"x-a": 1}, {"y": 1}),
    ({"properties": {"a": {"pattern": "^\\d+$"}}}, {"a": "123"}, {"a": "١٢٣"}),  # ECMA \d is ASCII
    ({"properties": {"a": {"pattern": "^\\u00e9+$"}}}, {"a": "éé"}, {"a": "e"}),  # ECMA \uXXXX
    ({"properties": {"a": {"pattern": "^ab$"}}}, {"a": "ab"}, {"a": "ab\n"}),  # ECMA $ is the end of the text
])
def test_patterns_follow_json_schema_regex_semantics(keyword_schema, good, bad):
    schema = json.dumps({"type": "object", **keyword_schema})
    assert validate_answer(json.dumps(good), schema)[1] is True
    assert validate_answer(json.dumps(bad), schema)[1] is False


def test_a_pattern_re2_cannot_run_fails_the_row_with_a_message():
    fields = answer_fields('{"a": "xx"}', json.dumps({"properties": {"a": {"pattern": "^(x)\\1$"}}}))
    assert fields["status"] == "error" and "cannot be checked in linear time" in fields["error"]
    assert fields["schema_valid"] is None


def _exponential_schema(depth: int) -> str:
    """anyOf over $refs, `depth` levels: checking a non-matching instance visits 2**depth leaves."""
    defs = {f"x{i}": {"anyOf": [{"$ref": f"#/$defs/x{i + 1}"}, {"$ref": f"#/$defs/x{i + 1}"}]} for i in range(depth)}
    defs[f"x{depth}"] = {"type": "integer", "maximum": 0}
    return json.dumps({"$defs": defs, "$ref": "#/$defs/x0"})


def test_a_schema_too_costly_to_check_fails_its_row_with_a_message(monkeypatch):
    assert validate_answer("-1", _exponential_schema(40)) == ("-1", True)  # the first branch holds: cheap
    monkeypatch.setattr(answer, "ANSWER_CHECK_SECONDS", 0.2)
    with pytest.raises(AnswerCheckFailed, match="took over 0.2 s"):
        validate_answer("5", _exponential_schema(40))  # 2**40 leaves: stopped at its deadline
    fields = answer_fields("5", _exponential_schema(40))
    assert (fields["status"], fields["finish_reason"], fields["schema_valid"]) == ("error", "error", None)
    assert "too costly" in fields["error"]
    assert answer_fields('{"label": "positive"}', LABEL) == {"output_json": '{"label":"positive"}', "schema_valid": True}
