"""The Prefect flows end to end with the tiny random model: `ossbatch run` through
`batch_inference`, shard retries, and the label, synth and eval jobs on local files and S3.

The random model's answers are noise; what is checked is what the flows do with
them: every row once, labels and grades that follow from each row's output, tables
that add up, history and artifacts.  All tests share one Prefect server.
"""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ossbatch.flows import grading, synthetic
from ossbatch.flows.cli import main
from ossbatch.pipeline.config import Job, JobOptions
from flow_helpers import jsonl, write_jsonl

REVIEWS = [
    {"id": "r1", "prompt": "Sentiment of: 'great battery'", "sentiment": "positive"},
    {"id": "r2", "prompt": "Sentiment of: 'broke in a week'", "sentiment": "negative"},
    {"id": "r3", "prompt": "Sentiment of: 'it is a phone'", "sentiment": "neutral"},
    {"id": "r4", "prompt": "Sentiment of: 'love it'", "sentiment": "positive"},
]
QUESTIONS = [
    {"id": "e1", "prompt": "7 * 8?\nA) 54\nB) 56\nC) 58\nD) 64", "answer": "B", "category": "math"},
    {"id": "e2", "prompt": "81 / 9?\nA) 8\nB) 7\nC) 9\nD) 11", "answer": "C", "category": "math"},
    {"id": "e3", "prompt": "Closest planet to the Sun?\nA) Venus\nB) Earth\nC) Mars\nD) Mercury", "answer": "D", "category": "science"},
    {"id": "e4", "prompt": "Synonym of rapid?\nA) slow\nB) quick\nC) late\nD) heavy", "answer": "B", "category": "language"},
]
# Small answers: a short reasoning budget leaves room for the JSON within max_tokens.  One
# shard per job unless a test needs more: constrained decoding on 2 CPU cores is the slow part.
STRUCTURED = dict(max_tokens=48, max_reasoning_tokens=4, temperature=0.0)


def _table(path_or_file) -> pa.Table:
    return pq.read_table(path_or_file)


def _rows_by_id(table: pa.Table) -> dict:
    return {row["id"]: row for row in table.to_pylist()}


def _artifacts(**filters):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, ArtifactFilterType

    artifact_filter = ArtifactFilter(
        key=ArtifactFilterKey(any_=[filters["key"]]) if "key" in filters else None,
        type=ArtifactFilterType(any_=[filters["type"]]) if "type" in filters else None,
    )
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=artifact_filter)


def test_run_through_prefect_matches_the_plain_run_and_publishes_progress(prefect_server, tiny_model_dir, tmp_path):
    rows = [{"id": f"q{i}", "prompt": f"question {i}", "topic": "t"} for i in range(4)]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    common = ["--model", str(tiny_model_dir), "--input", source, "--max-tokens", "4", "--temperature", "0",
              "--shard-rows", "2", "--keep-token-ids"]
    assert main(["run", *common, "--output", str(tmp_path / "prefect")]) == 0
    assert main(["run", *common, "--output", str(tmp_path / "plain"), "--orchestrator", "none", "--quiet"]) == 0

    with_prefect = _rows_by_id(pa.concat_tables([_table(p) for p in sorted((tmp_path / "prefect" / "data").glob("part-*"))]))
    plain = _rows_by_id(pa.concat_tables([_table(p) for p in sorted((tmp_path / "plain" / "data").glob("part-*"))]))
    assert set(with_prefect) == {"q0", "q1", "q2", "q3"}
    assert {k: r["output_token_ids"] for k, r in with_prefect.items()} == {k: r["output_token_ids"] for k, r in plain.items()}
    manifest = json.loads((tmp_path / "prefect" / "_manifest.json").read_text())
    assert manifest["rows"]["total"] == 4 and len(manifest["shards"]) == 2

    progress = [a for a in _artifacts(type="progress") if str(tmp_path / "prefect") in (a.description or "")]
    assert len(progress) == 1 and progress[0].data == 100.0


def test_a_shard_that_fails_once_is_retried_and_the_job_completes(prefect_server, tiny_model_dir, tmp_path, monkeypatch):
    import ossbatch.flows.batch
    from ossbatch.flows.batch import batch_inference

    real = ossbatch.flows.batch.run_shard
    calls = []

    def flaky(plan, shard_index, engine, worker=None):
        calls.append(shard_index)
        if len(calls) == 1:
            raise ConnectionError("the store dropped the connection")
        return real(plan, shard_index, engine, worker)

    monkeypatch.setattr(ossbatch.flows.batch, "run_shard", flaky)
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"q {i}"} for i in range(4)])
    job = Job(model=str(tiny_model_dir), inputs=[source], output=str(tmp_path / "out"),
              options=JobOptions(max_tokens=3, shard_rows=2))
    manifest = batch_inference(job, quiet=True)
    assert calls == [0, 0, 1]  # shard 0 failed, was retried, then shard 1 ran
    assert manifest["rows"]["total"] == 4 and [s["shard"] for s in manifest["shards"]] == [0, 1]
    ids = pa.concat_tables([_table(p) for p in sorted((tmp_path / "out" / "data").glob("part-*"))]).column("id").to_pylist()
    assert sorted(ids) == ["q0", "q1", "q2", "q3"]  # every row exactly once


def test_label_command_writes_labels_and_a_confusion_table(prefect_server, tiny_model_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "reviews.jsonl", REVIEWS)
    out = tmp_path / "labels" / "{date}"
    assert main(["label", "--model", str(tiny_model_dir), "--input", source, "--output", str(out),
                 "--labels", "positive", "negative", "neutral", "--gold-column", "sentiment",
                 "--max-tokens", "48", "--max-reasoning-tokens", "4", "--temperature", "0"]) == 0
    (root,) = (tmp_path / "labels").iterdir()  # {date} became the run's date
    assert len(root.name) == 10 and root.name[4] == "-"

    labeled = _table(root / "labels.parquet")
    rows = _rows_by_id(labeled)
    assert sorted(rows) == ["r1", "r2", "r3", "r4"]
    for row in rows.values():
        expected = json.loads(row["output_json"])["label"] if row["output_json"] and row["schema_valid"] else None
        assert row["label"] == expected
        assert row["label"] in (None, "positive", "negative", "neutral")
        assert row["correct"] == (row["label"] == row["sentiment"])
    assert any(row["label"] for row in rows.values()), "constrained decoding should label some rows"

    confusion = _table(root / "confusion.parquet").to_pylist()
    assert sum(c["rows"] for c in confusion) == 4
    for c in confusion:
        assert c["rows"] == sum(1 for r in rows.values() if (r["sentiment"], r["label"]) == (c["gold"], c["label"]))
    printed = capsys.readouterr().out
    assert "gold \\ label" in printed and f"agreement {sum(r['correct'] for r in rows.values())}/4" in printed
    assert json.loads((root / "job" / "_manifest.json").read_text())["rows"]["total"] == 4
    assert _artifacts(key="labels-reviews"), "the confusion table is published as a markdown artifact"


def test_label_flow_on_s3_resumes_without_duplicating_rows(prefect_server, tiny_model_dir, s3):
    from ossbatch.flows.nightly import label_job

    s3.fs.pipe_file(f"{s3.bucket}/in/reviews.jsonl", jsonl(REVIEWS).encode())
    options = JobOptions(**STRUCTURED)
    root = f"s3://{s3.bucket}/labels/run"
    first = label_job(str(tiny_model_dir), [f"s3://{s3.bucket}/in/reviews.jsonl"], root, ["positive", "negative"],
                      options=options, quiet=True)
    assert first["rows"] == 4 and first["confusion"] is None
    with s3.fs.open(f"{s3.bucket}/labels/run/labels.parquet", "rb") as f:
        labels = _table(f)
    assert sorted(labels.column("id").to_pylist()) == ["r1", "r2", "r3", "r4"]
    assert "label" in labels.column_names and "correct" not in labels.column_names
    assert not s3.fs.exists(f"{s3.bucket}/labels/run/confusion.parquet")
    markers_before = {p: s3.fs.cat_file(p) for p in s3.fs.ls(f"{s3.bucket}/labels/run/job/_shards")}

    again = label_job(str(tiny_model_dir), [f"s3://{s3.bucket}/in/reviews.jsonl"], root, ["positive", "negative"],
                      options=options, quiet=True)
    s3.fs.invalidate_cache()
    assert {p: s3.fs.cat_file(p) for p in s3.fs.ls(f"{s3.bucket}/labels/run/job/_shards")} == markers_before  # nothing re-ran
    with s3.fs.open(f"{s3.bucket}/labels/run/labels.parquet", "rb") as f:
        assert _table(f).column("label").to_pylist() == labels.column("label").to_pylist()
    assert again["table"] == first["table"]


def test_synth_flow_expands_rows_into_seeded_samples_and_dedupes(prefect_server, tiny_model_dir, tmp_path):
    from ossbatch.flows.nightly import synth_job

    source = write_jsonl(tmp_path / "topics.jsonl", [{"id": "t1", "prompt": "yes or no?", "topic": "a"},
                                                     {"id": "t2", "prompt": "no or yes?", "topic": "b"}])
    # A two-word answer space: samples of a row must collide, so dedupe has work to do.
    schema = grading.label_schema(["yes", "no"], "answer")
    summary = synth_job(str(tiny_model_dir), [source], str(tmp_path / "synth"), n=4, dedupe=True, answer_schema=schema,
                        options=JobOptions(max_tokens=32, max_reasoning_tokens=2, seed=5), quiet=True)
    assert summary["rows"] == 2 and summary["requests"] == 8

    job = pa.concat_tables([_table(p) for p in sorted((tmp_path / "synth" / "job" / "data").glob("part-*"))])
    assert sorted(job.column("id").to_pylist()) == [f"t{i}#{k}" for i in (1, 2) for k in range(4)]
    samples = _table(tmp_path / "synth" / "samples.parquet")
    assert samples.column_names[:4] == ["id", "sample", "seed", "request_id"] and "topic" in samples.column_names
    for row in samples.to_pylist():
        assert row["request_id"] == f"{row['id']}#{row['sample']}"
        assert row["seed"] == synthetic.sample_seed(5, row["id"], row["sample"])
    assert len(set(job.column("sample_seed").to_pylist())) == 8  # every sample its own seed

    # Dropped = ok answers seen before for the same row; nothing else.
    seen, expected_dropped = {}, 0
    for row in job.to_pylist():
        if row["status"] == "ok":
            answer = row["output_json"] if row["output_json"] is not None else row["output_text"].strip()
            expected_dropped += answer in seen.setdefault(row["source_id"], set())
            seen[row["source_id"]].add(answer)
    assert expected_dropped > 0
    assert (summary["kept"], summary["duplicates"]) == (8 - expected_dropped, expected_dropped)
    assert samples.num_rows == summary["kept"]


def test_eval_flow_grades_records_history_and_reports_the_change(prefect_server, tiny_model_dir, tmp_path):
    from ossbatch.flows.nightly import eval_job

    source = write_jsonl(tmp_path / "mcq.jsonl", QUESTIONS)
    price = (0.5, 2.0)
    results = []
    for night, seed in (("night1", 1), ("night2", 2)):
        results.append(eval_job(str(tiny_model_dir), [source], str(tmp_path / "evals" / night), name="mini",
                                price_per_million_tokens=price,
                                options=JobOptions(**{**STRUCTURED, "temperature": 1.0, "seed": seed}), quiet=True))
    first, second = results

    graded = _table(tmp_path / "evals" / "night2" / "graded.parquet")
    assert sorted(graded.column("id").to_pylist()) == ["e1", "e2", "e3", "e4"]
    for row in graded.to_pylist():
        assert row["predicted"] == grading.extract_choice(row["output_json"], row["schema_valid"], row["output_text"])
        assert row["correct"] == (row["predicted"] is not None and row["predicted"] == row["answer"])
    correct = sum(graded.column("correct").to_pylist())
    overall = second["categories"][0]
    assert (overall["category"], overall["n"], overall["correct"]) == ("(all)", 4, correct)
    assert (overall["ci_low"], overall["ci_high"]) == pytest.approx(grading.wilson_interval(correct, 4))
    by_category = {row["category"]: row for row in second["categories"][1:]}
    assert {k: v["n"] for k, v in by_category.items()} == {"math": 2, "science": 1, "language": 1}
    summary_table = _table(tmp_path / "evals" / "night2" / "summary.parquet").to_pylist()
    assert summary_table[0]["accuracy"] == pytest.approx(correct / 4)

    manifest = json.loads((tmp_path / "evals" / "night2" / "job" / "_manifest.json").read_text())
    assert second["tokens"]["prompt"] == manifest["tokens"]["prompt"] > 0
    assert second["cost"]["total"] == pytest.approx(
        manifest["tokens"]["prompt"] * 0.5 / 1e6 + manifest["tokens"]["completion"] * 2.0 / 1e6)

    history = [json.loads(line) for line in (tmp_path / "evals" / "mini.history.jsonl").read_text().splitlines()]
    assert [h["output"] for h in history] == [first["output"], second["output"]]
    assert first["previous"] is None and second["previous"]["output"] == first["output"]
    assert second["delta_accuracy"] == pytest.approx(second["accuracy"] - first["accuracy"])
    assert json.loads((tmp_path / "evals" / "night2" / "eval.json").read_text())["delta_accuracy"] == second["delta_accuracy"]

    reports = _artifacts(key="eval-mini")
    assert len(reports) == 2 and any("points" in a.data for a in reports)
    assert "| math | 2 |" in second["report"]


def test_eval_refuses_a_missing_gold_column_before_running(prefect_server, tiny_model_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "mcq.jsonl", QUESTIONS)
    assert main(["eval", "--model", str(tiny_model_dir), "--input", source, "--output", str(tmp_path / "e"),
                 "--gold-column", "gold", "--quiet"]) == 2
    assert "--gold-column 'gold' is not a column" in capsys.readouterr().err
    assert not (tmp_path / "e" / "job").exists()


def test_storage_options_stay_out_of_the_flow_runs_parameters_and_the_output(prefect_server, tiny_model_dir, tmp_path):
    from prefect.client.orchestration import get_client

    from ossbatch.flows.batch import batch_inference
    from ossbatch.pipeline.storage import Storage

    source = write_jsonl(tmp_path / "in.jsonl", [{"id": "q0", "prompt": "q"}])
    secret = Storage.from_options({"s3": {"secret": "hunter2"}})  # s3 options: the local files never see them
    job = Job(model=str(tiny_model_dir), inputs=[source], output=str(tmp_path / "out"),
              options=JobOptions(max_tokens=2, storage=secret))
    assert batch_inference(job, quiet=True)["rows"]["total"] == 1
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if str(tmp_path / "out") in json.dumps(r.parameters, default=str)]
    assert len(runs) == 1 and runs[0].parameters["job"]["options"]["max_tokens"] == 2
    assert "hunter2" not in json.dumps(runs[0].parameters, default=str)
    assert "hunter2" not in (tmp_path / "out" / "_job.json").read_text()
