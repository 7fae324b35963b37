"""The nightly jobs' own logic, without Prefect or a model: labels, grades, intervals,
costs, synthetic expansion and de-duplication, output paths, Ray actor sizing."""

import json
from collections import Counter
from datetime import date

import pyarrow as pa
import pytest

from ossbatch.flows import grading, synthetic
from ossbatch.flows.jobs import check_columns, column_named, resolve_output, slug
from ossbatch.flows.nightly import default_history
from ossbatch.flows.ray_runner import actor_plan
from ossbatch.pipeline.read import BadLine
from ossbatch.pipeline.storage import LOCAL
from ossbatch.pipeline.write import SOURCE_KEY


def _rows(**columns) -> pa.Table:
    n = len(next(iter(columns.values())))
    base = {"id": [f"r{i}" for i in range(n)], "status": ["ok"] * n, "output_text": [None] * n,
            "output_json": [None] * n, "schema_valid": [None] * n}
    return pa.table(base | columns)


def test_labels_become_an_enum_schema_and_a_schema_stays_as_given():
    schema = grading.label_schema(["pos", "neg", "pos", " neutral "])
    assert schema == {"type": "object", "properties": {"label": {"enum": ["pos", "neg", "neutral"]}},
                      "required": ["label"], "additionalProperties": False}
    own = {"type": "object", "properties": {"topic": {"enum": ["a", "b"]}, "why": {"type": "string"}}}
    assert grading.label_schema(own, "topic") is own
    assert grading.label_names(own, "topic") == ["a", "b"]
    with pytest.raises(ValueError, match="label"):
        grading.label_schema({"type": "object", "properties": {}})
    with pytest.raises(ValueError):
        grading.label_schema([])


def test_label_column_comes_from_the_valid_structured_answer_only():
    table = _rows(output_json=['{"label":"pos"}', '{"label":"neg"}', None, '{"label":"pos"}', '["pos"]'],
                  schema_valid=[True, True, False, False, True],
                  gold=["pos", "pos", "neg", "pos", None])
    labeled, counts = grading.label_columns(table, "label", "gold")
    assert labeled.column("label").to_pylist() == ["pos", "neg", None, None, None]
    assert labeled.column("correct").to_pylist() == [True, False, False, False, False]
    assert counts == Counter({("pos", "pos"): 1, ("pos", "neg"): 1, ("neg", None): 1, ("pos", None): 1, (None, None): 1})
    confusion = grading.confusion_table(counts)
    assert sum(confusion.column("rows").to_pylist()) == 5
    text = grading.format_confusion(counts, ["pos", "neg", "neutral"])
    header = text.splitlines()[0].split()
    assert header[-5:] == ["pos", "neg", "neutral", "(none)", "total"]  # every label a column
    assert text.splitlines()[-1] == "agreement 1/5 (20.0%)"


def test_an_input_column_named_like_ours_is_kept_renamed():
    table = _rows(output_json=['{"label":"a"}'], schema_valid=[True], label=["gold-a"])
    labeled, counts = grading.label_columns(table, "label", "label")
    assert labeled.column("input_label").to_pylist() == ["gold-a"]
    assert labeled.column("label").to_pylist() == ["a"]
    assert counts == Counter({("gold-a", "a"): 1})


def test_choice_extraction_prefers_the_structured_answer():
    assert grading.extract_choice('{"answer":"c"}', True, "answer: A") == "C"
    assert grading.extract_choice(None, False, "I think the answer is (B).") == "B"
    assert grading.extract_choice(None, None, " D ") == "D"
    assert grading.extract_choice(None, None, "A cat sat on the mat") is None  # an article is not a choice
    assert grading.extract_choice(None, None, None) is None
    assert grading.extract_choice(None, None, "Option: E", choices="ABCDE") == "E"
    assert [grading.normalize_choice(g) for g in ["b", "(C)", "D.", 0, 3, 4, "AB", None, True]] == \
        ["B", "C", "D", "A", "D", None, None, None, None]


def test_grading_counts_every_row_and_breaks_down_by_category():
    table = _rows(output_json=['{"answer":"A"}', '{"answer":"B"}', None, '{"answer":"C"}'],
                  schema_valid=[True, True, None, True],
                  output_text=['{"answer":"A"}', '{"answer":"B"}', None, '{"answer":"C"}'],
                  gold=["A", "C", "B", "(c)"], topic=["x", "x", "y", None])
    graded, counts = grading.grade_columns(table, "choice", "gold", category_column="topic")
    assert graded.column("predicted").to_pylist() == ["A", "B", None, "C"]
    assert graded.column("gold_answer").to_pylist() == ["A", "C", "B", "C"]
    assert graded.column("correct").to_pylist() == [True, False, False, True]
    rows = grading.accuracy_rows(counts)
    assert [(r["category"], r["n"], r["correct"]) for r in rows] == [("(all)", 4, 2), ("x", 2, 1), ("y", 1, 0), ("(none)", 1, 1)]

    exact = _rows(output_json=['{"answer":"Paris "}', '{"answer":"lyon"}'], schema_valid=[True, True],
                  gold=["paris", "Marseille"])
    graded, counts = grading.grade_columns(exact, "exact", "gold")
    assert graded.column("correct").to_pylist() == [True, False]
    assert counts == {"(all)": [2, 1]}
    with pytest.raises(ValueError, match="grading"):
        grading.grade_columns(exact, "fuzzy", "gold")


def test_wilson_interval_matches_known_values():
    low, high = grading.wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert grading.wilson_interval(0, 10)[0] == 0.0 and 0.27 < grading.wilson_interval(0, 10)[1] < 0.28
    assert grading.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert grading.wilson_interval(0, 0) == (0.0, 1.0)


def test_cost_uses_prompt_and_completion_prices():
    cost = grading.token_cost({"prompt": 2_000_000, "completion": 500_000}, (0.5, 2.0))
    assert cost["input"] == pytest.approx(1.0) and cost["output"] == pytest.approx(1.0) and cost["total"] == pytest.approx(2.0)


def test_synthetic_expansion_gives_each_sample_its_own_stable_seed():
    copies = synthetic.expand_record({"id": "q1", "prompt": "hi", "topic": "t"}, "in.jsonl:1", 3, job_seed=7)
    assert [c["id"] for c in copies] == ["q1#0", "q1#1", "q1#2"]
    assert [c["sample"] for c in copies] == [0, 1, 2] and {c["source_id"] for c in copies} == {"q1"}
    seeds = [c["seed"] for c in copies]
    assert len(set(seeds)) == 3 and seeds == [c["sample_seed"] for c in copies]
    assert seeds == [synthetic.sample_seed(7, "q1", k) for k in range(3)]
    assert synthetic.expand_record({"id": "q1", "prompt": "hi"}, "x", 3, job_seed=7)[1]["seed"] == seeds[1]
    assert synthetic.expand_record({"id": "q1", "prompt": "hi"}, "x", 3, job_seed=8)[1]["seed"] != seeds[1]

    batch = {"custom_id": "c1", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 3}}
    copies = synthetic.expand_record(batch, "x", 2, job_seed=0)
    assert [c["custom_id"] for c in copies] == ["c1#0", "c1#1"] and "id" not in copies[0]
    assert copies[0]["body"]["seed"] == synthetic.sample_seed(3, "c1", 0) and batch["body"]["seed"] == 3

    unnamed = synthetic.expand_record({"prompt": "hi"}, "in.jsonl:4", 1, job_seed=0)
    assert unnamed[0]["id"] == "in.jsonl:4#0"
    bad = synthetic.expand_record(BadLine("in.jsonl line 5: not valid JSON"), "in.jsonl:5", 2, job_seed=0)
    assert bad[1]["id"] == "in.jsonl:5#1" and "not valid JSON" in bad[1]["source_error"]
    with pytest.raises(ValueError, match="sample"):
        synthetic.expand_record({"id": "q", "prompt": "p", "sample": 1}, "x", 2, job_seed=0)


def test_dedupe_keeps_the_first_sample_of_each_answer_per_row():
    ids = ["a#0", "a#1", "a#2", "b#0", "b#1", "b#2"]
    part = pa.table({
        "id": ids, "status": ["ok", "ok", "ok", "ok", "error", "error"],
        "output_text": ["x", "x ", "y", "x", None, None],
        "output_json": [None] * 6,
        "source_id": ["a", "a", "a", "b", "b", "b"], "sample": [0, 1, 2, 0, 1, 2], "sample_seed": [1, 2, 3, 4, 5, 6],
    })
    samples = synthetic.SampleTable(dedupe=True)
    # Split across two parts mid-row, as shards may cut a row's samples.
    out = pa.concat_tables([samples.convert(part.slice(0, 2)), samples.convert(part.slice(2))])
    assert out.column_names[:4] == ["id", "sample", "seed", "request_id"]
    assert out.column("request_id").to_pylist() == ["a#0", "a#2", "b#0", "b#1", "b#2"]  # errors never dropped
    assert (samples.kept, samples.dropped) == (5, 1)
    everything = synthetic.SampleTable(dedupe=False)
    assert everything.convert(part).num_rows == 6


def test_outputs_paths_and_keys():
    assert resolve_output("s3://b/labels/{date}", date(2026, 1, 2)) == "s3://b/labels/2026-01-02"
    assert default_history("s3://b/evals/2026-01-02", "mmlu") == "s3://b/evals/mmlu.history.jsonl"
    assert default_history("s3://b", "mmlu") == "s3://b/mmlu.history.jsonl"
    assert default_history("/data/evals/run", "m") == "/data/evals/m.history.jsonl"
    assert default_history("run", "m") == "m.history.jsonl"
    assert slug("MMLU mini / v2") == "mmlu-mini-v2"
    schema = pa.schema([pa.field("input_status", pa.string(), metadata={SOURCE_KEY: b"status"}), pa.field("gold", pa.string())])
    assert column_named(schema, "status") == "input_status" and column_named(schema, "gold") == "gold"
    assert column_named(schema, "nope") is None


def test_a_missing_gold_column_fails_before_any_work(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "p", "answer": "A"}) + "\n")
    check_columns([str(path)], LOCAL, {"--gold-column": "answer"})
    with pytest.raises(ValueError, match="--gold-column 'gold' is not a column of the input; its columns: answer"):
        check_columns([str(path)], LOCAL, {"--gold-column": "gold"})


def test_ray_actors_take_a_gpu_each_or_share_a_node_s_cpus():
    node = {"Alive": True, "Resources": {"CPU": 8.0}}
    assert actor_plan({"CPU": 16.0, "GPU": 4.0}, [node, node], None, 10) == (4, {"num_gpus": 1})
    assert actor_plan({"CPU": 16.0, "GPU": 4.0}, [node, node], None, 2) == (2, {"num_gpus": 1})
    assert actor_plan({"CPU": 16.0, "GPU": 4.0}, [node, node], 9, 10) == (4, {"num_gpus": 1})
    assert actor_plan({"CPU": 16.0}, [node, node], None, 10) == (2, {"num_cpus": 8})
    assert actor_plan({"CPU": 2.0}, [{"Alive": True, "Resources": {"CPU": 2.0}}], 2, 4) == (2, {"num_cpus": 1})
