"""The nightly jobs (label, synth, eval) as plain functions over an `Orchestration`.

Each job runs its batch job, then derives its own outputs from the committed parts (see
flows.jobs for the layout) and writes its report. How the batch job runs, how each step is
called and where artifacts go is the orchestration's business: `Plain` (``--orchestrator none``:
the shard driver's loop, plain calls, artifacts only logged) here, and Prefect's (a subflow, a
task per step, Prefect artifacts) in flows.nightly. Nothing here imports Prefect.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from datetime import date, datetime, timezone
from typing import Protocol

import pyarrow as pa

from ossbatch.flows import grading, synthetic
from ossbatch.flows.jobs import (
    check_columns, column_named, derived_job, input_stem, part_tables, parquet_sink, read_json_lines, resolve_output,
    slug, write_json_lines, write_table,
)
from ossbatch.pipeline.config import Job, JobOptions
from ossbatch.pipeline.cost import job_cost
from ossbatch.pipeline.storage import InputError, Storage, join


class Orchestration(Protocol):
    def run_date(self) -> date: ...  # what {date} in an output becomes
    def batch(self, job: Job, quiet: bool) -> dict: ...  # runs the batch job; its manifest
    def step(self, function, *args): ...  # one step of the job (a Prefect task)
    def markdown(self, text: str, key: str, description: str) -> None: ...
    def table(self, rows: list[dict], key: str, description: str) -> None: ...
    def log(self, message: str) -> None: ...


class Plain:
    """``--orchestrator none``: no Prefect; artifacts are not published (the command prints its summary)."""

    def __init__(self, progress_seconds: float | None = None):
        self.progress_seconds = progress_seconds

    def run_date(self) -> date:
        return datetime.now(timezone.utc).date()

    def batch(self, job: Job, quiet: bool) -> dict:
        from ossbatch.flows.plain import run_job_plain

        return run_job_plain(job, quiet, self.progress_seconds)

    def step(self, function, *args):
        return function(*args)

    def markdown(self, text: str, key: str, description: str) -> None:
        pass

    def table(self, rows: list[dict], key: str, description: str) -> None:
        pass

    def log(self, message: str) -> None:
        pass


def _require_column(schema, name: str, what: str) -> str:
    column = column_named(schema, name)
    if column is None:
        raise InputError(f"{what} {name!r} is not a column of the input; columns: {', '.join(schema.names)}")
    return column


def write_report(root: str, storage: Storage) -> str:
    """The job's HTML report (flows.report) beside its outputs; returns its path."""
    from ossbatch.flows.report import write_report as write

    return write(root, storage)


def report_link(path: str) -> str:
    """A markdown link to the report: a file:// URL for a local path, the URI otherwise."""
    url = path if "://" in path else "file://" + posixpath.abspath(path)
    return f"[report]({url})"


# --------------------------------------------------------------------------- labeling


def write_labels(manifest: dict, root: str, storage: Storage, field: str, gold_column: str | None,
                 order: list[str], min_confidence: float | None = None) -> dict:
    """labels.parquet (every row plus ``label``, ``label_probs`` and ``label_confidence``, and
    ``correct`` with a gold column; ``abstained`` with ``min_confidence``) and confusion.parquet
    (gold, label, abstained, rows)."""
    counts = Counter()
    with parquet_sink(join(root, "labels.parquet"), storage, manifest["job_key"]) as write:
        for table in part_tables(manifest, storage):
            gold = _require_column(table.schema, gold_column, "--gold-column") if gold_column else None
            labeled, part_counts = grading.label_columns(table, field, gold, min_confidence)
            write(labeled)
            counts.update(part_counts)
    if gold_column:
        write_table(join(root, "confusion.parquet"), grading.confusion_table(counts), storage,
                    manifest["job_key"])
        text = grading.format_confusion(counts, order)
    else:
        text = grading.format_label_counts(counts, order)
    labeled_rows = sum(n for (_, label), n in counts.items() if label not in (None, grading.ABSTAINED))
    abstained = sum(n for (_, label), n in counts.items() if label == grading.ABSTAINED)
    return {"rows": sum(counts.values()), "labeled": labeled_rows, "abstained": abstained, "table": text,
            "agreement": sum(n for (g, p), n in counts.items() if g is not None and g == p) if gold_column else None}


def label(orchestration: Orchestration, model: str, inputs: list[str], output: str, labels: list[str] | dict,
          gold_column: str | None = None, label_field: str = grading.LABEL_FIELD, name: str | None = None,
          options: JobOptions = JobOptions(), quiet: bool = False, min_confidence: float | None = None) -> dict:
    """Bulk classification (see flows.nightly.label_job). Every label's probability is scored
    (label_probs, label_confidence); with ``min_confidence``, rows below it are left unlabeled."""
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise InputError(f"--min-confidence must be a probability from 0 to 1, got {min_confidence}")
    root = resolve_output(output, orchestration.run_date())
    schema = grading.label_schema(labels, label_field)
    if gold_column:
        check_columns(inputs, options.storage, {"--gold-column": gold_column})
    options = options.replaced(label_field=label_field)
    manifest = orchestration.batch(derived_job(model, inputs, root, options, schema), quiet)
    summary = orchestration.step(write_labels, manifest, root, options.storage, label_field, gold_column,
                                 grading.label_names(schema, label_field), min_confidence)
    report = orchestration.step(write_report, root, options.storage)
    orchestration.log(f"{summary['labeled']} of {summary['rows']} rows labeled"
                      + (f", {summary['abstained']} abstained" if min_confidence is not None else "") + f"\n{summary['table']}")
    orchestration.markdown(
        f"# Labels of `{root}`\n\n{summary['labeled']} of {summary['rows']} rows labeled; {report_link(report)}.\n\n"
        f"```\n{summary['table']}\n```",
        key=f"labels-{slug(name or input_stem(inputs))}", description=f"labels of {root}")
    return summary | {"output": root, "labels": join(root, "labels.parquet"), "job": manifest["output"]["uri"],
                      "confusion": join(root, "confusion.parquet") if gold_column else None, "report_html": report}


# --------------------------------------------------------------------------- synthetic data


def expand_requests(inputs: list[str], storage: Storage, n: int, seed: int, destination: str) -> dict:
    return synthetic.write_expanded_requests(inputs, storage, n, seed, destination)


def write_samples(manifest: dict, root: str, storage: Storage, dedupe: bool) -> dict:
    samples = synthetic.SampleTable(dedupe)
    with parquet_sink(join(root, "samples.parquet"), storage, manifest["job_key"]) as write:
        for table in part_tables(manifest, storage):
            write(samples.convert(table))
    return {"kept": samples.kept, "duplicates": samples.dropped}


def synth(orchestration: Orchestration, model: str, inputs: list[str], output: str, n: int = 4, dedupe: bool = False,
          answer_schema: dict | None = None, options: JobOptions = JobOptions(), quiet: bool = False) -> dict:
    """Synthetic data (see flows.nightly.synth_job)."""
    root = resolve_output(output, orchestration.run_date())
    requests_uri = join(root, "requests.jsonl")
    counts = orchestration.step(expand_requests, inputs, options.storage, n, options.seed, requests_uri)
    manifest = orchestration.batch(derived_job(model, [requests_uri], root, options, answer_schema), quiet)
    kept = orchestration.step(write_samples, manifest, root, options.storage, dedupe)
    report = orchestration.step(write_report, root, options.storage)
    line = (f"{counts['rows']} rows x {n} samples: {kept['kept']} kept, "
            f"{kept['duplicates']} duplicate answers dropped")
    orchestration.log(line)
    orchestration.markdown(f"# Synthetic data in `{root}`\n\n{line}; {report_link(report)}.",
                           key=f"synth-{slug(input_stem(inputs))}", description=f"synthetic data in {root}")
    return counts | kept | {"output": root, "samples": join(root, "samples.parquet"), "job": manifest["output"]["uri"],
                            "report_html": report}


# --------------------------------------------------------------------------- evaluation


def grade(manifest: dict, root: str, storage: Storage, grading_rule: str, gold_column: str, answer_field: str,
          choices: str, category_column: str | None) -> dict:
    """graded.parquet (rows plus predicted, gold_answer, correct) and summary.parquet (accuracy per category)."""
    counts: dict = {}
    unanswered = 0
    calibration = grading.Calibration()
    with parquet_sink(join(root, "graded.parquet"), storage, manifest["job_key"]) as write:
        for table in part_tables(manifest, storage):
            gold = _require_column(table.schema, gold_column, "--gold-column")
            category = column_named(table.schema, category_column) if category_column else None
            graded, part_counts = grading.grade_columns(table, grading_rule, gold, answer_field, choices, category)
            calibration.add(graded, category)
            unanswered += graded.column("predicted").null_count
            write(graded)
            for key, (rows, correct) in part_counts.items():
                tally = counts.setdefault(key, [0, 0])
                tally[0] += rows
                tally[1] += correct
    rows = [row | calibration.summary(row["category"]) for row in grading.accuracy_rows(counts or {grading.ALL: [0, 0]})]
    write_table(join(root, "summary.parquet"), pa.Table.from_pylist(rows, schema=SUMMARY_SCHEMA), storage,
                manifest["job_key"])
    reliability = calibration.reliability()
    if reliability:
        write_table(join(root, "reliability.parquet"), pa.Table.from_pylist(reliability), storage, manifest["job_key"])
    return {"categories": rows, "unanswered": unanswered, "reliability": reliability}


SUMMARY_SCHEMA = pa.schema([("category", pa.string()), ("n", pa.int64()), ("correct", pa.int64()),
                            ("accuracy", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()),
                            ("calibrated_n", pa.int64()), ("ece", pa.float64()), ("brier", pa.float64())])


def default_history(root: str, name: str) -> str:
    """<output>/../<name>.history.jsonl: beside the dated outputs of the same eval."""
    parent = posixpath.dirname(root.rstrip("/"))
    if parent.endswith(":") or parent.endswith(":/"):  # a bucket's root has no parent to write to
        return join(root, f"{name}.history.jsonl")
    return join(parent, f"{name}.history.jsonl") if parent else f"{name}.history.jsonl"


def record_history(history: str, storage: Storage, entry: dict) -> dict | None:
    """Appends this run (replacing an earlier record of the same output); returns the previous run."""
    earlier = [e for e in read_json_lines(history, storage) if e.get("output") != entry["output"]]
    previous = next((e for e in reversed(earlier) if e.get("eval") == entry["eval"]), None)
    write_json_lines(history, earlier + [entry], storage)
    return previous


def _calibration_deltas(now: dict, before: dict | None) -> dict:
    """delta_ece and delta_brier against the previous run (lower is better: negative is an improvement)."""
    def delta(metric: str):
        old = (before or {}).get(metric)
        return now.get(metric) - old if old is not None and now.get(metric) is not None else None

    return {"delta_ece": delta("ece"), "delta_brier": delta("brier")}


def evaluate(orchestration: Orchestration, model: str, inputs: list[str], output: str, gold_column: str = "answer",
             grading_rule: str = "choice", answer_field: str = grading.ANSWER_FIELD, choices: str = "ABCD",
             category_column: str | None = "category", name: str | None = None, history: str | None = None,
             answer_schema: dict | None = None, price_per_million_tokens: tuple[float, float] | None = None,
             options: JobOptions = JobOptions(), quiet: bool = False) -> dict:
    """Benchmark evaluation (see flows.nightly.eval_job); ``price_per_million_tokens``, when
    given, replaces the options' (the flow's parameter from before prices were job options)."""
    if price_per_million_tokens is not None:
        options = options.replaced(price_per_million_tokens=tuple(price_per_million_tokens))
    root = resolve_output(output, orchestration.run_date())
    name = name or input_stem(inputs)
    check_columns(inputs, options.storage, {"--gold-column": gold_column})
    if answer_schema is None:
        answer_schema = (grading.choice_schema(choices, answer_field) if grading_rule == "choice"
                         else grading.exact_schema(answer_field))
    if grading_rule == "choice":  # every choice's probability, for calibration (choice_probs)
        options = options.replaced(label_field=answer_field)
    manifest = orchestration.batch(derived_job(model, inputs, root, options, answer_schema), quiet)
    graded = orchestration.step(grade, manifest, root, options.storage, grading_rule, gold_column, answer_field,
                                choices, category_column)
    history = history or default_history(root, name)
    summary = {
        "eval": name,
        "output": root,
        "job_key": manifest["job_key"],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {k: manifest["model"].get(k) for k in ("path", "content_hash")},
        "grading": grading_rule,
        "accuracy": graded["categories"][0]["accuracy"],
        "ece": graded["categories"][0]["ece"],
        "brier": graded["categories"][0]["brier"],
        "categories": graded["categories"],
        "reliability": graded["reliability"],
        "unanswered": graded["unanswered"],
        "tokens": {k: manifest["tokens"][k] for k in ("prompt", "reasoning", "output", "completion")},
        "cost": manifest.get("cost") or job_cost(manifest, options.cost),
        "history": history,  # where this run was recorded: the report reads the trend from it
    }
    previous = orchestration.step(record_history, history, options.storage,
                                  {k: summary[k] for k in ("eval", "output", "job_key", "finished_at", "model",
                                                           "accuracy", "ece", "brier", "categories", "tokens", "cost")})
    summary["previous"] = ({k: previous.get(k) for k in ("output", "finished_at", "accuracy", "ece", "brier", "model")}
                           if previous else None)
    summary["delta_accuracy"] = summary["accuracy"] - previous["accuracy"] if previous else None
    summary |= _calibration_deltas(summary, previous)
    earlier = {c.get("category"): c for c in (previous or {}).get("categories") or []}
    summary["categories"] = [c | _calibration_deltas(c, earlier.get(c["category"])) for c in summary["categories"]]
    options.storage.write_json(join(root, "eval.json"), summary)
    report_path = orchestration.step(write_report, root, options.storage)
    report = grading.eval_markdown(summary)
    orchestration.markdown(f"{report}\n\nCharts: {report_link(report_path)}.", key=f"eval-{slug(name)}",
                           description=f"eval {name}: {root}")
    orchestration.table(graded["categories"], key=f"eval-{slug(name)}-categories",
                        description=f"accuracy per category, eval {name}")
    orchestration.log(report)
    return summary | {"report": report, "report_html": report_path, "graded": join(root, "graded.parquet"),
                      "summary": join(root, "summary.parquet"), "job": manifest["output"]["uri"],
                      "reliability_table": join(root, "reliability.parquet") if graded["reliability"] else None}
