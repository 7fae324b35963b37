"""`ossbatch report OUTPUT`: one self-contained HTML page about a finished job.

Charts are plotly figures; plotly.js is embedded once in the page, so the file opens
offline (a nightly job's report is read from a bucket or a mail, not a server). The
numbers come from the manifest and the committed parts, the same sources as
`ossbatch inspect`; label and eval jobs add their derived files (labels, confusion,
summary, eval.json and the eval's history file).
"""

from __future__ import annotations

import html
import json
import posixpath
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import plotly.graph_objects as go
import plotly.io as pio
import pyarrow as pa
import pyarrow.parquet as pq
from plotly.offline import get_plotlyjs

from ossbatch.flows.jobs import job_dir, part_tables, read_json_lines
from ossbatch.pipeline.job import read_manifest
from ossbatch.pipeline.storage import LOCAL, InputError, Storage, join

REPORT_FILE = "report.html"
# Beside the parts of a plain run: a leading underscore keeps dataset readers off it.
RUN_REPORT_FILE = "_report.html"
TOKEN_COLUMNS = ("prompt_tokens", "reasoning_tokens", "output_tokens")
STATUS_COLORS = {"ok": "#2a9d8f", "length": "#e9c46a", "error": "#e76f51"}


@dataclass
class ReportData:
    root: str
    manifest: dict
    rows: pa.Table  # status and the token columns of every committed row
    derived: bool  # a label/synth/eval root (the batch job under <root>/job)
    confusion: pa.Table | None = None  # gold, label, rows
    label_counts: dict = field(default_factory=dict)
    eval_summary: dict | None = None
    history: list[dict] = field(default_factory=list)


def gather(root: str, storage: Storage = LOCAL) -> ReportData:
    """Everything the page shows, read once; refuses a folder that holds no finished job."""
    manifest, derived = read_manifest(root, storage), False
    if manifest is None:
        manifest, derived = read_manifest(job_dir(root), storage), True
    if manifest is None:
        raise InputError(f"{root}: no _manifest.json here or in {job_dir(root)}; is the job finished?")
    columns = ("status", *TOKEN_COLUMNS)
    tables = [t.select([c for c in columns if c in t.column_names]) for t in part_tables(manifest, storage)]
    rows = pa.concat_tables(tables) if tables else pa.table({c: pa.array([], pa.int64()) for c in columns})
    data = ReportData(root, manifest, rows, derived)
    if derived:
        _gather_derived(data, storage)
    return data


def _gather_derived(data: ReportData, storage: Storage) -> None:
    root = data.root
    labels = join(root, "labels.parquet")
    if storage.exists(labels):
        with storage.open(labels, "rb") as f:
            column = pq.read_table(f, columns=["label"]).column("label").to_pylist()
        for label in column:
            key = "(none)" if label is None else str(label)
            data.label_counts[key] = data.label_counts.get(key, 0) + 1
    confusion = join(root, "confusion.parquet")
    if storage.exists(confusion):
        with storage.open(confusion, "rb") as f:
            data.confusion = pq.read_table(f)
    summary = join(root, "eval.json")
    if storage.exists(summary):
        data.eval_summary = storage.read_json(summary)
        from ossbatch.flows.derived import default_history

        history = data.eval_summary.get("history") or default_history(data.root, data.eval_summary["eval"])
        data.history = read_json_lines(history, storage)


# --------------------------------------------------------------------------- charts


def _figure(fig: go.Figure, title: str) -> go.Figure:
    return fig.update_layout(title=title, height=340, margin=dict(l=50, r=20, t=50, b=45), template="plotly_white")


def _html(fig: go.Figure) -> str:
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, config={"displaylogo": False})


def status_chart(manifest: dict) -> go.Figure:
    statuses = [s for s in manifest["rows"] if s != "total"]
    counts = [manifest["rows"][s] for s in statuses]
    fig = go.Figure(go.Bar(x=statuses, y=counts, text=counts, textposition="auto",
                           marker_color=[STATUS_COLORS.get(s, "#888") for s in statuses]))
    return _figure(fig.update_yaxes(title="rows"), "Rows by status")


def token_histograms(rows: pa.Table) -> list[go.Figure]:
    figures = []
    for column in TOKEN_COLUMNS:
        if column not in rows.column_names:
            continue
        fig = go.Figure(go.Histogram(x=rows.column(column).to_pylist(), nbinsx=30, marker_color="#457b9d"))
        figures.append(_figure(fig.update_xaxes(title="tokens").update_yaxes(title="rows"),
                               column.replace("_", " ").capitalize()))
    return figures


def throughput_chart(manifest: dict) -> go.Figure:
    """Completion tokens/s of each shard, against when it was committed where the manifest says."""
    shards = manifest.get("shards") or []
    rates = [s["tokens"]["completion"] / s["seconds"] if s.get("seconds") else 0.0 for s in shards]
    timed = all(s.get("committed_at") for s in shards)
    x = [s["committed_at"] for s in shards] if timed else [s["shard"] for s in shards]
    fig = go.Figure(go.Scatter(x=x, y=rates, mode="lines+markers", text=[f"shard {s['shard']}" for s in shards],
                               marker_color="#1d3557"))
    fig.update_xaxes(title="committed at" if timed else "shard").update_yaxes(title="completion tokens / s")
    if timed:
        _pad_lone_time(fig, x, timedelta(minutes=1))
    return _figure(fig, "Throughput per shard")


def label_chart(counts: dict) -> go.Figure:
    labels = sorted(counts, key=lambda k: -counts[k])
    fig = go.Figure(go.Bar(x=labels, y=[counts[k] for k in labels], text=[counts[k] for k in labels],
                           textposition="auto", marker_color="#6a4c93"))
    return _figure(fig.update_yaxes(title="rows"), "Label distribution")


def confusion_heatmap(confusion: pa.Table) -> go.Figure:
    def name(value):
        return "(none)" if value is None else str(value)

    gold = [name(g) for g in confusion.column("gold").to_pylist()]
    abstained = (confusion.column("abstained").to_pylist() if "abstained" in confusion.column_names
                 else [False] * confusion.num_rows)
    label = ["(abstained)" if a else name(p) for p, a in zip(confusion.column("label").to_pylist(), abstained)]
    rows_ = confusion.column("rows").to_pylist()
    golds, labels = sorted(set(gold)), sorted(set(label) | set(gold))
    cells = [[0] * len(labels) for _ in golds]
    for g, p, n in zip(gold, label, rows_):
        cells[golds.index(g)][labels.index(p)] += n
    fig = go.Figure(go.Heatmap(z=cells, x=labels, y=golds, colorscale="Blues", text=cells,
                               texttemplate="%{text}", hovertemplate="gold %{y}, label %{x}: %{z}<extra></extra>"))
    fig.update_xaxes(title="predicted label").update_yaxes(title="gold label", autorange="reversed")
    return _figure(fig, "Confusion matrix")


def accuracy_chart(categories: list[dict]) -> go.Figure:
    names = [str(c["category"]) for c in categories]
    acc = [c["accuracy"] for c in categories]
    fig = go.Figure(go.Bar(
        x=names, y=acc, marker_color="#2a9d8f", text=[f"{100 * a:.1f}%" for a in acc], textposition="auto",
        error_y=dict(type="data", symmetric=False, array=[c["ci_high"] - c["accuracy"] for c in categories],
                     arrayminus=[c["accuracy"] - c["ci_low"] for c in categories]),
    ))
    fig.update_yaxes(title="accuracy (95% Wilson CI)", range=[0, 1], tickformat=".0%")
    return _figure(fig, "Accuracy per category")


def reliability_chart(reliability: list[dict]) -> go.Figure:
    """Accuracy against mean confidence in each confidence bin (overall); the diagonal is perfect calibration."""
    bins = [b for b in reliability if b["category"] == "(all)" and b["n"]]
    fig = go.Figure([
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dot", color="#999"), name="calibrated"),
        go.Scatter(x=[b["mean_confidence"] for b in bins], y=[b["accuracy"] for b in bins], mode="lines+markers",
                   marker=dict(size=[6 + 2 * b["n"] ** 0.5 for b in bins], color="#1d3557"), name="choices",
                   text=[f"{b['low']:.1f}-{b['high']:.1f}: {b['n']} rows" for b in bins]),
    ])
    fig.update_xaxes(title="confidence (the predicted choice's probability)", range=[0, 1], tickformat=".0%")
    fig.update_yaxes(title="accuracy", range=[0, 1], tickformat=".0%")
    return _figure(fig, "Reliability (10 confidence bins)")


def trend_chart(history: list[dict]) -> go.Figure:
    ordered = sorted(history, key=lambda e: e.get("finished_at") or "")
    fig = go.Figure(go.Scatter(x=[e.get("finished_at") for e in ordered], y=[e.get("accuracy") for e in ordered],
                               mode="lines+markers", marker_color="#e76f51"))
    fig.update_yaxes(title="accuracy", range=[0, 1], tickformat=".0%").update_xaxes(title="night")
    _pad_lone_time(fig, [e.get("finished_at") for e in ordered], timedelta(days=1))
    return _figure(fig, "Accuracy over previous nights")


def _pad_lone_time(fig: go.Figure, times: list[str | None], pad: timedelta) -> None:
    """Plotly spans a time axis with one distinct point over a millisecond (ticks like
    15:38:13.9995): centre the point in `pad` either side instead."""
    distinct = {t for t in times if t}
    if len(distinct) == 1:
        at = datetime.fromisoformat(distinct.pop())
        fig.update_xaxes(range=[(at - pad).isoformat(), (at + pad).isoformat()])


# --------------------------------------------------------------------------- page


def _facts(data: ReportData) -> list[tuple[str, str]]:
    m = data.manifest
    facts = [
        ("rows", f"{m['rows']['total']:,}"),
        *((status, f"{m['rows'][status]:,}") for status in m["rows"] if status != "total"),
        ("prompt tokens", f"{m['tokens']['prompt']:,}"),
        ("completion tokens", f"{m['tokens']['completion']:,}"),
        ("wall seconds", f"{m['wall_seconds']:.1f}"),
        ("tokens / s", f"{m['tokens_per_second']:.1f}"),
        ("shards", f"{len(m.get('shards') or [])}"),
        ("model", str((m.get("model") or {}).get("path") or "")),
    ]
    if m.get("cost"):
        facts.append(("cost", f"${m['cost']['total']:.4f}"))
        facts.append(("cost per 1,000 rows", f"${m['cost']['per_1000_rows']:.4f}"))
    if data.eval_summary:
        overall = data.eval_summary["categories"][0]
        facts.append(("accuracy", f"{100 * overall['accuracy']:.1f}% ({overall['correct']}/{overall['n']})"))
        for metric, name in (("ece", "expected calibration error"), ("brier", "Brier score")):
            if overall.get(metric) is not None:
                delta = overall.get(f"delta_{metric}")
                facts.append((name, f"{overall[metric]:.3f}" + (f" ({delta:+.3f} since the previous run)"
                                                                  if delta is not None else "")))
    return facts


def charts(data: ReportData) -> list[go.Figure]:
    """Every chart the page shows, in order."""
    figures = [status_chart(data.manifest), *token_histograms(data.rows), throughput_chart(data.manifest)]
    if data.label_counts:
        figures.append(label_chart(data.label_counts))
    if data.confusion is not None and data.confusion.num_rows:
        figures.append(confusion_heatmap(data.confusion))
    if data.eval_summary:
        figures.append(accuracy_chart(data.eval_summary["categories"]))
        if data.eval_summary.get("reliability"):
            figures.append(reliability_chart(data.eval_summary["reliability"]))
        if data.history:
            figures.append(trend_chart(data.history))
    return figures


def render(data: ReportData) -> str:
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _facts(data))
    cells = "".join(f'<div class="chart">{_html(fig)}</div>' for fig in charts(data))
    title = f"ossbatch report: {data.root}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; }}
table {{ border-collapse: collapse; margin-bottom: 16px; }}
th, td {{ text-align: left; padding: 3px 14px 3px 0; }}
th {{ color: #555; font-weight: 500; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(460px, 1fr)); gap: 12px; }}
.chart {{ border: 1px solid #ddd; border-radius: 6px; padding: 4px; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
<p>job <code>{html.escape(data.manifest['job_key'][:16])}</code>, finished {html.escape(data.manifest['created_at'])}</p>
<table id="facts">{facts}</table>
<div class="grid">{cells}</div>
<script type="application/json" id="manifest">{html.escape(json.dumps(data.manifest["rows"]))}</script>
</body></html>
"""


def report_path(data: ReportData) -> str:
    if data.derived:
        return join(data.root.rstrip("/"), REPORT_FILE)
    return join(data.manifest["output"]["work_dir"].rstrip("/"), RUN_REPORT_FILE)


def write_report(root: str, storage: Storage = LOCAL) -> str:
    """Writes the page beside the results; returns where."""
    data = gather(root, storage)
    path = report_path(data)
    with storage.atomic_open(path, "wb") as f:
        f.write(render(data).encode())
    return path if "://" in path else posixpath.normpath(path)
