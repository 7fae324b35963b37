"""Live progress: lines during a shard (not only at its end) when stderr is not a terminal, a
bar on a terminal, nothing under --quiet; the counts come from the engine's steps."""

import io
import re

from ossbatch.flows.progress import Progress
from flow_helpers import ossbatch, write_jsonl

LINE = re.compile(r"\d\d:\d\d:\d\d shard (\d+)/(\d+)  rows (\d+)/(\d+) \(\d+%\)  [\d,.]+ tok/s  ETA (\S+)")


def _rows(tmp_path, n=12):
    return write_jsonl(tmp_path / "in.jsonl", [{"id": f"r{i}", "prompt": f"count to {i}"} for i in range(n)])


def test_progress_lines_appear_during_a_shard_when_not_a_terminal(tiny_model_dir, tmp_path):
    # One shard of 12 rows, two KV slots: the shard takes many engine steps.
    argv = ["run", "--model", tiny_model_dir, "--input", _rows(tmp_path), "--max-tokens", "12", "--temperature", "0",
            "--max-batch-rows", "2", "--orchestrator", "none", "--progress-seconds", "0.05"]
    proc = ossbatch(*argv, "--output", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    lines = [LINE.fullmatch(line) for line in proc.stderr.splitlines()]
    assert all(lines), proc.stderr  # nothing but progress lines on stderr
    counts = [(int(m.group(1)), int(m.group(3)), int(m.group(4))) for m in lines]
    during = [rows for shard, rows, total in counts if shard == 1 and rows < total]
    assert len(during) >= 2, counts  # lines while the shard runs, not only at its end
    assert during == sorted(during) and counts[-1][1:] == (12, 12)
    assert lines[-1].group(5) == "0s"

    quiet = ossbatch(*argv, "--output", tmp_path / "quiet", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_progress_counts_rows_and_tokens_inside_a_shard_and_publishes_them():
    published = []
    stream = io.StringIO()
    progress = Progress(total_rows=10, shards=2, pending=2, stream=stream, interval=0.0, terminal=False,
                        publish=lambda done, total: published.append((done, total)), publish_interval=0.0)
    progress.rows_done(0, 4)
    progress.rows_done(3, 4)
    assert (progress.rows, progress.tokens, progress.current_shard) == (3, 8, 1)
    progress.committed({"rows": 5, "tokens": {"completion": 20}})
    assert (progress.rows, progress.tokens, progress.current_shard) == (5, 20, 2)
    progress.rows_done(5, 9)
    progress.committed({"rows": 5, "tokens": {"completion": 9}})
    assert published == [(0, 10), (3, 10), (5, 10), (10, 10), (10, 10)]
    assert [LINE.fullmatch(line).group(3) for line in stream.getvalue().splitlines()] == ["0", "3", "5", "10", "10"]


def test_a_terminal_gets_a_bar_and_quiet_gets_nothing():
    stream = io.StringIO()
    bar = Progress(total_rows=4, shards=1, pending=1, stream=stream, terminal=True)
    bar.rows_done(2, 6)
    bar.committed({"rows": 4, "tokens": {"completion": 12}})
    bar.close()
    assert "shard 1/1" in stream.getvalue() and "4/4" in stream.getvalue()

    silent = io.StringIO()
    quiet = Progress(total_rows=4, shards=1, pending=1, stream=silent, quiet=True, terminal=True, interval=0.0)
    quiet.rows_done(4, 6)
    quiet.committed({"rows": 4, "tokens": {"completion": 6}})
    quiet.close()
    assert silent.getvalue() == ""
