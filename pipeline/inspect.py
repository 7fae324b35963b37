"""``ossbatch inspect OUTPUT``: a job's manifest as a readable table, and example rows of each
failing status (``error``, and ``length``: cut off at the token budget)."""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.parquet as pq

from ossbatch.pipeline.cost import format_cost
from ossbatch.pipeline.job import (
    JOB_FILE, MANIFEST_FILE, MARKER_DIR, MARKER_NAME, committed_shards, load_plan, manifest_path, output_layout,
)
from ossbatch.pipeline.storage import LOCAL, InputError, Storage, exists, join, read_json

EXAMPLE_STATUSES = ("error", "length")


def _n(value) -> str:
    return f"{int(value):,}"


def _share(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "n/a"


def padding_share(tokens: dict) -> float | None:
    """Padded prompt slots beyond the prompt tokens computed (all of them, unless rows shared
    prefixes), as a fraction of those."""
    computed = tokens.get("prompt_computed") or tokens.get("prompt")
    return tokens["padded_prompt_slots"] / computed - 1 if computed else None


def decode_waste(tokens: dict) -> float | None:
    """Share of decode slots spent on rows that had already stopped (or were padding)."""
    return max(0.0, 1 - tokens["completion"] / tokens["decode_slots"]) if tokens.get("decode_slots") else None


def first_failures(fs, work: str, parts: list[str], limit: int) -> list[tuple[str, str, str]]:
    """(id, status, why) of the first ``limit`` rows of each status in EXAMPLE_STATUSES, reading
    only the columns that say why."""
    found: dict[str, list[tuple[str, str, str]]] = {status: [] for status in EXAMPLE_STATUSES}
    columns = ["id", "status", "error", "completion_tokens", "reasoning_tokens", "output_tokens"]
    for part in parts:
        path = join(work, part)
        if all(len(rows) >= limit for rows in found.values()) or not exists(fs, path):
            break
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=columns, batch_size=8192):
                for status, rows in found.items():
                    if len(rows) < limit:
                        picked = batch.filter(pc.equal(batch.column("status"), status)).slice(0, limit - len(rows))
                        rows += [(row["id"], status, _why(row)) for row in picked.to_pylist()]
    return [row for rows in found.values() for row in rows]


def _why(row: dict) -> str:
    if row["status"] == "length":
        return (f"cut off after {row['completion_tokens']} tokens ({row['reasoning_tokens']} reasoning, "
                f"{row['output_tokens']} output): raise --max-tokens or lower --reasoning-effort")
    return row.get("error") or ""


def _table(rows: list[tuple[str, str]]) -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{k.ljust(width)}  {v}" for k, v in rows]


def _summary_lines(title: str, rows_by_status: dict, tokens: dict, extra: list[tuple[str, str]]) -> list[str]:
    total = rows_by_status["total"]
    padding, waste = padding_share(tokens), decode_waste(tokens)
    rows = [
        ("rows", f"{_n(total)} total: " + ", ".join(
            f"{_n(rows_by_status[s])} {s} ({_share(rows_by_status[s], total)})" for s in ("ok", "length", "error"))),
        ("tokens", f"prompt {_n(tokens['prompt'])}, reasoning {_n(tokens['reasoning'])}, "
                   f"output {_n(tokens['output'])}, completion {_n(tokens['completion'])}"),
        *([("shared prefixes", f"prompt computed {_n(tokens['prompt_computed'])}, {_n(tokens.get('cached_prompt', 0))} "
                               f"read from shared prefixes, {_n(tokens.get('kv_bytes_saved', 0))} KV bytes saved")]
          if tokens.get("cached_prompt") and tokens.get("prompt_computed") else []),
        ("padding", f"{_n(tokens['padded_prompt_slots'])} padded prompt slots: "
                    + (f"{100 * padding:+.1f}% over the prompt tokens computed" if padding is not None else "n/a")),
        ("decode", f"{_n(tokens['decode_slots'])} decode slots: "
                   + (f"{100 * waste:.1f}% spent past a row's end" if waste is not None else "n/a")),
        *extra,
    ]
    return [title, *("  " + line for line in _table(rows))]


def format_manifest(output_uri: str, storage: Storage = LOCAL, max_failures: int = 5) -> str:
    """The job at ``output_uri`` as text: a finished job's manifest, or an unfinished job's progress."""
    _, work_dir = output_layout(output_uri)
    fs, work = storage.filesystem(work_dir)
    finished = manifest_path(fs, work)
    if finished:
        lines, parts = _finished(read_json(fs, finished))
    elif exists(fs, join(work, JOB_FILE)):
        lines, parts = _unfinished(fs, work, load_plan(output_uri, storage))
    else:
        return no_job_message(output_uri, work_dir)
    examples = first_failures(fs, work, parts, max_failures) if max_failures > 0 else []
    for status in EXAMPLE_STATUSES:
        rows = [(rid, why) for rid, row_status, why in examples if row_status == status]
        if rows:
            lines += ["", f"first {status} rows ({len(rows)} shown):"]
            lines += ["  " + line for line in _table(rows)]
    return "\n".join(lines)


def manifest_or_plan(output_uri: str, storage: Storage = LOCAL) -> dict:
    """A finished job's manifest; for an unfinished one, its progress. InputError when the folder
    holds no job (``ossbatch inspect`` exits 2)."""
    _, work_dir = output_layout(output_uri)
    fs, work = storage.filesystem(work_dir)
    finished = manifest_path(fs, work)
    if finished:
        return read_json(fs, finished)
    if exists(fs, join(work, JOB_FILE)):
        plan = load_plan(output_uri, storage)
        committed = committed_shards(plan)
        return {"job_key": plan.job_key, "finished": False, "shards": plan.num_shards, "committed_shards": committed,
                "rows": plan.total_rows, "output": plan.output}
    raise InputError(no_job_message(output_uri, work_dir))


def no_job_message(output_uri: str, work_dir: str) -> str:
    return f"{output_uri}: no ossbatch job here (no {MANIFEST_FILE} or {JOB_FILE} in {work_dir})"


def has_job(output_uri: str, storage: Storage = LOCAL) -> bool:
    _, work_dir = output_layout(output_uri)
    fs, work = storage.filesystem(work_dir)
    return manifest_path(fs, work) is not None or exists(fs, join(work, JOB_FILE))


def _finished(m: dict) -> tuple[list[str], list[str]]:
    model = m["model"]
    model_name = model.get("path") or model.get("name") or "?"
    wall = m["wall_seconds"]
    extra = [
        ("throughput", f"{m['tokens_per_second']:,.1f} completion tokens/s over {wall:,.1f} s wall"
                       + (f" ({m['resumed_shards']} shards from earlier runs)" if m.get("resumed_shards") else "")),
        ("engine", f"{m['engine_seconds']:,.1f} s in {_n(m['batches'])} batches"
                   + (f", {m['engine_tokens_per_second']:,.1f} completion tokens/s" if m.get("engine_tokens_per_second") else "")),
        ("shards", f"{len(m['shards'])} of up to {_n(m['shard_rows'])} rows, run by "
                   f"{len({s['worker'] for s in m['shards']})} worker(s)"),
        ("input", f"{', '.join(m['input']['uris'])} ({len(m['input']['files'])} files, {_n(m['input']['rows'])} rows)"),
        ("output", f"{m['output']['uri']} ({m['output']['format']})"),
        ("model", f"{model_name} {model.get('content_hash') or ''}".rstrip()),
        ("cost", format_cost(m.get("cost"))),
    ]
    title = f"ossbatch job {m['job_key']}: complete ({m['created_at']})"
    return _summary_lines(title, m["rows"], m["tokens"], extra), m["output"]["parts"]


def _unfinished(fs, work: str, plan) -> tuple[list[str], list[str]]:
    committed = committed_shards(plan)
    markers = [read_json(fs, join(work, MARKER_DIR, MARKER_NAME.format(i))) for i in committed]
    rows = {"total": sum(m["rows"] for m in markers)}
    for status in ("ok", "length", "error"):
        rows[status] = sum(m["statuses"][status] for m in markers)
    tokens = {k: sum(m["tokens"][k] for m in markers) for k in
              ("prompt", "reasoning", "output", "completion", "padded_prompt_slots", "decode_slots")}
    title = (f"ossbatch job {plan.job_key}: in progress, {len(committed)} of {plan.num_shards} shards "
             f"({_n(rows['total'])} of {_n(plan.total_rows)} rows) committed")
    extra = [("input", ", ".join(plan.inputs)), ("output", plan.output)]
    return _summary_lines(title, rows, tokens, extra), [m["part"] for m in markers]
