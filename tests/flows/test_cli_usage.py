"""The command line as a user meets it: help on every flag, no abbreviations, suggestions for
near misses, one-line usage errors and the documented exit statuses (0 ok, 1 a failed job, 2 a
usage error)."""

import argparse
import json
import time

import pytest

from ossbatch.flows.cli import build_parser, main
from flow_helpers import NO_PREFECT, ossbatch

def _subparsers():
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, action.choices


def test_every_flag_of_every_command_has_help_and_every_command_ends_with_examples():
    parser, commands = _subparsers()
    assert set(commands) >= {"run", "label", "synth", "eval", "inspect", "plan", "serve", "deploy", "make-tiny-model"}
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help, f"ossbatch {name} {'/'.join(action.option_strings) or action.dest} has no help"
        text = sub.format_help()
        examples = text.split("examples:\n", 1)[1].strip().splitlines()
        assert 2 <= len(examples) <= 3 and all(line.strip().startswith(f"ossbatch {name}") for line in examples), name
    # Defaults are shown: a flag with a default says it.
    run_help = commands["run"].format_help()
    assert "(default: 1024)" in run_help and "(default: prefect)" in run_help and "(default: 10000)" in run_help


def test_an_abbreviated_flag_is_refused_with_a_suggestion(tmp_path):
    proc = ossbatch("run", "--model", "m", "--input", "i", "--output", tmp_path / "o", "--max-token", "5")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "unrecognized arguments: --max-token 5" in proc.stderr and "did you mean --max-tokens" in proc.stderr


def test_a_mistyped_command_or_choice_gets_one_line_and_exit_2(capsys):
    for argv, words in ((["rn"], "did you mean run?"), (["inspekt", "x"], "did you mean inspect?"),
                        (["run", "--model", "m", "--input", "i", "--output", "o", "--dtype", "bfloat"],
                         "did you mean bfloat16")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and words in err, (argv, err)


def test_usage_errors_exit_2_in_one_line_before_prefect(tiny_model_dir, tmp_path):
    bad_schema = tmp_path / "bad.json"
    bad_schema.write_text("{not json")
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"id": "a", "prompt": "hi", "answer": "A"}) + "\n")
    cases = [
        (["run", "--model", tiny_model_dir, "--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o"],
         "no input files match"),
        (["run", "--model", tiny_model_dir, "--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o",
          "--schema", bad_schema], "--schema"),
        (["eval", "--model", tiny_model_dir, "--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o"],
         "no input files match"),
        (["run", "--model", tmp_path / "nomodel", "--input", "x", "--output", tmp_path / "o"], "does not exist"),
        (["eval", "--model", tiny_model_dir, "--input", rows, "--output", tmp_path / "o", "--gold-column", "gold"],
         "--gold-column 'gold' is not a column"),
        (["label", "--model", tiny_model_dir, "--input", rows, "--output", tmp_path / "o", "--labels", "a", "b",
          "--gold-column", "gold"], "--gold-column 'gold' is not a column"),
    ]
    # Prefect would print a traceback (and take seconds to start): it must not even be imported.
    for argv, words in cases:
        started = time.monotonic()
        proc = ossbatch(*argv, code=NO_PREFECT)
        took = time.monotonic() - started
        assert proc.returncode == 2, (argv, proc.stderr)
        assert proc.stderr.count("\n") == 1 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        print(f"{argv[0]} {words}: {took:.2f} s")  # one line under 2 s on a quiet machine (benchmarks measure it)
    assert not (tmp_path / "o").exists()


def test_inspect_of_a_missing_folder_exits_2(tmp_path):
    proc = ossbatch("inspect", tmp_path / "nowhere")
    assert proc.returncode == 2 and "no ossbatch job here" in proc.stderr and proc.stderr.count("\n") == 1


def test_a_failed_job_exits_1_and_a_finished_one_0(tiny_model_dir, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    argv = ["run", "--model", tiny_model_dir, "--input", inp, "--orchestrator", "none", "--max-tokens", "2", "--quiet"]
    broken = ("import ossbatch.pipeline.infer as infer\n"
              "def boom(self, requests): raise RuntimeError('the engine broke')\n"
              "infer.ShardInferencer.__call__ = boom")
    failed = ossbatch(*argv, "--output", tmp_path / "failed", code=broken)
    assert failed.returncode == 1 and "the engine broke" in failed.stderr
    done = ossbatch(*argv, "--output", tmp_path / "done")
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


def test_inspect_shows_length_rows_and_prints_the_manifest_as_json(tiny_model_dir, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"say {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "out"
    # Two tokens cannot finish a harmony answer: every row is cut off (status length).
    assert main(["run", "--model", str(tiny_model_dir), "--input", str(inp), "--output", str(out), "--quiet",
                 "--orchestrator", "none", "--max-tokens", "2", "--temperature", "0"]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "first length rows (3 shown):" in text and "cut off after 2 tokens" in text
    assert main(["inspect", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["rows"] == {"total": 3, "ok": 0, "length": 3, "error": 0}


def test_prices_put_the_jobs_cost_in_the_manifest_and_inspect(tiny_model_dir, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"say {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    assert main(["run", "--model", str(tiny_model_dir), "--input", str(inp), "--output", str(out), "--quiet",
                 "--orchestrator", "none", "--max-tokens", "3", "--price-per-million-tokens", "2", "8",
                 "--gpu-hour-price", "3.6"]) == 0
    manifest = json.loads((out / "_manifest.json").read_text())
    cost, tokens = manifest["cost"], manifest["tokens"]
    gpu_seconds = max(manifest["wall_seconds"], manifest["shard_seconds"])
    expected = tokens["prompt"] * 2 / 1e6 + tokens["completion"] * 8 / 1e6 + gpu_seconds * 3.6 / 3600
    assert cost["total"] == pytest.approx(expected) and cost["per_1000_rows"] == pytest.approx(expected / 4 * 1000)
    assert main(["inspect", str(out)]) == 0
    assert f"${cost['total']:,.4f} (${cost['per_1000_rows']:,.4f} per 1,000 rows)" in capsys.readouterr().out

    with pytest.raises(SystemExit):  # a price is two numbers
        main(["run", "--model", "m", "--input", "i", "--output", "o", "--price-per-million-tokens", "2"])
    assert "--price-per-million-tokens: expected 2 arguments" in capsys.readouterr().err
    assert main(["run", "--model", str(tiny_model_dir), "--input", str(inp), "--output", str(tmp_path / "neg"),
                 "--orchestrator", "none", "--gpu-hour-price", "-1"]) == 2
    assert "--gpu-hour-price: input should be greater than or equal to 0, got -1.0" in capsys.readouterr().err
