"""SIGKILL a running job at several moments, run it again: every id once, committed shards not redone."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
from pipeline_fakes import prompt_rows, write_jsonl

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ROWS, SHARD_ROWS = 60, 5
SHARDS = ROWS // SHARD_ROWS


def committed(out: Path) -> set[int]:
    markers = out / "_shards"
    return {int(p.stem.split("-")[1]) for p in markers.glob("shard-*.json")} if markers.exists() else set()


def logged_runs(log: Path) -> dict[int, list[int]]:
    """pid -> the shards that process computed, from the worker's log."""
    runs: dict[int, list[int]] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            runs.setdefault(entry["pid"], []).append(int(entry["ids"][0][1:]) // SHARD_ROWS)
    return runs


def start(source: str, out: Path, log: Path, *die_at: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log.with_suffix(".stderr"), "ab") as stderr:
        return subprocess.Popen([sys.executable, str(HERE / "kill_worker.py"), source, str(out), str(log), *die_at],
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def stderr_of(log: Path) -> str:
    path = log.with_suffix(".stderr")
    return path.read_text()[-3000:] if path.exists() else ""


def kill_after(proc: subprocess.Popen, log: Path, more_shards: int, delay: float) -> None:
    """SIGKILL ``proc`` once it has computed ``more_shards`` more shards, plus ``delay`` seconds."""
    baseline = sum(len(v) for v in logged_runs(log).values())
    deadline = time.monotonic() + 30
    while sum(len(v) for v in logged_runs(log).values()) < baseline + more_shards:
        assert proc.poll() is None, stderr_of(log)
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)


def test_killed_jobs_rerun_to_every_id_exactly_once(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(ROWS))
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    before_each_run: dict[int, set[int]] = {}

    # The moments: between a part and its marker, halfway through a part, while computing or
    # committing (killed from outside, twice, at different offsets), and during start-up.
    scenarios = [("marker:2", None), ("part:4", None), (None, (2, 0.0)), (None, (1, 0.02)), (None, "startup")]
    for die_at, outside in scenarios:
        done_before = committed(out)
        proc = start(source, out, log, *([die_at] if die_at else []))
        before_each_run[proc.pid] = done_before
        if outside == "startup":
            time.sleep(0.3)
            proc.send_signal(signal.SIGKILL)
        elif outside:
            kill_after(proc, log, *outside)
        assert proc.wait(timeout=60) == -signal.SIGKILL, stderr_of(log)
        if die_at == "marker:2":  # an orphan part: committed data, no marker
            assert (out / "data" / "part-00002.parquet").exists() and committed(out) == {0, 1}
        if die_at == "part:4":  # a torn temporary file, never under the part's name
            assert list((out / "data").glob(".part-00004.parquet.tmp-*")) and not (out / "data" / "part-00004.parquet").exists()

    before_each_run_final = committed(out)
    final = start(source, out, log)
    before_each_run[final.pid] = before_each_run_final
    assert final.wait(timeout=60) == 0, stderr_of(log)

    assert committed(out) == set(range(SHARDS))
    ids = ds.dataset(str(out / "data"), format="parquet").to_table().column("id").to_pylist()
    assert sorted(ids) == [f"r{i:05d}" for i in range(ROWS)]  # every id, exactly once
    assert not [p.name for p in out.rglob(".*tmp-*")]  # no temporary file survives finalize
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["rows"]["total"] == ROWS and len(manifest["shards"]) == SHARDS

    runs = logged_runs(log)
    for pid, shards in runs.items():
        redone = set(shards) & before_each_run[pid]
        assert not redone, f"run {pid} recomputed committed shards {sorted(redone)}"
    # Only shards a kill interrupted were ever computed twice.
    computed = [s for shards in runs.values() for s in shards]
    assert len(computed) - len(set(computed)) <= len(scenarios)
