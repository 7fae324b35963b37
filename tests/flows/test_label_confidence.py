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
