"""Live progress of a job: rows done, tokens/s, ETA and the current shard, inside a shard.

The engine reports every step through `ShardInferencer.on_progress` (`rows_done`), the shard
driver every commit (`committed`). On a terminal a rich progress bar redraws twice a second; on
anything else (cron's mail, a log file, Prefect's logs) one plain line is written every
``interval`` seconds, through ``emit`` when given (the Prefect flow passes its run logger). With
``quiet`` nothing is shown. ``publish(done_rows, rows_to_do)``, when given, hears the same counts
(at most every ``publish_interval`` seconds, and at every commit) even when quiet: the flow passes
one that updates Prefect's progress artifact.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime

DEFAULT_INTERVAL = 30.0  # seconds between plain progress lines
PUBLISH_INTERVAL = 2.0  # seconds between progress artifact updates


def _duration(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):  # nan: nothing done yet
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s" if rest >= 60 else f"{rest}s"


class Progress:
    def __init__(self, total_rows: int, shards: int, pending: int, quiet: bool = False, stream=None,
                 publish: Callable[[int, int], None] | None = None, interval: float | None = None,
                 emit: Callable[[str], None] | None = None, rows_to_do: int | None = None,
                 terminal: bool | None = None, publish_interval: float = PUBLISH_INTERVAL):
        self.total_rows, self.shards, self.quiet, self.publish = total_rows, shards, quiet, publish
        self.stream = stream or sys.stderr
        self.done_shards = shards - pending
        self.rows_to_do = rows_to_do if rows_to_do is not None else (
            round(total_rows * pending / shards) if shards else 0)
        self.committed_rows = self.committed_tokens = 0
        self.shard_rows = self.shard_tokens = 0  # inside the shard running now
        self.interval = DEFAULT_INTERVAL if interval is None else interval
        self.publish_interval = publish_interval
        self.emit = emit or (lambda line: print(line, file=self.stream, flush=True))
        self.started = time.monotonic()
        self._last_line = self._last_publish = self.started
        self._lock = threading.Lock()
        if terminal is None:
            terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        if terminal and not quiet and pending:
            self._bar = _Bar(self)

    # ---------------------------------------------------------------- counts

    @property
    def rows(self) -> int:
        return self.committed_rows + self.shard_rows

    @property
    def tokens(self) -> int:
        return self.committed_tokens + self.shard_tokens

    @property
    def current_shard(self) -> int:
        """1-based number of the shard running now (shards run in order)."""
        return min(self.done_shards + 1, self.shards)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float:
        elapsed = time.monotonic() - self.started
        left = max(self.rows_to_do - self.rows, 0)
        return elapsed / self.rows * left if self.rows else float("nan")

    def line(self) -> str:
        share = f" ({100 * self.rows / self.rows_to_do:.0f}%)" if self.rows_to_do else ""
        return (f"{datetime.now().strftime('%H:%M:%S')} shard {self.current_shard}/{self.shards}  "
                f"rows {self.rows:,}/{self.rows_to_do:,}{share}  {self.rate():,.1f} tok/s  ETA {_duration(self.eta())}")

    # ---------------------------------------------------------------- events

    def rows_done(self, rows: int, tokens: int) -> None:
        """From the engine: ``rows`` finished and ``tokens`` generated since the last call (``rows``
        is negative when a failed batch's rows are taken back to run again one by one)."""
        with self._lock:
            self.shard_rows += rows
            self.shard_tokens += tokens
        self._show(final=False)

    def committed(self, marker: dict) -> None:
        with self._lock:
            self.done_shards += 1
            self.shard_rows = self.shard_tokens = 0
            self.committed_rows += marker.get("rows", 0)
            self.committed_tokens += marker.get("tokens", {}).get("completion", 0)
        self._show(final=True)

    def _show(self, final: bool) -> None:
        now = time.monotonic()
        if self.publish and (final or now - self._last_publish >= self.publish_interval):
            self._last_publish = now
            self.publish(self.rows, self.rows_to_do)
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update()
        elif final or now - self._last_line >= self.interval:
            self._last_line = now
            self.emit(self.line())

    def close(self, manifest: dict | None = None) -> None:
        if self._bar is not None:
            self._bar.stop()


class _Bar:
    """The terminal display: one rich progress bar, redrawn twice a second by rich's own thread."""

    def __init__(self, progress: Progress):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn

        self.progress = progress
        self.display = RichProgress(
            TextColumn("shard {task.fields[shard]}"), BarColumn(), MofNCompleteColumn(), TextColumn("rows"),
            TextColumn("{task.fields[rate]} tok/s"), TextColumn("ETA {task.fields[eta]}"),
            console=Console(file=progress.stream), refresh_per_second=2, transient=False,
        )
        self.task = self.display.add_task("rows", total=progress.rows_to_do or None, **self._fields())
        self.display.start()

    def _fields(self) -> dict:
        p = self.progress
        return {"shard": f"{p.current_shard}/{p.shards}", "rate": f"{p.rate():,.1f}", "eta": _duration(p.eta())}

    def update(self) -> None:
        self.display.update(self.task, completed=self.progress.rows, **self._fields())

    def stop(self) -> None:
        self.update()
        self.display.stop()
