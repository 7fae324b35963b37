"""`ossbatch run` end to end on local JSONL and Parquet, without Prefect
(the flow's own tests cover the Prefect path)."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ossbatch.engine.generate import SamplingParams, generate
from ossbatch.engine.model import Transformer
from ossbatch.flows.cli import main
from ossbatch.pipeline.render import render_prompt

ROWS = [
    {"id": "a", "prompt": "Classify: great phone", "topic": "reviews", "score": 4},
    {"id": "b", "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}], "topic": "math", "score": 1},
    {"id": "c", "prompt": "Say hi", "max_tokens": 3, "reasoning_effort": "low", "topic": "x", "score": 2},
    {"id": "d", "prompt": "Bad effort", "reasoning_effort": "extreme", "topic": "x", "score": 3},
    {"id": "e", "topic": "no prompt at all", "score": 5},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read_output(out):
    parts = sorted((out / "data").glob("*.parquet"))
    assert parts, f"no parquet in {out}"
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    return {row["id"]: row for row in table.to_pylist()}, table


def _run(model, inp, out, *extra):
    args = ["run", "--model", str(model), "--input", str(inp), "--output", str(out), "--orchestrator", "none", "--quiet",
            "--temperature", "0", "--max-tokens", "6", *extra]
    assert main(args) == 0


def test_jsonl_run_writes_parquet_manifest_and_accounting(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    _run(tiny_model_dir, _write_jsonl(tmp_path / "in.jsonl", ROWS), out, "--keep-token-ids", "--logprobs")
    rows, table = _read_output(out)
    assert set(rows) == {"a", "b", "c", "d", "e"}
    for column in ["id", "status", "finish_reason", "output_text", "reasoning_text", "error", "prompt_tokens",
                   "reasoning_tokens", "output_tokens", "completion_tokens", "topic", "score",
                   "prompt_token_ids", "output_token_ids", "output_logprobs"]:
        assert column in table.column_names, column

    # Passthrough columns keep their values and types.
    assert rows["a"]["topic"] == "reviews" and rows["b"]["score"] == 1

    # Accounting: the generated tokens are all there, split into reasoning and output.
    for key in "abc":
        row = rows[key]
        assert row["completion_tokens"] == len(row["output_token_ids"]) == len(row["output_logprobs"])
        assert row["reasoning_tokens"] + row["output_tokens"] == row["completion_tokens"]
        assert row["prompt_tokens"] == len(row["prompt_token_ids"])
    assert rows["a"]["prompt_token_ids"] == render_prompt([{"role": "user", "content": "Classify: great phone"}])

    # Row settings override the flags.
    assert rows["c"]["completion_tokens"] == 3 and rows["a"]["completion_tokens"] == 6
    assert rows["c"]["prompt_token_ids"] == render_prompt([{"role": "user", "content": "Say hi"}], reasoning_effort="low")

    # Bad rows come out as errors naming the field; no row is lost.
    assert rows["d"]["status"] == "error" and "reasoning_effort" in rows["d"]["error"] and "extreme" in rows["d"]["error"]
    assert rows["e"]["status"] == "error" and "prompt" in rows["e"]["error"]

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["tokens"]["completion"] == sum(r["completion_tokens"] for r in rows.values())
    assert manifest["tokens"]["prompt"] == sum(r["prompt_tokens"] for r in rows.values())


def test_logprobs_and_greedy_tokens_are_the_engines(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    _run(tiny_model_dir, _write_jsonl(tmp_path / "in.jsonl", ROWS[:2]), out, "--keep-token-ids", "--logprobs")
    rows, _ = _read_output(out)
    model = Transformer.from_checkpoint(tiny_model_dir, torch.float32)
    prompts = [rows[k]["prompt_token_ids"] for k in "ab"]
    completions, _ = generate(model, prompts, [SamplingParams(max_tokens=6)] * 2, [200002, 200012], logprobs=True)
    for key, completion in zip("ab", completions):
        assert rows[key]["output_token_ids"] == completion.token_ids
        assert max(abs(a - b) for a, b in zip(rows[key]["output_logprobs"], completion.logprobs)) < 1e-5


def test_parquet_input_gives_the_same_rows_as_jsonl(tiny_model_dir, tmp_path):
    rows = [{"id": r["id"], "prompt": r.get("prompt") or "x", "topic": r["topic"]} for r in ROWS[:3]]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    _write_jsonl(tmp_path / "in.jsonl", rows)
    _run(tiny_model_dir, tmp_path / "in.parquet", tmp_path / "from-parquet", "--keep-token-ids")
    _run(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "from-jsonl", "--keep-token-ids")
    a, _ = _read_output(tmp_path / "from-parquet")
    b, _ = _read_output(tmp_path / "from-jsonl")
    assert {k: v["output_token_ids"] for k, v in a.items()} == {k: v["output_token_ids"] for k, v in b.items()}


def test_command_line_refuses_a_missing_model(tmp_path):
    inp = _write_jsonl(tmp_path / "in.jsonl", ROWS[:1])
    proc = subprocess.run(
        [sys.executable, "-m", "ossbatch.flows.cli", "run", "--model", str(tmp_path / "missing"), "--input", str(inp),
         "--output", str(tmp_path / "out"), "--orchestrator", "none"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "missing" in proc.stderr and "does not exist" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_bad_flag_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["run", "--model", "m", "--input", "i", "--output", "o", "--max-tokens", "0"])
    assert "--max-tokens must be positive" in capsys.readouterr().err


def test_a_failure_while_parsing_one_row_is_that_rows_error_and_the_shard_commits(tiny_model_dir, tmp_path, monkeypatch):
    # Issue 12: one row's failure is that row's error (it used to fail the whole shard).
    from ossbatch.pipeline.infer import ShardInferencer

    real_result = ShardInferencer._result

    def result_failing_on_b(self, request, *args):
        if request["id"] == "b":
            raise RuntimeError("parser blew up on row b")
        return real_result(self, request, *args)

    monkeypatch.setattr(ShardInferencer, "_result", result_failing_on_b)
    out = tmp_path / "out"
    _run(tiny_model_dir, _write_jsonl(tmp_path / "in.jsonl", ROWS), out, "--max-tokens", "4", "--temperature", "0")
    rows, _ = _read_output(out)
    assert rows["b"]["status"] == "error" and "RuntimeError: parser blew up on row b" in rows["b"]["error"]
    assert rows["b"]["prompt_tokens"] > 0 and rows["b"]["completion_tokens"] > 0  # it ran; its parse failed
    assert rows["a"]["status"] != "error" and rows["c"]["status"] != "error"


def test_two_kv_slots_refilled_give_every_row_what_a_wide_batch_gives(tiny_model_dir, tmp_path):
    rows = [{"id": f"r{i}", "prompt": "word " * (1 + 7 * i % 23), "max_tokens": 1 + (5 * i) % 9} for i in range(12)]
    inp = _write_jsonl(tmp_path / "in.jsonl", rows)
    _run(tiny_model_dir, inp, tmp_path / "wide", "--keep-token-ids", "--logprobs")
    _run(tiny_model_dir, inp, tmp_path / "narrow", "--keep-token-ids", "--logprobs", "--max-batch-rows", "2")
    wide, _ = _read_output(tmp_path / "wide")
    narrow, _ = _read_output(tmp_path / "narrow")
    for rid, row in wide.items():
        assert narrow[rid]["output_token_ids"] == row["output_token_ids"]
        assert narrow[rid]["completion_tokens"] == rows[int(rid[1:])]["max_tokens"] or narrow[rid]["finish_reason"] == "stop"
        assert max(abs(a - b) for a, b in zip(narrow[rid]["output_logprobs"], row["output_logprobs"])) < 1e-4
    manifest = json.loads((tmp_path / "narrow" / "_manifest.json").read_text())
    assert manifest["tokens"]["completion"] == sum(r["completion_tokens"] for r in narrow.values())


def test_a_nan_temperature_is_refused_in_one_line_naming_the_flag(tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", ROWS[:1])
    assert main(["run", "--model", str(tmp_path / "m"), "--input", str(inp), "--output", str(tmp_path / "out"),
                 "--orchestrator", "none", "--temperature", "nan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ossbatch run: --temperature: ") and "finite" in err
    assert not (tmp_path / "out").exists()


def test_bad_storage_options_are_named(tmp_path, capsys):
    for text, words in (("{anon", "is not valid JSON"), ("[1]", "must be a JSON object")):
        with pytest.raises(SystemExit):
            main(["run", "--model", "m", "--input", "i", "--output", "o", "--storage-options", text])
        assert f"--storage-options {words}" in capsys.readouterr().err


def test_an_internal_error_is_not_disguised_as_bad_input(tiny_model_dir, tmp_path, monkeypatch):
    import ossbatch.pipeline.driver

    def broken(*args, **kwargs):
        raise ValueError("a bug in ossbatch, not in the user's input")

    monkeypatch.setattr(ossbatch.pipeline.driver, "run_job", broken)
    with pytest.raises(ValueError, match="a bug in ossbatch"):
        _run(tiny_model_dir, _write_jsonl(tmp_path / "in.jsonl", ROWS[:1]), tmp_path / "out")


def test_two_runs_in_one_process_changing_only_temperature_load_the_model_once(tiny_model_dir, tmp_path, monkeypatch):
    from ossbatch.pipeline.infer import load_engine

    loads = []
    real = Transformer.from_checkpoint
    monkeypatch.setattr(Transformer, "from_checkpoint", staticmethod(lambda *a, **k: loads.append(a[0]) or real(*a, **k)))
    load_engine.cache_clear()
    inp = _write_jsonl(tmp_path / "in.jsonl", ROWS[:2])
    _run(tiny_model_dir, inp, tmp_path / "cold", "--temperature", "0")
    _run(tiny_model_dir, inp, tmp_path / "warm", "--temperature", "0.9", "--seed", "4")
    assert loads == [str(tiny_model_dir)]
    load_engine.cache_clear()
