"""`ossbatch report`: the charts carry the manifest's numbers; label and eval roots add theirs."""

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ossbatch.flows import report
from ossbatch.pipeline.driver import run_job
from ossbatch.pipeline.job import JobSpec

MODEL = {"path": "/models/tiny", "content_hash": "sha256:tiny", "config": {"num_hidden_layers": 2}}


def _answer(requests):
    results = []
    for i, r in enumerate(requests):
        status = ("ok", "length", "error")[i % 3]
        results.append({
            "id": r["id"], "passthrough": r["passthrough"], "request_kind": r["request_kind"], "status": status,
            "finish_reason": {"ok": "stop", "length": "length", "error": "error"}[status],
            "error": "boom" if status == "error" else None, "output_text": "x", "reasoning_text": "y",
            "prompt_tokens": 10 + i, "reasoning_tokens": i % 5, "output_tokens": 2 * i, "completion_tokens": i % 5 + 2 * i,
        })
    return results, {"padded_prompt_slots": 0, "decode_slots": 0, "batches": 1, "engine_seconds": 0.5}


def _finished_job(tmp_path, output, rows=14):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"q {i}"}) + "\n" for i in range(rows)))
    spec = JobSpec(inputs=[str(inputs)], output=str(output), shard_rows=5, model_fingerprint=MODEL, settings={})
    return run_job(spec, _answer)


def test_run_report_charts_equal_the_manifest(tmp_path):
    manifest = _finished_job(tmp_path, tmp_path / "out")
    data = report.gather(str(tmp_path / "out"))
    figures = report.charts(data)
    titles = [f.layout.title.text for f in figures]
    assert titles == ["Rows by status", "Prompt tokens", "Reasoning tokens", "Output tokens", "Throughput per shard"]
    status = figures[0].data[0]
    assert dict(zip(status.x, status.y)) == {s: n for s, n in manifest["rows"].items() if s != "total"}
    assert sum(figures[1].data[0].x) == manifest["tokens"]["prompt"]
    assert len(figures[4].data[0].y) == len(manifest["shards"]) == 3

    path = report.write_report(str(tmp_path / "out"))
    assert path.endswith("/out/_report.html")
    page = (tmp_path / "out" / "_report.html").read_text()
    assert "https://" not in re.sub(r"<script type=\"text/javascript\">.*?</script>", "", page, flags=re.S)
    assert page.count("Plotly.newPlot") == 5
    assert f"<th>rows</th><td>{manifest['rows']['total']}</td>" in page


def test_label_and_eval_roots_add_their_charts(tmp_path):
    root = tmp_path / "night"
    _finished_job(tmp_path, root / "job", rows=6)
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(6)], "label": ["pos", "neg", "pos", None, "pos", "neg"]}),
                   root / "labels.parquet")
    pq.write_table(pa.table({"gold": ["pos", "pos", "neg"], "label": ["pos", None, "neg"], "rows": [3, 1, 2]}),
                   root / "confusion.parquet")
    categories = [{"category": "(all)", "n": 6, "correct": 5, "accuracy": 5 / 6, "ci_low": 0.4, "ci_high": 0.97},
                  {"category": "a", "n": 3, "correct": 3, "accuracy": 1.0, "ci_low": 0.44, "ci_high": 1.0}]
    (root / "eval.json").write_text(json.dumps({"eval": "nightly", "categories": categories}))
    nights = [{"output": f"o{i}", "finished_at": f"2026-11-2{i}T02:00:00", "accuracy": a}
              for i, a in enumerate([0.5, 0.7, 5 / 6])]
    (tmp_path / "nightly.history.jsonl").write_text("".join(json.dumps(n) + "\n" for n in nights))

    figures = {f.layout.title.text: f for f in report.charts(report.gather(str(root)))}
    labels = figures["Label distribution"].data[0]
    assert dict(zip(labels.x, labels.y)) == {"pos": 3, "neg": 2, "(none)": 1}
    heat = figures["Confusion matrix"].data[0]
    assert list(heat.y) == ["neg", "pos"] and list(heat.x) == ["(none)", "neg", "pos"]
    assert [list(r) for r in heat.z] == [[0, 2, 0], [1, 0, 3]]
    accuracy = figures["Accuracy per category"].data[0]
    assert list(accuracy.y) == [5 / 6, 1.0]
    assert list(figures["Accuracy over previous nights"].data[0].y) == [0.5, 0.7, 5 / 6]
    assert report.write_report(str(root)).endswith("/night/report.html")


def test_report_of_a_folder_without_a_job_is_refused(tmp_path):
    with pytest.raises(report.InputError, match="no _manifest.json"):
        report.gather(str(tmp_path))


def test_a_lone_time_point_gets_a_readable_axis():
    """One shard, or the first night: the time axis spans the pad either side, not a millisecond."""
    manifest = {"shards": [{"shard": 0, "seconds": 2.0, "tokens": {"completion": 10}, "committed_at": "2026-11-30T15:38:14+00:00"}]}
    assert report.throughput_chart(manifest).layout.xaxis.range == ("2026-11-30T15:37:14+00:00", "2026-11-30T15:39:14+00:00")
    nights = [{"finished_at": "2026-11-30T02:00:00+00:00", "accuracy": 0.5}]
    assert report.trend_chart(nights).layout.xaxis.range == ("2026-11-29T02:00:00+00:00", "2026-12-01T02:00:00+00:00")
    two = nights + [{"finished_at": "2026-12-01T02:00:00+00:00", "accuracy": 0.6}]
    assert report.trend_chart(two).layout.xaxis.range is None  # plotly's own range
