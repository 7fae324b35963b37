"""The host's memory as the engine sees it: how much this process holds (file-backed, i.e. the
memory-mapped checkpoint, against anonymous), how much the machine or its memory cgroup allows,
and glibc's allocator told to hand large blocks back.

Why the allocator matters: glibc raises its mmap threshold each time a large block is freed (up
to 32 MiB), after which blocks of that size come from the heap. Unpacking MXFP4 experts allocates
and frees tens of MiB at a time between the experts the cache keeps, so the kept ones pin the heap
around freed temporaries and it is never given back: on 20b shapes that was most of the anonymous
memory beyond the weights (issue 16). Unpacking runs inside `mapped_allocations`, where every
block of 1 MiB or more is its own mapping. (A 1 MiB threshold everywhere did the same but made
per-step temporaries, e.g. [32, 201088] softmax, ~1.5x slower in page faults.)
"""

import ctypes
import ctypes.util
import os
from contextlib import contextmanager
from pathlib import Path

MAPPED_BLOCK_BYTES = 1 << 20  # inside `mapped_allocations`: blocks this large get their own mapping
HEAP_BLOCK_LIMIT = 32 << 20  # elsewhere: glibc's own ceiling for its moving threshold, fixed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_mallopt = None


def _glibc_mallopt():
    global _mallopt
    if _mallopt is None:
        try:
            _mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
        except (OSError, AttributeError):
            _mallopt = False
    return _mallopt


def release_large_allocations() -> bool:
    """Fix glibc's mmap threshold at its usual ceiling (32 MiB), so that `mapped_allocations` can
    lower it and raise it back; per-step temporaries below it keep coming from the heap, as they
    did once the moving threshold had risen. False where the C library is not glibc."""
    mallopt = _glibc_mallopt()
    if not mallopt:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * HEAP_BLOCK_LIMIT))


@contextmanager
def mapped_allocations():
    """Inside: every block of 1 MiB or more is its own mapping, returned to the kernel when freed.
    For long-lived blocks made among large temporaries (an unpacked expert kept in the cache): from
    the heap they would pin the freed temporaries around them."""
    mallopt = _glibc_mallopt()
    if mallopt:
        mallopt(_M_MMAP_THRESHOLD, MAPPED_BLOCK_BYTES)
    try:
        yield
    finally:
        if mallopt:
            mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK_LIMIT)


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """Resident bytes of one process: rss, anonymous, file (mapped files, shared memory), peak_rss."""
    fields = {"VmRSS": "rss", "RssAnon": "anonymous", "RssFile": "file", "RssShmem": "shmem", "VmHWM": "peak_rss"}
    out = dict.fromkeys(fields.values(), 0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in fields:
                out[fields[key]] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    out["file"] += out.pop("shmem")
    return out


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return None if text in ("", "max") else int(text)


def cgroup_memory_limit() -> int | None:
    """The tightest memory limit of this process's cgroup and its ancestors (v1 or v2); None: none set."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, where = line.split(":", 2)
        if "memory" in controllers.split(","):
            base, name = Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"
        elif line.startswith("0::"):
            base = next((b for b in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")) if (b / "cgroup.controllers").exists()), None)
            name = "memory.max"
            if base is None:
                continue
        else:
            continue
        path = base / where.lstrip("/")
        while True:
            limit = _read_int(path / name)
            if limit is not None and limit < 1 << 60:  # v1 writes "no limit" as ~2^63
                limits.append(limit)
            if path == base:
                break
            path = path.parent
    return min(limits) if limits else None


def meminfo() -> dict[str, int]:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def machine_memory() -> int:
    """What this process may use at most: the machine's memory, or its cgroup's limit if lower."""
    total = meminfo().get("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = cgroup_memory_limit()
    return min(total, limit) if limit else total


def default_memory_budget(mapped_bytes: int) -> int:
    """The anonymous memory a job may use when --memory-budget is not given: what the machine (or
    cgroup) allows, less what other processes hold now, less the checkpoint's mapping, which must
    stay resident or every step reads the weights from disk again."""
    info = meminfo()
    room = machine_memory()
    if "MemAvailable" in info:
        mine = process_memory()
        room = min(room, info["MemAvailable"] + mine["anonymous"] + mine["file"])
    return max(room - mapped_bytes, 0)


def fit_expert_cache(model, budget_bytes: int | None, batch_tokens: int, max_batch_rows: int, cap_bytes: int,
                     label_scoring: bool = False):
    """Sizes `model`'s expert cache to what `budget_bytes` of anonymous memory leaves once the
    process as it stands and the batch's buffers are counted (engine/memory_plan.py `HostBudget`;
    `label_scoring`: rows' labels are scored as they finish); None: the default budget. Returns the
    plan (None for a model without an expert cache)."""
    from ossbatch.engine.memory_plan import plan_host_memory

    if model.experts is None:
        return None
    if budget_bytes is None:
        budget_bytes = default_memory_budget(model.weights.host_bytes()["mapped"])
    in_use = process_memory()["anonymous"] - model.experts.used_bytes
    plan = plan_host_memory(model.config, budget_bytes, in_use, batch_tokens, max_batch_rows, model.dtype.itemsize, cap_bytes,
                            label_scoring)
    model.experts.resize(plan.expert_cache_bytes)
    return plan
