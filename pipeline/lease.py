"""One run at a time per output: a lease in the output's work directory.

A lease is a numbered file, ``_lease-000007.json``; the highest number is the current one.
Taking a lease creates the next number *exclusively* (``O_EXCL`` locally, a conditional
put ``If-None-Match: *`` on S3 through s3fs's mode "x"), so of two runs racing for an
output exactly one wins, on any store, with no lock server. The holder renews its file
while it works; a killed run stops renewing and its lease lapses after ``ttl`` seconds, so
a re-run takes over without anyone deleting anything by hand. A holder checks it still
holds the lease before each commit, so a run that stalled past its expiry and lost the
output to another run stops instead of writing into it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from ossbatch.pipeline.storage import (
    LOCAL_PROTOCOLS, InputError, join, list_names, protocol_of, read_json, remove, write_bytes_atomic,
)

LEASE_RE = re.compile(r"_lease-(\d{6})\.json")
DEFAULT_TTL_SECONDS = 120.0


class LeaseHeld(InputError):
    """Another live run holds the output."""


class LeaseLost(InputError):
    """This run's lease lapsed and another run took the output over (the run stops: exit 2)."""


@dataclass
class Holder:
    host: str
    pid: int
    started_at: float
    expires_at: float
    token: str
    released: bool = False

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started_at))
        return f"{self.host} pid {self.pid}, started {started}"


def lease_name(generation: int) -> str:
    return f"_lease-{generation:06d}.json"


def is_lease_file(name: str) -> bool:
    return bool(LEASE_RE.fullmatch(name))


def _generations(fs, work: str) -> list[int]:
    return sorted(int(m.group(1)) for name in list_names(fs, work) if (m := LEASE_RE.fullmatch(name)))


def _process_gone(holder: Holder) -> bool:
    """True when the holder ran on this host and its process is dead (killed: it cannot renew, so
    a re-run need not wait out the ttl). A holder on another host is judged by its expiry alone."""
    if holder.host != socket.gethostname():
        return False
    if holder.pid == os.getpid():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    try:  # a killed child its parent has not reaped yet is a zombie: dead all the same
        with open(f"/proc/{holder.pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def current_holder(fs, work: str, now: float | None = None) -> Holder | None:
    """The live holder of ``work``, or None when the output is free (no lease, released, lapsed,
    or held by a dead process of this host)."""
    generations = _generations(fs, work)
    if not generations:
        return None
    try:
        holder = Holder(**read_json(fs, join(work, lease_name(generations[-1]))))
    except FileNotFoundError:
        return None
    now = time.time() if now is None else now
    return None if holder.released or holder.expires_at <= now or _process_gone(holder) else holder


def check_held(fs, work: str, generation: int, token: str) -> None:
    """Raises LeaseLost unless lease ``generation`` with ``token`` is still ``work``'s current one
    (for workers that commit under a lease their driver holds)."""
    generations = _generations(fs, work)
    if generations and generations[-1] == generation:
        try:
            if read_json(fs, join(work, lease_name(generation))).get("token") == token:
                return
        except FileNotFoundError:
            pass
    raise LeaseLost(f"{work}: this run's lease lapsed and another run took the output over; "
                    "stopping without writing")


def _create_exclusive(fs, path: str, data: bytes) -> bool:
    """True when this call created ``path`` with ``data``; False when it already existed. Another
    run never sees the file without its content: locally it is written aside and hard-linked into
    place (link(2) is atomic and fails on an existing name; O_EXCL would show an empty file to a
    run reading it between create and write); an S3 conditional put is atomic by itself."""
    if protocol_of(fs.unstrip_protocol(path)) in LOCAL_PROTOCOLS:
        local = fs._strip_protocol(path)
        aside = os.path.join(os.path.dirname(local), f".{os.path.basename(local)}.{uuid.uuid4().hex}.tmp")
        with open(aside, "xb") as f:
            f.write(data)
        try:
            os.link(aside, local)
        except FileExistsError:
            return False
        finally:
            os.unlink(aside)
        return True
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    except OSError as err:  # s3fs: a failed If-None-Match is "412 Precondition Failed"
        if "PreconditionFailed" in str(err) or "412" in str(err):
            return False
        raise
    return True


class Lease:
    """A held lease; renew it at least every ``ttl`` seconds (``keep_alive`` does it in a thread)."""

    def __init__(self, fs, work: str, generation: int, holder: Holder, ttl: float):
        self.fs, self.work, self.generation, self.holder, self.ttl = fs, work, generation, holder, ttl
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def path(self) -> str:
        return join(self.work, lease_name(self.generation))

    def _write(self) -> None:
        # Atomic: a run reading the holder while it is renewed must never see half a file.
        write_bytes_atomic(self.fs, self.path, json.dumps(asdict(self.holder)).encode())

    def check(self) -> None:
        """Raises LeaseLost unless this lease is still the output's current one."""
        check_held(self.fs, self.work, self.generation, self.holder.token)

    def renew(self) -> None:
        self.check()
        self.holder.expires_at = time.time() + self.ttl
        self._write()

    def keep_alive(self) -> Lease:
        """Renews every ttl/4 seconds in a daemon thread until ``release``."""

        def loop():
            while not self._stop.wait(self.ttl / 4):
                try:
                    self.renew()
                except (LeaseLost, OSError):
                    return  # the next check() before a commit reports it

        self._thread = threading.Thread(target=loop, name="ossbatch-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.check()
        except LeaseLost:
            return
        self.holder.released = True
        self._write()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(fs, work: str, ttl: float = DEFAULT_TTL_SECONDS, now: float | None = None,
            abandoned: Callable[[Holder], bool] | None = None) -> Lease:
    """Takes the output's lease, or raises LeaseHeld naming the live holder and how to take over.
    ``abandoned(holder)``: the caller knows that live-looking holder to be gone (its own earlier run)."""
    if protocol_of(fs.unstrip_protocol(work)) in LOCAL_PROTOCOLS:
        fs.makedirs(work, exist_ok=True)  # (s3fs would create a missing *bucket* here: never on S3)
    for _ in range(8):  # another run may take the next number between our listing and our create
        generations = _generations(fs, work)
        live = current_holder(fs, work, now)
        if live is not None and not (abandoned and abandoned(live)):
            raise LeaseHeld(
                f"{work} is in use by another run ({live.describe()}); its lease expires in "
                f"{max(0, live.expires_at - time.time()):.0f} s unless renewed. Wait for it to finish; or, to take "
                "over, stop that run and re-run: a stopped run on this host frees the output at once, one on "
                "another host when its lease lapses")
        generation = (generations[-1] if generations else 0) + 1
        started = time.time()
        holder = Holder(socket.gethostname(), os.getpid(), started, started + ttl, uuid.uuid4().hex)
        if _create_exclusive(fs, join(work, lease_name(generation)), json.dumps(asdict(holder)).encode()):
            for old in generations:  # dead leases of earlier runs: nobody reads them again
                try:
                    remove(fs, join(work, lease_name(old)))
                except FileNotFoundError:
                    pass
            return Lease(fs, work, generation, holder, ttl)
    raise LeaseHeld(f"{work}: other runs keep taking the output's lease; is a run in a loop?")
