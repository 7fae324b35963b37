"""Planning a 1M-row Parquet input streams it: memory stays far below the size of the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
ROWS, ROW_GROUP = 1_000_000, 100_000
PROMPT_HEAD = "Please summarise the following passage about " + "the history of numerical weather prediction, " * 4
PROMPT_TAIL = " in three sentences, keeping every number exact and naming each source you rely on."

# Runs in a fresh interpreter so that Arrow's pool peak and the process's peak RSS are the planner's own.
# Peak RSS comes from VmHWM: ru_maxrss would carry over the forking test process's peak across exec.
PROBE = """
import json, sys
import pyarrow as pa
from ossbatch.pipeline.job import JobSpec, plan_job

def peak_rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

before = peak_rss()
plan = plan_job(JobSpec(inputs=sys.argv[1], output=sys.argv[2], shard_rows=50_000))
print(json.dumps({
    "arrow_peak": pa.default_memory_pool().max_memory(),
    "rss_growth": peak_rss() - before,
    "rows": plan.total_rows, "shards": plan.num_shards,
}))
"""


def write_big_parquet(path: Path) -> int:
    """1M rows written a row group at a time; returns the bytes the whole table takes in memory."""
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("position", pa.int64())])
    table_bytes = 0
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, ROWS, ROW_GROUP):
            ids = pa.array([f"row-{i:07d}" for i in range(start, start + ROW_GROUP)])
            prompts = pc.binary_join_element_wise(PROMPT_HEAD, ids, PROMPT_TAIL, "")
            group = pa.table([ids, prompts, pa.array(range(start, start + ROW_GROUP), pa.int64())], schema=schema)
            writer.write_table(group)
            table_bytes += group.nbytes
    return table_bytes


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc")
def test_planning_a_million_rows_does_not_load_the_table(tmp_path):
    path = tmp_path / "big.parquet"
    table_bytes = write_big_parquet(path)
    assert table_bytes > 250e6
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    probe = subprocess.run([sys.executable, "-c", PROBE, str(path), str(tmp_path / "out")],
                           capture_output=True, text=True, env=env, timeout=120, check=True)
    measured = json.loads(probe.stdout.strip().splitlines()[-1])
    assert measured["rows"] == ROWS and measured["shards"] == 20
    # Ids alone are ~15 MB; the planner holds them (to find duplicates) and nothing else of a row.
    assert measured["arrow_peak"] < table_bytes / 5, measured
    assert measured["rss_growth"] < table_bytes / 2, measured
