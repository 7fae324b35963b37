"""Label probabilities in `ossbatch label` (and abstention below --min-confidence) and choice
probabilities in `ossbatch eval`, with calibration: ECE, Brier score, a reliability table."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from flow_helpers import write_jsonl

from ossbatch.flows import grading
from ossbatch.flows.cli import main


REVIEWS = [
    {"id": "r1", "prompt": "Sentiment of: 'great battery'", "sentiment": "positive"},
    {"id": "r2", "prompt": "Sentiment of: 'broke in a week'", "sentiment": "negative"},
    {"id": "r3", "prompt": "Sentiment of: 'it is a phone'", "sentiment": "neutral"},
    {"id": "r4", "prompt": "Sentiment of: 'love it'", "sentiment": "positive"},
    {"id": "r5", "prompt": "Sentiment of: 'meh'", "sentiment": "neutral"},
    {"id": "r6", "prompt": "Sentiment of: 'awful screen'", "sentiment": "negative"},
]


def _rows(**columns) -> pa.Table:
    n = len(next(iter(columns.values())))
    base = {"id": [f"r{i}" for i in range(n)], "status": ["ok"] * n, "output_text": [None] * n}
    return pa.table(base | columns)


def test_labels_below_min_confidence_abstain_and_keep_their_probabilities():
    table = _rows(output_json=['{"label":"pos"}', '{"label":"neg"}', '{"label":"pos"}', None],
                  schema_valid=[True, True, True, None], gold=["pos", "pos", "neg", "neg"],
                  label_confidence=[0.9, 0.55, 0.6, None])
    labeled, counts = grading.label_columns(table, "label", "gold", min_confidence=0.6)
    assert labeled.column("label").to_pylist() == ["pos", None, "pos", None]
    assert labeled.column("abstained").to_pylist() == [False, True, False, False]
    assert labeled.column("label_confidence").to_pylist() == [0.9, 0.55, 0.6, None]  # kept
    assert counts == Counter({("pos", "pos"): 1, ("pos", grading.ABSTAINED): 1, ("neg", "pos"): 1, ("neg", None): 1})
    confusion = grading.confusion_table(counts).to_pylist()
    assert {"gold": "pos", "label": None, "abstained": True, "rows": 1} in confusion
    assert {"gold": "neg", "label": None, "abstained": False, "rows": 1} in confusion
    lines = grading.format_confusion(counts, ["pos", "neg"]).splitlines()
    assert lines[0].split()[-3:] == ["(none)", "(abstained)", "total"]
    assert lines[-2] == "agreement 1/4 (25.0%)"
    assert lines[-1] == "abstained 1/4 (25.0%); accuracy on the rest 1/3 (33.3%)"
    # without --min-confidence nothing abstains and the table is as before
    plain, plain_counts = grading.label_columns(table, "label", "gold")
    assert "abstained" not in plain.column_names and grading.ABSTAINED not in {p for _, p in plain_counts}
    assert "abstained" not in grading.format_confusion(plain_counts, ["pos", "neg"])


def test_label_command_scores_labels_and_abstains(tiny_model_dir, tmp_path, capsys):
    source = write_jsonl(tmp_path / "reviews.jsonl", REVIEWS)
    out = tmp_path / "labels"
    assert main(["label", "--model", str(tiny_model_dir), "--input", source, "--output", str(out),
                 "--labels", "positive", "negative", "neutral", "--gold-column", "sentiment", "--min-confidence", "0.6",
                 "--max-tokens", "48", "--max-reasoning-tokens", "4", "--temperature", "0",
                 "--orchestrator", "none"]) == 0
    rows = pq.read_table(out / "labels.parquet").to_pylist()
    for row in rows:
        answered = json.loads(row["output_json"])["label"] if row["output_json"] and row["schema_valid"] else None
        if answered is None:
            continue
        probs = dict(row["label_probs"])
        assert sorted(probs) == ["negative", "neutral", "positive"] and sum(probs.values()) == pytest.approx(1)
        assert row["label_confidence"] == pytest.approx(probs[answered])
        assert row["abstained"] == (row["label_confidence"] < 0.6)
        assert row["label"] == (None if row["abstained"] else answered)
    printed = capsys.readouterr().out
    abstained = sum(r["abstained"] for r in rows)
    assert f"{abstained} abstained" in printed
    if abstained:
        assert "(abstained)" in printed and "accuracy on the rest" in printed
    confusion = pq.read_table(out / "confusion.parquet").to_pylist()
    assert sum(c["rows"] for c in confusion if c["abstained"]) == abstained


def test_min_confidence_must_be_a_probability(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["label", "--model", "m", "--input", "x.jsonl", "--output", str(tmp_path), "--labels", "a",
              "--min-confidence", "1.5"])
    assert exit_.value.code == 2 and "--min-confidence must be a probability from 0 to 1" in capsys.readouterr().err


def test_calibration_by_hand():
    """Three scored rows in two categories: ECE, Brier and the bins computed by hand."""
    table = pa.table({
        "choice_probs": pa.array([{"A": 0.9, "B": 0.1}, {"A": 0.3, "B": 0.7}, {"A": 0.55, "B": 0.45}, None],
                                 pa.map_(pa.string(), pa.float64())),
        "predicted": ["A", "B", "A", None], "gold_answer": ["A", "A", "A", "B"], "correct": [True, False, True, False],
        "topic": ["x", "x", "y", "y"],
    })
    calibration = grading.Calibration()
    calibration.add(table, "topic")
    overall = calibration.summary(grading.ALL)
    assert overall["calibrated_n"] == 3  # the row without probabilities is left out
    # bins: 0.9 (right), 0.7 (wrong), 0.55 (right) -> |0.9-1| + |0.7-0| + |0.55-1| over 3
    assert overall["ece"] == pytest.approx((0.1 + 0.7 + 0.45) / 3)
    assert overall["brier"] == pytest.approx(((0.1 ** 2 + 0.1 ** 2) + (0.7 ** 2 + 0.7 ** 2) + (0.45 ** 2 + 0.45 ** 2)) / 3)
    assert calibration.summary("x")["calibrated_n"] == 2 and calibration.summary("y")["ece"] == pytest.approx(0.45)
    assert calibration.summary("nothing") == {"calibrated_n": 0, "ece": None, "brier": None}
    bins = [b for b in calibration.reliability() if b["category"] == grading.ALL]
    assert len(bins) == 10 and [b["n"] for b in bins] == [0, 0, 0, 0, 0, 1, 0, 1, 0, 1]
    assert bins[9]["high"] == 1.0 and bins[7]["accuracy"] == 0.0 and bins[5]["mean_confidence"] == pytest.approx(0.55)
    one = grading.reliability_bins([(1.0, True, 0.0)])
    assert one[9]["n"] == 1  # a confidence of exactly 1 lands in the last bin


QUESTIONS = [
    {"id": "e1", "prompt": "7 * 8?\nA) 54\nB) 56\nC) 58\nD) 64", "answer": "B", "category": "math"},
    {"id": "e2", "prompt": "81 / 9?\nA) 8\nB) 7\nC) 9\nD) 11", "answer": "C", "category": "math"},
    {"id": "e3", "prompt": "Capital of France?\nA) Paris\nB) Rome\nC) Oslo\nD) Bern", "answer": "A", "category": "geo"},
    {"id": "e4", "prompt": "Largest ocean?\nA) Arctic\nB) Indian\nC) Pacific\nD) Atlantic", "answer": "C", "category": "geo"},
]


def test_eval_reports_calibration_and_its_change(tiny_model_dir, tmp_path, capsys):
    from ossbatch.flows import report

    questions = write_jsonl(tmp_path / "mcq.jsonl", QUESTIONS)
    for night, temperature in (("n1", "0"), ("n2", "1")):
        assert main(["eval", "--model", str(tiny_model_dir), "--input", questions, "--output", str(tmp_path / night),
                     "--max-tokens", "40", "--max-reasoning-tokens", "4", "--temperature", temperature,
                     "--orchestrator", "none", "--quiet"]) == 0
    root = tmp_path / "n2"
    graded = pq.read_table(root / "graded.parquet").to_pylist()
    scored = [(dict(r["choice_probs"]), r) for r in graded if r["choice_probs"] is not None and r["predicted"]]
    assert scored, "the tiny model answers some questions under the grammar"
    for probs, _ in scored:
        assert sorted(probs) == list("ABCD") and sum(probs.values()) == pytest.approx(1)
    brier = sum(sum((p - (k == r["gold_answer"])) ** 2 for k, p in probs.items()) for probs, r in scored) / len(scored)
    summary = {r["category"]: r for r in pq.read_table(root / "summary.parquet").to_pylist()}
    assert summary[grading.ALL]["calibrated_n"] == len(scored)
    assert summary[grading.ALL]["brier"] == pytest.approx(brier)
    assert set(summary) == {grading.ALL, "math", "geo"}
    reliability = pq.read_table(root / "reliability.parquet").to_pylist()
    overall_bins = [b for b in reliability if b["category"] == grading.ALL]
    assert len(overall_bins) == 10 and sum(b["n"] for b in overall_bins) == len(scored)
    ece = sum(b["n"] * abs(b["mean_confidence"] - b["accuracy"]) for b in overall_bins if b["n"]) / len(scored)
    assert summary[grading.ALL]["ece"] == pytest.approx(ece)

    eval_json = json.loads((root / "eval.json").read_text())
    before = json.loads((tmp_path / "n1" / "eval.json").read_text())
    assert eval_json["delta_ece"] == pytest.approx(eval_json["ece"] - before["ece"])
    assert eval_json["delta_brier"] == pytest.approx(eval_json["brier"] - before["brier"])
    overall = eval_json["categories"][0]
    assert overall["delta_brier"] == pytest.approx(eval_json["delta_brier"])
    markdown = grading.eval_markdown(eval_json)
    assert "Calibration of the choice probabilities" in markdown and "| Δ ECE | Δ Brier |" in markdown
    assert markdown.count("| 0.") >= 10  # the reliability table's ten bins
    figures = {f.layout.title.text: f for f in report.charts(report.gather(str(root)))}
    assert "Reliability (10 confidence bins)" in figures
    page = (root / "report.html").read_text()
    assert "expected calibration error" in page and "since the previous run" in page
