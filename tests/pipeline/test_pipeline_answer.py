"""ossbatch.pipeline.answer: the final answer re-serialised as JSON and checked against its schema."""

import json

import pytest

from ossbatch.pipeline.answer import validate_answer

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
