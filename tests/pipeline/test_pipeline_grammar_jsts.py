"""The JSON Schema Test Suite's draft 2020-12 schemas (vendored in data/, see data/README.md)."""

import json
from collections import Counter
from pathlib import Path

import jsonschema
import jsonschema.validators
import pytest

from constraint_driver import parse_completion, run_random

from ossbatch.pipeline.answer import offline_registry, validate_answer
from ossbatch.pipeline.grammar import compile_row_grammar
from ossbatch.pipeline.response_format import SchemaRefused

CASES = json.loads((Path(__file__).parent / "data" / "jsts_draft2020-12.json").read_text())
# Cases whose schemas live on a server (localhost:1234 in the suite): never fetched, so refused.
REMOTE_FILES = {"refRemote.json", "vocabulary.json"}


@pytest.fixture(scope="module")
def compiled():
    out = []
    for case in CASES:
        text = json.dumps(case["schema"])
        try:
            out.append((case, text, compile_row_grammar(text, None), None))
        except SchemaRefused as e:
            out.append((case, text, None, str(e)))
    return out


def test_suite_is_vendored():
    assert len(CASES) >= 380
    assert {"ref.json", "uniqueItems.json", "oneOf.json", "optional/format/date-time.json"} <= {c["file"] for c in CASES}


def test_every_schema_compiles_or_is_refused_with_a_reason(compiled):
    kinds = Counter()
    for case, _text, grammar, refusal in compiled:
        if grammar is None:
            kinds["refused"] += 1
            assert refusal and "\n" not in refusal
            if case["file"] in REMOTE_FILES:
                assert "remote schema reference 'http://localhost:1234/" in refusal and "never fetched" in refusal, refusal
        else:
            kinds["lenient" if grammar.lenient else "strict"] += 1
            if grammar.lenient:
                assert grammar.strict_error
        if case["file"] in REMOTE_FILES:
            assert grammar is None, case["description"]
    # llguidance 1.9.1 on this suite: ~170 strict, ~180 lenient, ~38 refused
    assert kinds["strict"] >= 150 and kinds["lenient"] >= 150 and kinds["refused"] <= 45, kinds


def _needs_retrieval(schema, data) -> bool:
    """True when validating needs a resource that only the suite's server has."""
    import referencing.exceptions

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls(schema, registry=offline_registry()).is_valid(data)
    except referencing.exceptions.Unresolvable:
        return True
    return False


def test_validate_answer_agrees_with_the_suite(no_network):
    checked = offline_false = 0
    for case in CASES:
        if case["file"].startswith("optional/format/"):
            continue  # formats are annotations by default: the suite's format assertions don't apply
        if case["file"] == "vocabulary.json":
            continue  # the verdict hinges on a metaschema only the suite's server has
        text = json.dumps(case["schema"])
        for data, valid in case["tests"]:
            output_json, schema_valid = validate_answer(json.dumps(data), text)
            assert output_json == json.dumps(data, separators=(",", ":"), ensure_ascii=False)
            if _needs_retrieval(case["schema"], data):
                assert schema_valid is False  # never fetched, never called valid
                offline_false += 1
            else:
                assert schema_valid == valid, (case["file"], case["description"], data)
                checked += 1
    assert checked > 1000 and offline_false > 0
    assert no_network == []


def test_random_generation_over_the_suite(compiled):
    """Every compilable suite schema, random logits: strict answers validate, lenient ones are JSON."""
    rows = [(case, text, g) for case, text, g, _ in compiled if g is not None]
    stats = Counter()
    for start in range(0, len(rows), 64):
        chunk = rows[start:start + 64]
        results, bc = run_random([g for _, _, g in chunk], seed=start, steps=150)
        errors = bc.errors()
        for (case, text, g), res, err in zip(chunk, results, errors):
            where = (case["file"], case["description"])
            assert err is None, (where, err)
            if not res.finished:
                stats["unfinished"] += 1
                continue
            parsed = parse_completion(res.tokens)
            assert all(t < 199998 for t in parsed.final_tokens), where
            output_json, valid = validate_answer(parsed.final_text, text)
            assert output_json is not None, (where, parsed.final_text)
            if g.lenient:
                stats["lenient valid" if valid else "lenient invalid"] += 1
            else:
                assert valid, (where, parsed.final_text)
                stats["strict valid"] += 1
    assert stats["unfinished"] <= 0.05 * len(rows), stats
    assert stats["strict valid"] >= 140, stats
