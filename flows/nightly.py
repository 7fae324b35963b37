"""The three nightly jobs as Prefect flows: labeling, synthetic data, evaluation.

Each flow runs its batch job through `batch_inference` (a subflow: plan, shard tasks, manifest),
then a task per step derives its own outputs from the committed parts and writes the job's HTML
report, which its markdown artifact links to. The bodies are flows.derived's plain functions,
which ``--orchestrator none`` runs without Prefect; here they get `PrefectOrchestration`.
``output`` may hold ``{date}``: the run's scheduled date, so a nightly deployment writes a new
directory per night.
"""

from __future__ import annotations

from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.runtime import flow_run

from ossbatch.flows import derived, grading
from ossbatch.flows.batch import batch_inference
from ossbatch.flows.derived import default_history  # noqa: F401  (where callers have always found it)
from ossbatch.pipeline.config import Job, JobOptions


def _task(function, name: str):
    return task(function, name=name, retries=1, cache_policy=NONE)


TASKS = {
    derived.write_labels: _task(derived.write_labels, "write-labels"),
    derived.expand_requests: _task(derived.expand_requests, "expand-requests"),
    derived.write_samples: _task(derived.write_samples, "write-samples"),
    derived.grade: _task(derived.grade, "grade"),
    derived.record_history: _task(derived.record_history, "record-history"),
    derived.write_report: _task(derived.write_report, "write-report"),
}
write_labels, expand_requests, write_samples, grade, record_history, write_report = TASKS.values()


class PrefectOrchestration:
    """The batch job as a subflow, each step a task, artifacts on the Prefect server."""

    def __init__(self, progress_seconds: float | None = None):
        self.progress_seconds = progress_seconds

    def run_date(self):
        return flow_run.get_scheduled_start_time().date()

    def batch(self, job: Job, quiet: bool) -> dict:
        return batch_inference(job, quiet=quiet, progress_seconds=self.progress_seconds)

    def step(self, function, *args):
        return TASKS[function](*args)

    def markdown(self, text: str, key: str, description: str) -> None:
        create_markdown_artifact(text, key=key, description=description)

    def table(self, rows: list[dict], key: str, description: str) -> None:
        create_table_artifact(rows, key=key, description=description)

    def log(self, message: str) -> None:
        get_run_logger().info("%s", message)


@flow(name="label", log_prints=True)
def label_job(model: str, inputs: list[str], output: str, labels: list[str] | dict, gold_column: str | None = None,
              label_field: str = grading.LABEL_FIELD, name: str | None = None,
              options: JobOptions = JobOptions(), quiet: bool = False, progress_seconds: float | None = None,
              min_confidence: float | None = None) -> dict:
    """Bulk classification: every row answers with one of ``labels`` (a list, or a JSON Schema
    with a ``label_field`` property).  Writes <output>/labels.parquet, with ``gold_column``
    <output>/confusion.parquet, and <output>/report.html; returns a summary with the confusion
    (or label count) table. Below ``min_confidence`` a row's label is left null (abstained)."""
    return derived.label(PrefectOrchestration(progress_seconds), model, inputs, output, labels, gold_column, label_field, name,
                         options, quiet, min_confidence)


@flow(name="synth", log_prints=True)
def synth_job(model: str, inputs: list[str], output: str, n: int = 4, dedupe: bool = False,
              answer_schema: dict | None = None, options: JobOptions = JobOptions(), quiet: bool = False,
              progress_seconds: float | None = None) -> dict:
    """Synthetic data: ``n`` samples per input row, each with its own seed (and, with
    ``answer_schema``, structured).  Writes <output>/samples.parquet (id, sample, seed,
    request_id, outputs, input columns) and <output>/report.html; ``dedupe`` keeps one sample
    per distinct answer of a row."""
    return derived.synth(PrefectOrchestration(progress_seconds), model, inputs, output, n, dedupe, answer_schema, options, quiet)


@flow(name="eval", log_prints=True)
def eval_job(model: str, inputs: list[str], output: str, gold_column: str = "answer",
             grading_rule: Literal["choice", "exact"] = "choice",
             answer_field: str = grading.ANSWER_FIELD, choices: str = "ABCD", category_column: str | None = "category",
             name: str | None = None, history: str | None = None, answer_schema: dict | None = None,
             price_per_million_tokens: tuple[float, float] | None = None, options: JobOptions = JobOptions(),
             quiet: bool = False, progress_seconds: float | None = None) -> dict:
    """Benchmark evaluation with structured answers: accuracy with a Wilson 95% interval, per
    category, token and cost totals, and the change since the previous run of this eval.

    ``grading_rule``: "choice" (a letter of ``choices``) or "exact" (``answer_field`` equals the
    gold answer, ignoring case and spacing). ``price_per_million_tokens``, when given, replaces
    ``options.price_per_million_tokens``.  Writes <output>/graded.parquet, summary.parquet,
    eval.json (with the history file it used) and report.html, a markdown artifact linking the
    report, and a line in the history file."""
    return derived.evaluate(PrefectOrchestration(progress_seconds), model, inputs, output, gold_column, grading_rule, answer_field,
                            choices, category_column, name, history, answer_schema, price_per_million_tokens,
                            options, quiet)
