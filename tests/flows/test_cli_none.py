"""Every job command runs with ``--orchestrator none`` (no Prefect imported), and writes the
report its output documents; ``ossbatch report`` renders a finished job's charts."""

import json

import pyarrow.parquet as pq

from ossbatch.flows import report
from ossbatch.flows.cli import main
from flow_helpers import NO_PREFECT, ossbatch, write_jsonl

REVIEWS = [{"id": f"r{i}", "prompt": f"Label the sentiment of review {i}", "sentiment": s}
           for i, s in enumerate(["positive", "negative", "neutral", "positive"])]
QUESTIONS = [{"id": f"q{i}", "prompt": f"What is {i} + 1?\nA) {i}\nB) {i + 1}\nAnswer with the letter.",
              "answer": "B", "category": ["arith", "logic"][i % 2]} for i in range(4)]
FAST = ["--max-tokens", "6", "--temperature", "0", "--orchestrator", "none", "--quiet"]


def _job(*argv):
    assert main([str(a) for a in argv]) == 0, argv


def test_every_job_command_runs_without_prefect_and_writes_its_report(tiny_model_dir, tmp_path, capsys):
    reviews = write_jsonl(tmp_path / "reviews.jsonl", REVIEWS)
    model = ["--model", tiny_model_dir]
    _job("run", *model, "--input", reviews, "--output", tmp_path / "run", *FAST)
    # In a fresh process that fails if anything imports Prefect.
    label = ossbatch("label", *model, "--input", reviews, "--output", tmp_path / "label", "--labels", "positive",
                     "negative", "neutral", "--gold-column", "sentiment", *FAST, code=NO_PREFECT)
    assert label.returncode == 0 and label.stderr == "", label.stderr
    _job("synth", *model, "--input", reviews, "--output", tmp_path / "synth", "--n", "2", *FAST)
    _job("eval", *model, "--input", write_jsonl(tmp_path / "mcq.jsonl", QUESTIONS), "--output", tmp_path / "eval",
         *FAST)
    assert pq.read_table(tmp_path / "label" / "labels.parquet").num_rows == 4
    assert pq.read_table(tmp_path / "synth" / "samples.parquet").num_rows == 8
    for root in ("label", "synth", "eval"):
        assert (tmp_path / root / "report.html").exists(), root
    capsys.readouterr()

    _job("report", tmp_path / "run")
    path = capsys.readouterr().out.strip()
    assert path.endswith("/run/_report.html")
    page = (tmp_path / "run" / "_report.html").read_text()
    manifest = json.loads((tmp_path / "run" / "_manifest.json").read_text())
    assert f"<th>rows</th><td>{manifest['rows']['total']}</td>" in page and page.count("Plotly.newPlot") == 5
    assert all(shard.get("committed_at") for shard in manifest["shards"])


def test_eval_records_its_history_path_and_its_report_shows_every_night(tiny_model_dir, tmp_path):
    questions = write_jsonl(tmp_path / "mcq.jsonl", QUESTIONS)
    history = tmp_path / "custom" / "mcq-history.jsonl"
    history.parent.mkdir()
    for night in ("n1", "n2", "n3"):
        _job("eval", "--model", tiny_model_dir, "--input", questions, "--output", tmp_path / "evals" / night,
             "--history", history, "--price-per-million-tokens", "1", "2", "--gpu-hour-price", "2", *FAST)
    summary = json.loads((tmp_path / "evals" / "n3" / "eval.json").read_text())
    assert summary["history"] == str(history)
    manifest = json.loads((tmp_path / "evals" / "n3" / "job" / "_manifest.json").read_text())
    assert summary["cost"] == manifest["cost"] and manifest["cost"]["gpu"] > 0
    figures = {f.layout.title.text: f for f in report.charts(report.gather(str(tmp_path / "evals" / "n3")))}
    trend = figures["Accuracy over previous nights"].data[0]
    assert len(trend.y) == 3 and trend.y[-1] == summary["accuracy"]
    accuracy = figures["Accuracy per category"].data[0]
    assert list(accuracy.y) == [c["accuracy"] for c in summary["categories"]]
