"""The three nightly jobs as Prefect flows: labeling, synthetic data, evaluation.

Each flow runs its batch job through `batch_inference` (a subflow: plan,
shard tasks, manifest), then one task derives its own outputs from the
committed parts (see flows.jobs for the layout).  ``output`` may hold
``{date}``: the run's scheduled date, so a nightly deployment writes a new
directory per night.  The logic lives in flows.grading and flows.synthetic;
these functions only wire stages together.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from datetime import datetime, timezone
from typing import Literal

import pyarrow as pa

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from ossbatch.flows import grading, synthetic
from ossbatch.flows.batch import batch_inference
from ossbatch.flows.jobs import (
    check_columns, column_named, derived_job, input_stem, part_tables, parquet_sink, read_json_lines, resolve_output,
    slug, write_json_lines, write_table,
)
from ossbatch.pipeline.config import JobOptions
from ossbatch.pipeline.storage import InputError, Storage, join


def _run_date():
    return flow_run.get_scheduled_start_time().date()


def _require_column(schema, name: str, what: str) -> str:
    column = column_named(schema, name)
    if column is None:
        raise InputError(f"{what} {name!r} is not a column of the input; columns: {', '.join(schema.names)}")
    return column


# --------------------------------------------------------------------------- labeling


@task(name="write-labels", retries=1, cache_policy=NONE)
def write_labels(manifest: dict, root: str, storage: Storage, field: str, gold_column: str | None,
                 order: list[str]) -> dict:
    """labels.parquet (every row plus ``label``, and ``correct`` with a gold column) and
    confusion.parquet (gold, label, rows)."""
    counts = Counter()
    with parquet_sink(join(root, "labels.parquet"), storage, manifest["job_key"]) as write:
        for table in part_tables(manifest, storage):
            gold = _require_column(table.schema, gold_column, "--gold-column") if gold_column else None
            labeled, part_counts = grading.label_columns(table, field, gold)
            write(labeled)
            counts.update(part_counts)
    if gold_column:
        write_table(join(root, "confusion.parquet"), grading.confusion_table(counts), storage,
                    manifest["job_key"])
        text = grading.format_confusion(counts, order)
    else:
        text = grading.format_label_counts(counts, order)
    labeled_rows = sum(n for (_, label), n in counts.items() if label is not None)
    return {"rows": sum(counts.values()), "labeled": labeled_rows, "table": text,
            "agreement": sum(n for (g, p), n in counts.items() if g is not None and g == p) if gold_column else None}


@flow(name="label", log_prints=True)
def label_job(model: str, inputs: list[str], output: str, labels: list[str] | dict, gold_column: str | None = None,
              label_field: str = grading.LABEL_FIELD, name: str | None = None,
              options: JobOptions = JobOptions(), quiet: bool = False) -> dict:
    """Bulk classification: every row answers with one of ``labels`` (a list, or a JSON Schema
    with a ``label_field`` property).  Writes <output>/labels.parquet, and with ``gold_column``
    <output>/confusion.parquet; returns a summary with the confusion (or label count) table."""
    root = resolve_output(output, _run_date())
    schema = grading.label_schema(labels, label_field)
    if gold_column:
        check_columns(inputs, options.storage, {"--gold-column": gold_column})
    manifest = batch_inference(derived_job(model, inputs, root, options, schema), quiet=quiet)
    summary = write_labels(manifest, root, options.storage, label_field, gold_column,
                           grading.label_names(schema, label_field))
    get_run_logger().info("%d of %d rows labeled\n%s", summary["labeled"], summary["rows"], summary["table"])
    create_markdown_artifact(
        f"# Labels of `{root}`\n\n{summary['labeled']} of {summary['rows']} rows labeled.\n\n```\n{summary['table']}\n```",
        key=f"labels-{slug(name or input_stem(inputs))}", description=f"labels of {root}")
    return summary | {"output": root, "labels": join(root, "labels.parquet"), "job": manifest["output"]["uri"],
                      "confusion": join(root, "confusion.parquet") if gold_column else None}


# --------------------------------------------------------------------------- synthetic data


@task(name="expand-requests", retries=1, cache_policy=NONE)
def expand_requests(inputs: list[str], storage: Storage, n: int, seed: int, destination: str) -> dict:
    return synthetic.write_expanded_requests(inputs, storage, n, seed, destination)


@task(name="write-samples", retries=1, cache_policy=NONE)
def write_samples(manifest: dict, root: str, storage: Storage, dedupe: bool) -> dict:
    samples = synthetic.SampleTable(dedupe)
    with parquet_sink(join(root, "samples.parquet"), storage, manifest["job_key"]) as write:
        for table in part_tables(manifest, storage):
            write(samples.convert(table))
    return {"kept": samples.kept, "duplicates": samples.dropped}


@flow(name="synth", log_prints=True)
def synth_job(model: str, inputs: list[str], output: str, n: int = 4, dedupe: bool = False,
              answer_schema: dict | None = None, options: JobOptions = JobOptions(), quiet: bool = False) -> dict:
    """Synthetic data: ``n`` samples per input row, each with its own seed (and, with
    ``answer_schema``, structured).  Writes <output>/samples.parquet (id, sample, seed,
    request_id, outputs, input columns); ``dedupe`` keeps one sample per distinct answer of a row."""
    root = resolve_output(output, _run_date())
    requests_uri = join(root, "requests.jsonl")
    counts = expand_requests(inputs, options.storage, n, options.seed, requests_uri)
    manifest = batch_inference(derived_job(model, [requests_uri], root, options, answer_schema), quiet=quiet)
    kept = write_samples(manifest, root, options.storage, dedupe)
    get_run_logger().info("%d rows x %d samples: %d kept, %d duplicate answers dropped",
                          counts["rows"], n, kept["kept"], kept["duplicates"])
    return counts | kept | {"output": root, "samples": join(root, "samples.parquet"), "job": manifest["output"]["uri"]}


# --------------------------------------------------------------------------- evaluation


@task(name="grade", retries=1, cache_policy=NONE)
def grade(manifest: dict, root: str, storage: Storage, grading_rule: str, gold_column: str, answer_field: str,
          choices: str, category_column: str | None) -> dict:
    """graded.parquet (rows plus predicted, gold_answer, correct) and summary.parquet (accuracy per category)."""
    counts: dict = {}
    unanswered = 0
    with parquet_sink(join(root, "graded.parquet"), storage, manifest["job_key"]) as write:
        for table in part_tables(manifest, storage):
            gold = _require_column(table.schema, gold_column, "--gold-column")
            category = column_named(table.schema, category_column) if category_column else None
            graded, part_counts = grading.grade_columns(table, grading_rule, gold, answer_field, choices, category)
            unanswered += graded.column("predicted").null_count
            write(graded)
            for key, (rows, correct) in part_counts.items():
                tally = counts.setdefault(key, [0, 0])
                tally[0] += rows
                tally[1] += correct
    rows = grading.accuracy_rows(counts or {grading.ALL: [0, 0]})
    write_table(join(root, "summary.parquet"), pa.Table.from_pylist(rows), storage, manifest["job_key"])
    return {"categories": rows, "unanswered": unanswered}


def default_history(root: str, name: str) -> str:
    """<output>/../<name>.history.jsonl: beside the dated outputs of the same eval."""
    parent = posixpath.dirname(root.rstrip("/"))
    if parent.endswith(":") or parent.endswith(":/"):  # a bucket's root has no parent to write to
        return join(root, f"{name}.history.jsonl")
    return join(parent, f"{name}.history.jsonl") if parent else f"{name}.history.jsonl"


@task(name="record-history", retries=1, cache_policy=NONE)
def record_history(history: str, storage: Storage, entry: dict) -> dict | None:
    """Appends this run (replacing an earlier record of the same output); returns the previous run."""
    earlier = [e for e in read_json_lines(history, storage) if e.get("output") != entry["output"]]
    previous = next((e for e in reversed(earlier) if e.get("eval") == entry["eval"]), None)
    write_json_lines(history, earlier + [entry], storage)
    return previous


@flow(name="eval", log_prints=True)
def eval_job(model: str, inputs: list[str], output: str, gold_column: str = "answer",
             grading_rule: Literal["choice", "exact"] = "choice",
             answer_field: str = grading.ANSWER_FIELD, choices: str = "ABCD", category_column: str | None = "category",
             name: str | None = None, history: str | None = None, answer_schema: dict | None = None,
             price_per_million_tokens: tuple[float, float] = (0.0, 0.0), options: JobOptions = JobOptions(),
             quiet: bool = False) -> dict:
    """Benchmark evaluation with structured answers: accuracy with a Wilson 95% interval, per
    category, token and cost totals, and the change since the previous run of this eval.

    ``grading_rule``: "choice" (a letter of ``choices``) or "exact" (``answer_field`` equals the
    gold answer, ignoring case and spacing).  Writes <output>/graded.parquet, summary.parquet
    and eval.json, a markdown artifact, and a line in the history file."""
    root = resolve_output(output, _run_date())
    name = name or input_stem(inputs)
    check_columns(inputs, options.storage, {"--gold-column": gold_column})
    if answer_schema is None:
        answer_schema = (grading.choice_schema(choices, answer_field) if grading_rule == "choice"
                         else grading.exact_schema(answer_field))
    manifest = batch_inference(derived_job(model, inputs, root, options, answer_schema), quiet=quiet)
    graded = grade(manifest, root, options.storage, grading_rule, gold_column, answer_field, choices,
                   category_column)
    summary = {
        "eval": name,
        "output": root,
        "job_key": manifest["job_key"],
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {k: manifest["model"].get(k) for k in ("path", "content_hash")},
        "grading": grading_rule,
        "accuracy": graded["categories"][0]["accuracy"],
        "categories": graded["categories"],
        "unanswered": graded["unanswered"],
        "tokens": {k: manifest["tokens"][k] for k in ("prompt", "reasoning", "output", "completion")},
        "cost": grading.token_cost(manifest["tokens"], tuple(price_per_million_tokens)),
    }
    previous = record_history(history or default_history(root, name), options.storage,
                              {k: summary[k] for k in ("eval", "output", "job_key", "finished_at", "model",
                                                       "accuracy", "categories", "tokens", "cost")})
    summary["previous"] = ({k: previous.get(k) for k in ("output", "finished_at", "accuracy", "model")}
                           if previous else None)
    summary["delta_accuracy"] = summary["accuracy"] - previous["accuracy"] if previous else None
    options.storage.write_json(join(root, "eval.json"), summary)
    report = grading.eval_markdown(summary)
    create_markdown_artifact(report, key=f"eval-{slug(name)}", description=f"eval {name}: {root}")
    create_table_artifact(graded["categories"], key=f"eval-{slug(name)}-categories",
                          description=f"accuracy per category, eval {name}")
    get_run_logger().info("%s", report)
    return summary | {"report": report, "graded": join(root, "graded.parquet"),
                      "summary": join(root, "summary.parquet"), "job": manifest["output"]["uri"]}
