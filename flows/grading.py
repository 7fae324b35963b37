"""Labels, grades, confidence intervals and costs over a finished job's rows.

Plain functions over Arrow tables and values (no Prefect, no engine), so the
flows stay thin and these are tested on their own.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pyarrow as pa

from ossbatch.pipeline.storage import InputError

LABEL_FIELD = "label"
ANSWER_FIELD = "answer"
NO_LABEL = "(none)"
ABSTAINED = "(abstained)"  # a label count's key (and the confusion table's column) for rows left unlabeled below --min-confidence
CALIBRATION_BINS = 10
ALL = "(all)"
Z_95 = 1.959963984540054
GRADING_RULES = ("choice", "exact")


# --------------------------------------------------------------------------- schemas


def label_schema(labels: list[str] | dict, field: str = LABEL_FIELD) -> dict:
    """A list of labels becomes an enum schema on ``field``; a schema is used as it is."""
    if isinstance(labels, dict):
        properties = labels.get("properties")
        if labels.get("type") != "object" or not isinstance(properties, dict) or field not in properties:
            raise InputError(f"a labels schema must be an object schema with a {field!r} property")
        return labels
    names = list(dict.fromkeys(str(label).strip() for label in labels))
    if not names or "" in names:
        raise InputError("--labels needs at least one non-empty label")
    return {
        "type": "object",
        "properties": {field: {"enum": names}},
        "required": [field],
        "additionalProperties": False,
    }


def label_names(schema: dict, field: str = LABEL_FIELD) -> list[str]:
    """The enum of ``field``, when the schema has one (for ordering a confusion table)."""
    return [str(v) for v in schema.get("properties", {}).get(field, {}).get("enum", [])]


def choice_schema(choices: str = "ABCD", field: str = ANSWER_FIELD) -> dict:
    return {
        "type": "object",
        "properties": {field: {"enum": list(choices)}},
        "required": [field],
        "additionalProperties": False,
    }


def exact_schema(field: str = ANSWER_FIELD) -> dict:
    return {
        "type": "object",
        "properties": {field: {"type": "string"}},
        "required": [field],
        "additionalProperties": False,
    }


# --------------------------------------------------------------------------- extraction


def answer_field(output_json: str | None, schema_valid: bool | None, field: str):
    """``field`` of a row's structured answer; None when the answer is missing or broke its schema."""
    if output_json is None or schema_valid is False:
        return None
    try:
        value = json.loads(output_json)
    except ValueError:
        return None
    return value.get(field) if isinstance(value, dict) else None


def as_text(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


_CHOICE_AFTER_WORD = r"(?i:answer|option|choice)\s*(?:is|:|-)?\s*\(?([{letters}])\)?(?![A-Za-z])"
_CHOICE_ALONE = r"^\W*\(?([{letters}])\)?\W*$"


def extract_choice(output_json: str | None, schema_valid: bool | None, output_text: str | None,
                   field: str = ANSWER_FIELD, choices: str = "ABCD") -> str | None:
    """The chosen letter: the structured answer's ``field``, else "answer: B" / "(B)" / "B" in the text."""
    value = answer_field(output_json, schema_valid, field)
    if isinstance(value, str) and value.strip().upper() in choices:
        return value.strip().upper()
    if not output_text:
        return None
    letters = re.escape(choices)
    for pattern in (_CHOICE_AFTER_WORD, _CHOICE_ALONE):
        found = re.findall(pattern.format(letters=letters), output_text.strip())
        if found:
            return found[-1].upper()
    return None


def normalize_choice(gold, choices: str = "ABCD") -> str | None:
    """A gold choice as a letter: "b", "(B)", "B." or a 0-based index."""
    if gold is None or isinstance(gold, bool):
        return None
    if isinstance(gold, int):
        return choices[gold] if 0 <= gold < len(choices) else None
    text = str(gold).strip().strip("().").upper()
    return text if len(text) == 1 and text in choices else None


def normalize_exact(value) -> str | None:
    """Exact match ignores case and runs of whitespace, nothing else."""
    text = as_text(value)
    return None if text is None else " ".join(text.split()).casefold()


# --------------------------------------------------------------------------- tables


def label_columns(table: pa.Table, field: str, gold_column: str | None,
                  min_confidence: float | None = None) -> tuple[pa.Table, Counter]:
    """``table`` with a ``label`` column (null when the row has none) and, with a gold column,
    ``correct``; plus the (gold, label) counts of its rows. With ``min_confidence``, a label whose
    ``label_confidence`` is below it is left null (its probabilities stay), the row is marked
    ``abstained`` and counted under ABSTAINED."""
    labels = [as_text(answer_field(j, v, field)) for j, v in
              zip(table.column("output_json").to_pylist(), table.column("schema_valid").to_pylist())]
    golds = [as_text(g) for g in table.column(gold_column).to_pylist()] if gold_column else [None] * len(labels)
    abstained = [False] * len(labels)
    if min_confidence is not None:
        confidence = (table.column("label_confidence").to_pylist() if "label_confidence" in table.column_names
                      else [None] * len(labels))
        abstained = [label is not None and c is not None and c < min_confidence for label, c in zip(labels, confidence)]
        labels = [None if a else label for label, a in zip(labels, abstained)]
    table = set_column(table, "label", pa.array(labels, pa.string()))
    if min_confidence is not None:
        table = set_column(table, "abstained", pa.array(abstained, pa.bool_()))
    if gold_column:
        correct = [g is not None and g == label for g, label in zip(golds, labels)]
        table = set_column(table, "correct", pa.array(correct, pa.bool_()))
    return table, Counter((g, ABSTAINED if a else label) for g, label, a in zip(golds, labels, abstained))


def set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Appends ``name``; an input column already called so is kept as ``input_<name>``."""
    if name in table.column_names:
        renamed = "input_" + name
        while renamed in table.column_names:
            renamed = "input_" + renamed
        table = table.rename_columns([renamed if c == name else c for c in table.column_names])
    return table.append_column(pa.field(name, values.type), values)


def confusion_table(counts: Counter) -> pa.Table:
    """(gold, label, abstained, rows) for every pair seen; a null label is a row without one
    (``abstained`` when it was left unlabeled below --min-confidence)."""
    pairs = sorted(counts.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1])))
    return pa.table({
        "gold": pa.array([g for (g, _), _ in pairs], pa.string()),
        "label": pa.array([None if p == ABSTAINED else p for (_, p), _ in pairs], pa.string()),
        "abstained": pa.array([p == ABSTAINED for (_, p), _ in pairs], pa.bool_()),
        "rows": pa.array([n for _, n in pairs], pa.int64()),
    })


def format_confusion(counts: Counter, order: list[str] | None = None) -> str:
    """Gold labels down, predicted labels across; the diagonal is agreement. Abstentions (below
    --min-confidence) have their own column, and the accuracy on the rows not abstained follows."""
    golds = _ordered({g for g, _ in counts}, order)
    labels = _ordered({p for _, p in counts if p != ABSTAINED} | set(order or []), order)  # every label a column, even unused
    abstained = sum(n for (_, p), n in counts.items() if p == ABSTAINED)
    columns = labels + ([ABSTAINED] if abstained else [])
    heads = ["gold \\ label", *(p if p is not None else NO_LABEL for p in columns), "total"]
    rows = []
    for g in golds:
        cells = [counts.get((g, p), 0) for p in columns]
        rows.append([g if g is not None else NO_LABEL, *map(str, cells), str(sum(cells))])
    total = sum(counts.values())
    agree = sum(n for (g, p), n in counts.items() if g is not None and g == p)
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [heads, *rows]]
    lines.append(f"agreement {agree}/{total}" + (f" ({100 * agree / total:.1f}%)" if total else ""))
    if abstained:
        answered = total - abstained
        lines.append(f"abstained {abstained}/{total} ({100 * abstained / total:.1f}%); accuracy on the rest {agree}/{answered}"
                     + (f" ({100 * agree / answered:.1f}%)" if answered else ""))
    return "\n".join(lines)


def format_label_counts(counts: Counter, order: list[str] | None = None) -> str:
    by_label = Counter()
    for (_, label), n in counts.items():
        by_label[label] += n
    return "\n".join(f"{label if label is not None else NO_LABEL}  {by_label[label]}"
                     for label in _ordered(set(by_label), order))


def _ordered(values: set, order: list[str] | None) -> list:
    known = [v for v in (order or []) if v in values]
    return known + sorted((v for v in values if v not in known and v is not None), key=str) + \
        ([None] if None in values else [])


def grade_columns(table: pa.Table, rule: str, gold_column: str, field: str = ANSWER_FIELD,
                  choices: str = "ABCD", category_column: str | None = None) -> tuple[pa.Table, dict]:
    """``table`` with ``predicted``, ``gold`` (normalized) and ``correct``; plus per-category
    [rows, correct] counts (every row is graded: an error or a missing answer is wrong)."""
    if rule not in GRADING_RULES:
        raise InputError(f"grading must be one of {', '.join(GRADING_RULES)}, got {rule!r}")
    outputs = table.column("output_json").to_pylist()
    valid = table.column("schema_valid").to_pylist()
    texts = table.column("output_text").to_pylist()
    raw_gold = table.column(gold_column).to_pylist()
    if rule == "choice":
        predicted = [extract_choice(j, v, t, field, choices) for j, v, t in zip(outputs, valid, texts)]
        gold = [normalize_choice(g, choices) for g in raw_gold]
        correct = [p is not None and p == g for p, g in zip(predicted, gold)]
    else:
        predicted = [as_text(answer_field(j, v, field)) for j, v in zip(outputs, valid)]
        gold = [as_text(g) for g in raw_gold]
        correct = [p is not None and g is not None and normalize_exact(p) == normalize_exact(g)
                   for p, g in zip(predicted, gold)]
    categories = (table.column(category_column).to_pylist() if category_column else [None] * len(correct))
    counts: dict = {}
    for category, ok in zip(categories, correct):
        for key in (ALL, as_text(category)) if category_column else (ALL,):
            tally = counts.setdefault(key, [0, 0])
            tally[0] += 1
            tally[1] += ok
    for name, values, kind in (("predicted", predicted, pa.string()), ("gold_answer", gold, pa.string()),
                               ("correct", correct, pa.bool_())):
        table = set_column(table, name, pa.array(values, kind))
    if rule == "choice" and "label_probs" in table.column_names:  # the engine scored every choice (--label-field)
        probs = [dict(p) if p is not None else None for p in table.column("label_probs").to_pylist()]
        table = set_column(table, "choice_probs", pa.array(probs, pa.map_(pa.string(), pa.float64())))
    return table, counts


# --------------------------------------------------------------------------- calibration


class Calibration:
    """Calibration of the choice probabilities against correctness, gathered over parts per category:
    expected calibration error (ECE: the rows-weighted gap between mean confidence and accuracy over
    CALIBRATION_BINS equal-width confidence bins), the multi-class Brier score (mean over rows of
    sum_k (p_k - [k is gold])^2; 0 is perfect, 2 the worst), and the reliability table. A row's
    confidence is the probability of the choice it predicted; rows without probabilities (no answer,
    an error) are left out and counted as such."""

    def __init__(self):
        self.rows: dict = {}  # category -> list of (confidence, correct, brier)

    def add(self, graded: pa.Table, category_column: str | None) -> None:
        if "choice_probs" not in graded.column_names:
            return
        categories = graded.column(category_column).to_pylist() if category_column else [None] * graded.num_rows
        for probs, predicted, gold, correct, category in zip(
                graded.column("choice_probs").to_pylist(), graded.column("predicted").to_pylist(),
                graded.column("gold_answer").to_pylist(), graded.column("correct").to_pylist(), categories):
            if probs is None or predicted is None:
                continue
            probs = dict(probs)
            if predicted not in probs:
                continue
            brier = sum((p - (choice == gold)) ** 2 for choice, p in probs.items())
            for key in (ALL, as_text(category)) if category_column else (ALL,):
                key = NO_LABEL if key is None else key  # as accuracy_rows names the category
                self.rows.setdefault(key, []).append((probs[predicted], bool(correct), brier))

    def summary(self, key) -> dict:
        """ece, brier and calibrated_n of one category (None without scored rows)."""
        rows = self.rows.get(key, [])
        if not rows:
            return {"calibrated_n": 0, "ece": None, "brier": None}
        bins = reliability_bins(rows)
        ece = sum(b["n"] * abs(b["mean_confidence"] - b["accuracy"]) for b in bins if b["n"]) / len(rows)
        return {"calibrated_n": len(rows), "ece": ece, "brier": sum(r[2] for r in rows) / len(rows)}

    def reliability(self) -> list[dict]:
        """category, bin, low, high, n, mean_confidence, accuracy: every category's 10 bins."""
        keys = [ALL] + sorted((k for k in self.rows if k != ALL), key=lambda k: (k == NO_LABEL, str(k)))
        return [{"category": key, **b} for key in keys if key in self.rows for b in reliability_bins(self.rows[key])]


def reliability_bins(rows: list[tuple[float, bool, float]], bins: int = CALIBRATION_BINS) -> list[dict]:
    """Equal-width confidence bins [i/bins, (i+1)/bins) (the last closed): rows, mean confidence, accuracy."""
    tallies = [[0, 0.0, 0] for _ in range(bins)]
    for confidence, correct, _ in rows:
        tally = tallies[min(int(confidence * bins), bins - 1)]
        tally[0] += 1
        tally[1] += confidence
        tally[2] += correct
    return [{"bin": i, "low": i / bins, "high": (i + 1) / bins, "n": n,
             "mean_confidence": total / n if n else None, "accuracy": right / n if n else None}
            for i, (n, total, right) in enumerate(tallies)]


def wilson_interval(correct: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for a proportion: sane at 0, 1 and small n."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_rows(counts: dict) -> list[dict]:
    """One row per category (overall first): n, correct, accuracy, Wilson 95% bounds."""
    keys = [ALL] + sorted((k for k in counts if k != ALL), key=lambda k: (k is None, str(k)))
    rows = []
    for key in keys:
        n, correct = counts[key]
        low, high = wilson_interval(correct, n)
        rows.append({"category": key if key is not None else NO_LABEL, "n": n, "correct": correct,
                     "accuracy": correct / n if n else 0.0, "ci_low": low, "ci_high": high})
    return rows


def token_cost(tokens: dict, price_per_million: tuple[float, float]) -> dict:
    """Cost of a job's tokens at (input, output) prices per million tokens."""
    price_in, price_out = price_per_million
    cost_in = tokens.get("prompt", 0) * price_in / 1e6
    cost_out = tokens.get("completion", 0) * price_out / 1e6
    return {"input": cost_in, "output": cost_out, "total": cost_in + cost_out,
            "price_per_million_tokens": [price_in, price_out]}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def eval_markdown(summary: dict) -> str:
    """The eval report for a Prefect markdown artifact (and the terminal)."""
    overall = summary["categories"][0]
    lines = [
        f"# Eval `{summary['eval']}`: {_pct(overall['accuracy'])} accuracy",
        "",
        f"{overall['correct']} of {overall['n']} correct, 95% CI {_pct(overall['ci_low'])} to {_pct(overall['ci_high'])} "
        f"(Wilson); grading: {summary['grading']}; {summary['unanswered']} without an answer.",
        "",
    ]
    previous = summary.get("previous")
    if previous:
        lines += [f"Change since the previous run ({previous['finished_at']}, {_pct(previous['accuracy'])}): "
                  f"**{100 * summary['delta_accuracy']:+.1f} points**.", ""]
    else:
        lines += ["No previous run of this eval to compare with.", ""]
    lines += ["| category | n | correct | accuracy | 95% CI |", "|---|---:|---:|---:|---|"]
    for row in summary["categories"]:
        lines.append(f"| {row['category']} | {row['n']} | {row['correct']} | {_pct(row['accuracy'])} | "
                     f"{_pct(row['ci_low'])} to {_pct(row['ci_high'])} |")
    lines += calibration_markdown(summary)
    tokens, cost = summary["tokens"], summary["cost"]
    lines += [
        "",
        f"Tokens: {tokens['prompt']:,} prompt, {tokens['completion']:,} completion "
        f"({tokens['reasoning']:,} reasoning). Cost: ${cost['total']:.4f} at "
        f"${cost['price_per_million_tokens'][0]:g} / ${cost['price_per_million_tokens'][1]:g} per million input / output tokens.",
        "",
        f"Model: `{summary['model'].get('path')}` {summary['model'].get('content_hash') or ''}; output: `{summary['output']}`.",
    ]
    return "\n".join(lines)


def _number(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _signed(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def calibration_markdown(summary: dict) -> list[str]:
    """ECE, Brier score (with their change since the previous run) per category, and the overall
    reliability table; nothing when the eval has no choice probabilities."""
    categories = [c for c in summary["categories"] if c.get("calibrated_n")]
    if not categories:
        return []
    overall = summary["categories"][0]
    delta = ""
    if summary.get("delta_ece") is not None:
        delta = f" Change since the previous run: ECE {summary['delta_ece']:+.3f}, Brier {summary['delta_brier']:+.3f}."
    lines = ["", f"Calibration of the choice probabilities ({overall.get('calibrated_n', 0)} rows scored): "
                 f"ECE {_number(overall.get('ece'))}, Brier score {_number(overall.get('brier'))} (lower is better).{delta}",
             "", "| category | scored | ECE | Brier | Δ ECE | Δ Brier |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {c['category']} | {c['calibrated_n']} | {_number(c['ece'])} | {_number(c['brier'])} | "
              f"{_signed(c.get('delta_ece'))} | {_signed(c.get('delta_brier'))} |" for c in categories]
    lines += ["", "| confidence | rows | mean confidence | accuracy |", "|---|---:|---:|---:|"]
    lines += [f"| {b['low']:.1f}-{b['high']:.1f} | {b['n']} | {_number(b['mean_confidence'])} | {_number(b['accuracy'])} |"
              for b in summary.get("reliability") or [] if b["category"] == ALL]
    return lines
