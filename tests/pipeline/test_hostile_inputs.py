"""A hostile-input corpus (tests/pipeline/data/hostile/rows.jsonl) through `ossbatch run` in one job on
the tiny model: the job completes, every good row is ok, every bad row is an error naming what is
wrong. Each row's work is bounded in tokens: no row generates past its budget, and refused rows
generate nothing (time is not asserted: see benchmarks/)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ossbatch.flows.cli import main

CORPUS = Path(__file__).parent / "data" / "hostile" / "rows.jsonl"
MAX_TOKENS = 160  # room for the bounded JSON whitespace a random model writes
# Lines that are not JSON objects keep no columns: their id is "rows.jsonl:LINE", their error says why.
BAD_LINE_ERRORS = ("not valid JSON", "expected a JSON object, got list", "not valid UTF-8", "nested more than 64 levels")


def test_a_hostile_corpus_runs_in_one_job_and_each_bad_row_fails_alone(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    code = main(["run", "--model", str(tiny_model_dir), "--input", str(CORPUS), "--output", str(out),
                 "--orchestrator", "none", "--quiet", "--max-tokens", str(MAX_TOKENS), "--shard-rows", "16"])
    assert code == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    rows = pa.concat_tables([pq.read_table(p) for p in sorted((out / "data").glob("*.parquet"))]).to_pylist()
    lines = [line for line in CORPUS.read_bytes().splitlines() if line.strip()]
    assert manifest["rows"]["total"] == len(rows) == len(lines)
    assert len({r["id"] for r in rows}) == len(rows)

    expected = [r for r in rows if r["expect"] is not None]
    good = [r for r in expected if r["expect"] == "ok"]
    bad = [r for r in expected if r["expect"] != "ok"]
    assert len(good) >= 8 and len(bad) >= 25
    for row in good:
        assert row["status"] == "ok", row
        assert row["schema_valid"] is True, row
    assert "7" in {r["id"] for r in good}  # an integral float id keeps its integer's text
    for row in bad:
        assert row["status"] == "error", row
        assert row["expect"] in row["error"], (row["id"], row["error"])
    bad_lines = [r for r in rows if r["expect"] is None]
    assert sorted(r["id"].split(":")[0] for r in bad_lines) == ["rows.jsonl"] * len(BAD_LINE_ERRORS)
    for message in BAD_LINE_ERRORS:
        assert sum(message in r["error"] for r in bad_lines) == 1, message
    # The bound on each row's work: never past its token budget; a refused row runs nothing.
    for row in rows:
        assert row["completion_tokens"] <= MAX_TOKENS
        if row["status"] == "error":
            assert row["completion_tokens"] == 0, row
