"""Measuring a child process's memory: its process tree's RSS split into file-backed (the
memory-mapped checkpoint) and anonymous, sampled while it runs; and a memory cgroup to run it in.

    with MemoryCgroup(16 * GIB) as cgroup:          # None where the machine has no usable cgroup
        proc = subprocess.Popen(cmd, preexec_fn=cgroup.enter if cgroup else None)
        peak = sample_tree(proc)                     # blocks until the child exits

cgroup v1 (`memory.limit_in_bytes`) and v2 (`memory.max`) are both handled; the cgroup is made
under this process's own (so the limit nests inside whatever holds us) and removed after.
"""

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from ossbatch.engine.host_memory import process_memory

GIB = 1 << 30
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def process_tree(pid: int) -> list[int]:
    """`pid` and every descendant (from /proc/PID/task/*/children)."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        seen.append(p)
        for task in Path(f"/proc/{p}/task").glob("*") if Path(f"/proc/{p}/task").exists() else []:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return seen


@dataclass
class TreePeak:
    """The process tree's peak RSS over the samples, and what it was made of at that sample."""

    rss: int = 0  # bytes, all processes of the tree at the peak sample
    anon: int = 0  # anonymous bytes at that sample
    file: int = 0  # file-backed bytes at that sample (the weights' mapping, shared libraries)
    peak_anon: int = 0  # the largest anonymous total of any sample
    processes: int = 0  # the most processes seen at once
    samples: int = 0
    main_hwm: int = 0  # the child's own VmHWM (kernel's high-water mark), bytes
    by_process: dict = field(default_factory=dict)  # pid -> (rss, anon) at the peak sample


def sample_tree(proc, interval: float = 0.05) -> TreePeak:
    """Samples `proc`'s process tree until it exits; returns the peak."""
    peak = TreePeak()
    while proc.poll() is None:
        rss = anon = file = 0
        per = {}
        pids = process_tree(proc.pid)
        for pid in pids:
            m = process_memory(pid)
            if not m["rss"]:  # gone since the listing
                continue
            rss, anon, file = rss + m["rss"], anon + m["anonymous"], file + m["file"]
            per[pid] = (m["rss"], m["anonymous"])
            if pid == proc.pid:
                peak.main_hwm = max(peak.main_hwm, m["peak_rss"])
        peak.samples += 1
        peak.processes = max(peak.processes, len(per))
        peak.peak_anon = max(peak.peak_anon, anon)
        if rss > peak.rss:
            peak.rss, peak.anon, peak.file, peak.by_process = rss, anon, file, per
        time.sleep(interval)
    return peak


class MemoryCgroup:
    """A memory cgroup limited to `limit_bytes`, made under this process's own and removed on exit.
    `enter` (a `preexec_fn`) moves the child into it before it execs, so all its memory counts."""

    def __init__(self, limit_bytes: int, name: str | None = None):
        self.limit_bytes = limit_bytes
        self.name = name or f"ossbatch-bench-{os.getpid()}"
        self.path: Path | None = None
        self.version = 0

    def __enter__(self) -> "MemoryCgroup | None":
        for version, parent in _memory_cgroup_parents():
            path = parent / self.name
            try:
                path.mkdir(exist_ok=True)
                limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
                (path / limit_file).write_text(str(self.limit_bytes))
                if version == 2 and (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")  # v1 here has no swap to count
            except OSError:
                _remove(path)
                continue
            self.path, self.version = path, version
            return self
        return None

    def enter(self) -> None:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    @property
    def oom_kills(self) -> int:
        """How many processes the kernel killed for the limit."""
        name = "memory.oom_control" if self.version == 1 else "memory.events"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    @property
    def max_usage(self) -> int:
        """The cgroup's peak charge (page cache included), where the kernel reports it."""
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return 0

    def __exit__(self, *exc) -> None:
        if self.path is not None:
            _remove(self.path)


def _remove(path: Path) -> None:
    """rmdir once its processes have exited (a cgroup with none left goes at once)."""
    for _ in range(50):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)


def _memory_cgroup_parents() -> list[tuple[int, Path]]:
    """Where a memory cgroup can be made: under this process's own v1 memory cgroup, then v2's."""
    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if "memory" in controllers.split(","):
            base = _CGROUP_ROOT / "memory"
            if (base / "memory.limit_in_bytes").exists():
                out.append((1, base / where.lstrip("/")))
    for line in lines:
        if line.startswith("0::"):
            for base in (_CGROUP_ROOT, _CGROUP_ROOT / "unified"):
                parent = base / line[3:].lstrip("/")
                try:
                    if "memory" in (parent / "cgroup.subtree_control").read_text().split():
                        out.append((2, parent))
                except OSError:
                    pass
    return out


def machine_has_memory_cgroups() -> bool:
    return bool(_memory_cgroup_parents())
