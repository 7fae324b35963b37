"""Structured outputs end to end with the tiny random model: its choices are
random, so any hole in the grammar shows as an invalid answer."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from ossbatch.flows.cli import main
from ossbatch.pipeline.harmony import harmony_encoding

LABEL = {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]}},
         "required": ["label"], "additionalProperties": False}
EXTRACT = {"type": "object", "properties": {"year": {"type": "integer", "minimum": 1900, "maximum": 2100},
           "ok": {"type": "boolean"}}, "required": ["year", "ok"], "additionalProperties": False}
LENIENT = {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True, "maxItems": 3}


def _run(tiny_model_dir, tmp_path, rows, *extra):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["run", "--model", str(tiny_model_dir), "--input", str(inp), "--output", str(out), "--orchestrator", "none",
                 "--quiet", "--temperature", "1.0", "--max-tokens", "160", "--max-reasoning-tokens", "6", "--keep-token-ids", *extra]) == 0
    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))])
    return {r["id"]: r for r in table.to_pylist()}


def test_every_finished_row_is_schema_valid_and_free_of_special_tokens(tiny_model_dir, tmp_path):
    rows = [{"id": f"label-{i}", "prompt": f"Review {i}: fine", "schema": LABEL} for i in range(4)]
    rows += [{"id": f"extract-{i}", "prompt": f"Doc {i}", "schema": json.dumps(EXTRACT)} for i in range(3)]
    rows += [{"id": "lenient", "prompt": "Pick numbers", "schema": LENIENT}]
    rows += [{"id": "bad-schema", "prompt": "x", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}}]
    results = _run(tiny_model_dir, tmp_path, rows)
    enc = harmony_encoding()
    finished = [r for r in results.values() if r["status"] == "ok"]
    assert len(finished) >= 5
    for row in finished:
        assert row["schema_valid"] is True, row
        answer = json.loads(row["output_json"])
        assert json.loads(row["output_text"]) == answer
        assert not any(enc.is_special_token(t) for t in enc.encode(row["output_text"], disallowed_special=()))
    assert all(json.loads(results[f"label-{i}"]["output_json"])["label"] in LABEL["properties"]["label"]["enum"]
               for i in range(4) if results[f"label-{i}"]["status"] == "ok")
    bad = results["bad-schema"]
    assert bad["status"] == "error" and "schema" in bad["error"] and "no-such-type" in bad["error"]


def test_reasoning_budget_closes_the_analysis_without_a_schema(tiny_model_dir, tmp_path):
    results = _run(tiny_model_dir, tmp_path, [{"id": f"r{i}", "prompt": "Think briefly"} for i in range(3)], "--max-tokens", "40")
    enc = harmony_encoding()
    for row in results.values():
        text = enc.decode(row["output_token_ids"])
        assert text.startswith("<|channel|>analysis<|message|>") or text.startswith("<|channel|>final")
        if "<|end|>" in text:
            analysis = text.split("<|message|>", 1)[1].split("<|end|>", 1)[0]
            assert len(enc.encode(analysis, disallowed_special=())) <= 6 + 2  # the budget, up to re-tokenisation
            assert "<|channel|>final<|message|>" in text


def test_job_wide_schema_flag(tiny_model_dir, tmp_path):
    schema = tmp_path / "label.json"
    schema.write_text(json.dumps(LABEL))
    results = _run(tiny_model_dir, tmp_path, [{"id": f"s{i}", "prompt": "Classify"} for i in range(3)], "--schema", str(schema))
    assert all(r["schema_valid"] for r in results.values() if r["status"] == "ok")
    assert any(r["status"] == "ok" for r in results.values())


def test_constrained_rows_in_refilled_slots_match_a_wide_batch(tiny_model_dir, tmp_path):
    """Three KV slots for ten rows: a constrained row that takes a freed slot keeps its own matcher."""
    rows = [{"id": f"label-{i}", "prompt": f"Review {i}: " + "fine " * i, "schema": LABEL} for i in range(5)]
    rows += [{"id": f"free-{i}", "prompt": f"Say {i}", "max_tokens": 3 + 4 * i} for i in range(3)]
    rows += [{"id": f"extract-{i}", "prompt": f"Doc {i}", "schema": EXTRACT} for i in range(2)]
    (tmp_path / "wide").mkdir()
    (tmp_path / "narrow").mkdir()
    wide = _run(tiny_model_dir, tmp_path / "wide", rows)
    narrow = _run(tiny_model_dir, tmp_path / "narrow", rows, "--max-batch-rows", "3")
    assert set(narrow) == set(wide)
    for rid, row in wide.items():
        assert narrow[rid]["output_token_ids"] == row["output_token_ids"], rid
        assert narrow[rid]["status"] == row["status"] and narrow[rid]["schema_valid"] == row["schema_valid"]
    assert all(r["schema_valid"] for r in narrow.values() if r["status"] == "ok" and r["id"].startswith(("label", "extract")))


def test_schema_rows_count_tokens_as_harmony_parses_them(tiny_model_dir, tmp_path):
    """The tiny model once spelled `final` as `f` + `inal` under a schema (reasoning 27, output 0 with
    a valid answer): headers are now harmony's own tokens and the counts harmony's split."""
    rows = [{"id": f"label-{i}", "prompt": f"Review {i}: fine", "schema": LABEL} for i in range(4)]
    results = _run(tiny_model_dir, tmp_path, rows)
    enc = harmony_encoding()
    channel, message = enc.encode("<|channel|><|message|>", allowed_special="all")
    names = {enc.encode("analysis")[0], enc.encode("final")[0]}
    for row in results.values():
        tokens = row["output_token_ids"]
        assert all(tokens[i + 1] in names and tokens[i + 2] == message for i, t in enumerate(tokens) if t == channel)
        assert row["reasoning_tokens"] + row["output_tokens"] == row["completion_tokens"] == len(tokens)
        if row["status"] == "ok":
            final = tokens[len(tokens) - row["output_tokens"]:]
            assert final[:2] == [channel, enc.encode("final")[0]] and row["output_tokens"] > 3
            assert enc.decode(final[3:-1]) == row["output_text"]


def test_a_schema_with_a_catastrophic_pattern_stops_only_its_own_row(tiny_model_dir, tmp_path):
    """Issue 12's row: the grammar makes the model write the long key, which a backtracking engine
    would match against ^(a+)+c$ for minutes. The job finishes; the good rows are `ok`."""
    long_key = "a" * 41 + "b"
    poison = {"type": "object", "patternProperties": {"^(a+)+c$": {"const": 1}},
              "properties": {long_key: {"const": 1}}, "required": [long_key],
              "additionalProperties": False, "maxProperties": 1}
    rows = [{"id": f"label-{i}", "prompt": f"Review {i}: fine", "schema": LABEL} for i in range(3)]
    rows.insert(1, {"id": "s1", "prompt": "x", "seed": 1, "temperature": 1.0, "max_reasoning_tokens": 0, "schema": poison})
    results = _run(tiny_model_dir, tmp_path, rows)
    assert all(results[f"label-{i}"]["status"] == "ok" and results[f"label-{i}"]["schema_valid"] for i in range(3))
    row = results["s1"]
    assert (row["status"], row["schema_valid"], json.loads(row["output_json"])) == ("ok", True, {long_key: 1}), row
