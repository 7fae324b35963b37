"""A batch job as plan -> (read_shard -> infer -> commit_shard)* -> finalize, each step a plain function.

Output layout (``work_dir`` is the output directory, or ``<output>.parts`` for a Batch ``.jsonl``)::

    _job.json                 identity of the job that owns this directory, and its plan
    data/part-00000.parquet   shard 0's rows; written under a temporary name, then committed
    _shards/shard-00000.json  shard 0's marker, written after its part: committed iff it exists
    _manifest.json            written by finalize_job once every shard is committed
    _lease-000007.json        while a run works: the lease that holds the output (see pipeline.lease)

``data/`` holds nothing but the result rows, one schema across parts: it is the dataset path
(polars, pyarrow.dataset, DuckDB, Spark read the folder as is). Everything else starts with ``_``,
which folder readers skip. Outputs written before (parts and manifest.json beside _job.json)
are still read, resumed and inspected.

A re-run of the same job (same inputs, model content hash, settings, shard size) finds _job.json,
skips shards that have markers and overwrites any part file left without one, so every id ends up
in the output exactly once however often the job was killed. pipeline.driver runs these steps, in
one process or a shard per Prefect task or Ray actor; JobPlan is plain data (``to_dict``/
``from_dict``, ``load_plan``) plus the job's `Storage`, so shards may run elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import weakref
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

import jsonschema
import pyarrow as pa
import pyarrow.compute as pc

from ossbatch.pipeline.batch_api import (
    CHOICE_COLUMN, choices_of, count_lines, error_output_of, iter_part_rows, planned_ids, write_batch_output,
)
from ossbatch.pipeline.lease import (
    DEFAULT_TTL_SECONDS, Lease, LeaseHeld, LeaseLost, acquire, check_held, current_holder, is_lease_file,
)
from ossbatch.pipeline.read import (
    BadLine, input_errors, iter_jsonl_lines, open_input, parquet_file, parse_jsonl_line, read_ranges,
)
from ossbatch.pipeline.storage import (
    LOCAL, LOCAL_PROTOCOLS, InputError, InputFile, Storage, compression_of, exists, expand_inputs, join, list_names,
    is_glob, lists_under, protocol_of, read_json, remove, storage_error, write_json_atomic,
)
from ossbatch.pipeline.batch_fields import served_names
from ossbatch.pipeline.validate import BATCH_FIELDS, ECHO_COLUMN, PLAIN_FIELDS, load_schema, passthrough_of
from ossbatch.pipeline.write import (
    PassthroughTypes, STATUSES, decode_schema, encode_schema, results_table, shard_summary,
    write_parquet_atomic,
)

JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
LEGACY_MANIFEST_FILE = "manifest.json"  # outputs written before the data/ layout
MARKER_DIR = "_shards"
DATA_DIR = "data"
PART_NAME = DATA_DIR + "/part-{:05d}.parquet"
MARKER_NAME = "shard-{:05d}.json"
_PART_RE = re.compile(r"part-(\d+)\.parquet")
_MARKER_RE = re.compile(r"shard-(\d+)\.json")
PLAN_VERSION = 1
DEFAULT_SHARD_ROWS = 10_000
ID_CHUNK = 65_536
DUPLICATES_NAMED = 20
TOKEN_KEYS = ("prompt", "cached_prompt", "prompt_computed", "kv_bytes_saved", "reasoning", "output", "completion",
              "padded_prompt_slots", "decode_slots")
# How long a run's lease on its output outlives its last renewal (it renews every quarter of it):
# the wait before another host may take over the output of a run that died without releasing it.
LEASE_TTL_SECONDS = DEFAULT_TTL_SECONDS


@dataclass
class JobSpec:
    inputs: list[str] | str
    output: str
    storage: Storage = LOCAL
    shard_rows: int = DEFAULT_SHARD_ROWS
    overwrite: bool = False
    model_fingerprint: dict = field(default_factory=dict)  # {"path", "content_hash", "config"}
    settings: dict = field(default_factory=dict)  # whatever changes outputs: part of the job identity
    error_output: str | None = None  # a Batch output's failed lines (default: error_output_of(output))


@dataclass
class JobPlan:
    job_key: str
    identity: dict
    inputs: list[str]
    output: str
    output_format: str  # "parquet" | "batch_jsonl"
    work_dir: str
    storage: Storage  # holds credentials: never in to_dict(), so never in _job.json
    files: list[dict]
    shards: list[dict]  # {"rows": n, "ranges": [range, ...]}; see pipeline.read for ranges
    total_rows: int
    model: dict
    settings: dict
    shard_rows: int
    passthrough_schema: str  # base64 Arrow IPC schema of the passthrough columns
    already_committed: list[int]  # shards committed before this plan was made (a resume)
    planned_at: str
    lease: dict = field(default_factory=dict)  # {"generation", "token"} of the lease the plan holds the output by
    error_output: str | None = None  # where a Batch output's failed lines go; None: error_output_of(output)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def to_dict(self) -> dict:
        """The plan as plain data, without the storage (its options may hold credentials)."""
        data = asdict(replace(self, storage=LOCAL))
        del data["storage"]
        return data

    @classmethod
    def from_dict(cls, data: dict, storage: Storage = LOCAL) -> JobPlan:
        return cls(**data, storage=storage)

    def input_files(self) -> list[InputFile]:
        return [InputFile(**f) for f in self.files]

    def work_fs(self):
        return self.storage.filesystem(self.work_dir)

    def arrow_passthrough_schema(self) -> pa.Schema:
        return decode_schema(self.passthrough_schema)


def output_layout(output: str) -> tuple[str, str]:
    """(format, work dir): a ``.jsonl`` output is the Batch format, built from parts beside it."""
    output = output.rstrip("/")
    if output.lower().endswith(".jsonl"):
        return "batch_jsonl", output + ".parts"
    return "parquet", output


def default_worker() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class _ShardBuilder:
    """Cuts the stream of records, file after file, into shards of ``shard_rows``."""

    def __init__(self, shard_rows: int):
        self.shard_rows = shard_rows
        self.shards: list[dict] = []
        self._ranges: list[dict] = []
        self._rows = 0

    def add(self, file_index: int, start: int, count: int, *, offset: int | None = None, line: int | None = None):
        """``count`` consecutive records of a file from record ``start`` (at byte ``offset``/``line``)."""
        while count > 0:
            take = min(count, self.shard_rows - self._rows)
            last = self._ranges[-1] if self._ranges else None
            if last and last["file"] == file_index and last["stop"] == start:
                last["stop"] += take
            else:
                self._ranges.append({"file": file_index, "start": start, "stop": start + take,
                                     "offset": offset, "line": line if line is not None else start + 1})
            self._rows += take
            start, count, offset, line = start + take, count - take, None, None
            if self._rows == self.shard_rows:
                self._close()

    def _close(self):
        self.shards.append({"rows": self._rows, "ranges": self._ranges})
        self._ranges, self._rows = [], 0

    def finish(self) -> list[dict]:
        if self._ranges:
            self._close()
        return self.shards


class _IdCounter:
    """Every id seen, kept as Arrow string chunks (compact), counted once at the end."""

    def __init__(self):
        self._chunks: list[pa.Array] = []
        self._pending: list[str] = []

    def add(self, request_id: str):
        self._pending.append(request_id)
        if len(self._pending) >= ID_CHUNK:
            self._flush()

    def _flush(self):
        if self._pending:
            self._chunks.append(pa.array(self._pending, type=pa.string()))
            self._pending = []

    def duplicates(self) -> list[tuple[str, int]]:
        """(id, count) of every id seen more than once.

        Sorting and comparing neighbours needs about half the memory of a hash-based
        value_counts (which holds a hash table and every distinct value again).
        """
        self._flush()
        if not self._chunks:
            return []
        chunks, self._chunks = self._chunks, []
        if sum(c.nbytes for c in chunks) >= 1 << 31:  # past what 32-bit string offsets address
            chunks = [c.cast(pa.large_string()) for c in chunks]
        ids = pa.concat_arrays(chunks)
        del chunks
        ordered = ids.take(pc.sort_indices(ids))
        del ids
        repeats = ordered.slice(1).filter(pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1)))
        if not len(repeats):
            return []
        counts = pc.value_counts(repeats)
        return [(value, count + 1) for value, count in
                zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())]


def _scan_jsonl(file: InputFile, index: int, storage: Storage, builder, ids, types) -> None:
    digest = hashlib.sha256()
    seekable = compression_of(file.uri) is None
    rows = 0
    with open_input(file, storage) as f:
        for ordinal, (line_no, offset, raw) in enumerate(iter_jsonl_lines(f, digest=digest)):
            builder.add(index, ordinal, 1, offset=offset if seekable else None, line=line_no)
            fallback = f"{file.label}:{line_no}"
            record = parse_jsonl_line(raw, fallback)
            if isinstance(record, BadLine):
                ids.add(fallback)
            else:
                for request_id in planned_ids(record, fallback):  # n choices take n ids
                    ids.add(request_id)
                types.observe_values(passthrough_of(record))
                if choices_of(record) > 1:
                    types.observe_values({CHOICE_COLUMN: 0})
            rows += 1
    # The content hash replaces the etag/mtime: a JSONL re-written with the same rows still resumes.
    file.version = "sha256:" + digest.hexdigest()
    file.rows = rows


def _scan_parquet(file: InputFile, index: int, storage: Storage, builder, ids, types) -> None:
    with parquet_file(file, storage) as reader:
        schema = reader.schema_arrow
        names = schema.names
        file.rows = reader.metadata.num_rows
        builder.add(index, 0, file.rows)
        batch_form = "body" in names and any(c in names for c in ("url", "custom_id", "method"))
        body_type = schema.field("body").type if batch_form else None
        with_choices = batch_form and pa.types.is_struct(body_type) and body_type.get_field_index("n") >= 0
        if batch_form:
            types.observe_arrow(schema, [c for c in names if c not in BATCH_FIELDS])
            types.observe_values({"model": "", ECHO_COLUMN: ""})
            if with_choices:
                types.observe_values({CHOICE_COLUMN: 0})
        else:
            types.observe_arrow(schema, [c for c in names if c not in PLAIN_FIELDS])
        id_columns = [c for c in ("id", "custom_id") if c in names]
        if with_choices:  # a body's n gives its line n choice ids
            id_columns += [c for c in ("url", "method", "body") if c in names]
        if not id_columns:
            for row in range(1, file.rows + 1):
                ids.add(f"{file.label}:{row}")
            return
        row = 0
        # Only the id columns are decoded, a batch at a time: planning never holds the table.
        for batch in reader.iter_batches(batch_size=ID_CHUNK, columns=id_columns):
            columns = [batch.column(c).to_pylist() for c in id_columns]
            for i, values in enumerate(zip(*columns)):
                for request_id in planned_ids(dict(zip(id_columns, values)), f"{file.label}:{row + i + 1}"):
                    ids.add(request_id)
            row += batch.num_rows


def _duplicate_error(duplicates: list[tuple[str, int]]) -> InputError:
    named = ", ".join(f"{value!r} ({count} rows)" for value, count in duplicates[:DUPLICATES_NAMED])
    more = f" and {len(duplicates) - DUPLICATES_NAMED} more" if len(duplicates) > DUPLICATES_NAMED else ""
    return InputError(
        f"duplicate ids in the input: {named}{more}. Every row's id (or custom_id) must be unique, "
        "since results are keyed by it; nothing was run."
    )


def _is_ours(name: str) -> bool:
    # "_" names are metadata (ours, or written beside the results for them, like _report.html).
    return name.startswith("_") or name in (DATA_DIR, LEGACY_MANIFEST_FILE) or bool(_PART_RE.fullmatch(name))


# This process's live leases, by output work dir: plan_job takes one, finalize_job (or release_output)
# hands it back. A Lease holds a filesystem and a thread, so it stays here, never in the plan; beside
# it, a weak reference to the plan it was taken for: once that plan is gone, nothing can use it.
_held: dict[str, Lease] = {}
_held_for: dict[str, weakref.ref] = {}


def _lease_key(fs, work: str) -> str:
    return fs.unstrip_protocol(work)


def _abandoned_here(holder) -> bool:
    """A lease of this process that no live plan of it holds (an earlier run that failed and could
    not release it): ours to take over, where another process would wait for it to lapse."""
    if holder.host != socket.gethostname() or holder.pid != os.getpid():
        return False
    return all(lease.holder.token != holder.token for lease in _held.values())


def _take_output(storage: Storage, output: str, work_dir: str) -> Lease:
    """The output's lease, renewed in the background until released; the first write of a job,
    so an output we may not write fails here, before any work."""
    fs, work = storage.filesystem(work_dir)
    key = _lease_key(fs, work)
    owner = _held_for.get(key)
    if key in _held and (owner is None or owner() is None):  # an earlier plan, dropped unfinished
        _held_for.pop(key, None)
        release_lease(_held.pop(key))
    try:
        lease = acquire(fs, work, LEASE_TTL_SECONDS, abandoned=_abandoned_here)
    except LeaseHeld as err:
        raise LeaseHeld(str(err).replace(work, output, 1)) from None
    except Exception as err:  # noqa: BLE001 - s3fs's OSErrors, and botocore's own (NoCredentialsError, ...)
        raise storage_error(err, output, "cannot write the output") from err
    _held[key] = lease.keep_alive()
    return lease


def release_lease(lease: Lease, remove_file: bool = False) -> None:
    try:
        lease.release()
        if remove_file and lease.holder.released:  # released: it was still ours
            remove(lease.fs, lease.path)
    except Exception:  # noqa: BLE001 - an unreachable store: the lease lapses by itself
        pass


def release_output(plan: JobPlan) -> None:
    """Hands back the output's lease this process took when planning (no-op if it holds none),
    after finalize or when a run gives up, so the next run need not wait for it to lapse. Its file
    goes too: a finished output holds just the documented layout."""
    fs, work = plan.work_fs()
    key = _lease_key(fs, work)
    lease = _held.get(key)
    if lease is not None and plan.lease.get("token") == lease.holder.token:
        del _held[key]
        _held_for.pop(key, None)
        release_lease(lease, remove_file=True)


@contextlib.contextmanager
def releasing_output(plan: JobPlan):
    """Releases the plan's lease when the block ends, however it ends."""
    try:
        yield plan
    finally:
        release_output(plan)


def check_lease(plan: JobPlan) -> None:
    """Raises LeaseLost when the plan's lease lapsed and another run took the output over."""
    if plan.lease:
        fs, work = plan.work_fs()
        check_held(fs, work, plan.lease["generation"], plan.lease["token"])


def _check_may_finalize(plan: JobPlan) -> None:
    """Finalizing needs the plan's lease, or (finalizing a finished job again, as a worker that
    loaded the plan may) an output that no run holds and that is still this job's."""
    try:
        check_lease(plan)
    except LeaseLost:
        fs, work = plan.work_fs()
        if current_holder(fs, work) is not None or _read_job_file(fs, work).get("job_key") != plan.job_key:
            raise


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _refuse_input_inside_output(inputs: list[str], output: str, work_dir: str, storage: Storage) -> None:
    """--overwrite clears the output folder: an input inside it would be deleted before it is read.
    An output inside a directory input would be read as input by the next run."""
    def where(uri: str) -> str:
        fs, path = storage.filesystem(uri)
        if protocol_of(fs.unstrip_protocol(path)) in LOCAL_PROTOCOLS:
            return os.path.realpath(path)
        return fs.unstrip_protocol(path)

    targets = {where(output), where(work_dir)}
    for given in inputs:
        path = where(given.split("*", 1)[0].rstrip("/") or given)
        if any(_inside(path, t) for t in targets):
            raise InputError(f"--input {given} lies inside --output {output}: the job would read its own results "
                             "(and --overwrite would delete its input); write the output elsewhere")
        fs, listed = storage.filesystem(given)
        if not is_glob(given) and fs.isdir(listed) and lists_under(path, where(output)):
            raise InputError(f"--output {output} lies inside --input {given}: the next run would read this job's "
                             "results as its input; write the output elsewhere (or under a folder starting with '_')")


def _changed(old: dict, new: dict) -> list[str]:
    words = {"input": "the input", "model": "the model", "settings": "the settings",
             "shard_rows": "--shard-rows", "output_format": "the output format"}
    return [words.get(k, k) for k in new if old.get(k) != new.get(k)] or ["the job"]


def plan_job(spec: JobSpec) -> JobPlan:
    """Scan the inputs, cut them into shards, check ids, and claim (or resume) the output.

    Raises InputError for duplicate ids, missing inputs, or an output that holds another job's
    results while ``spec.overwrite`` is false. Nothing is written before all checks pass.
    """
    if int(spec.shard_rows) < 1:
        raise InputError(f"--shard-rows must be a positive integer, got {spec.shard_rows}")
    inputs = [spec.inputs] if isinstance(spec.inputs, str) else list(spec.inputs)
    output_format, work_dir = output_layout(spec.output)
    _refuse_input_inside_output(inputs, spec.output, work_dir, spec.storage)
    lease = _take_output(spec.storage, spec.output, work_dir)
    try:
        return _plan_under_lease(spec, inputs, output_format, work_dir, lease)
    except BaseException:
        _give_up_output(spec.storage, work_dir, lease)
        raise


def _give_up_output(storage: Storage, work_dir: str, lease: Lease) -> None:
    """Planning failed: release the lease, and leave no trace of it."""
    fs, work = storage.filesystem(work_dir)
    if _held.get(_lease_key(fs, work)) is lease:
        del _held[_lease_key(fs, work)]
        _held_for.pop(_lease_key(fs, work), None)
    release_lease(lease, remove_file=True)
    try:
        if protocol_of(fs.unstrip_protocol(work)) in LOCAL_PROTOCOLS and not list_names(fs, work):
            os.rmdir(work)  # the lease made it: a refused job leaves no output behind
    except OSError:
        pass


def _plan_under_lease(spec: JobSpec, inputs: list[str], output_format: str, work_dir: str, lease: Lease) -> JobPlan:
    files = expand_inputs(inputs, spec.storage)
    builder, ids, types = _ShardBuilder(int(spec.shard_rows)), _IdCounter(), PassthroughTypes()
    for index, file in enumerate(files):
        scan = _scan_parquet if file.format == "parquet" else _scan_jsonl
        with input_errors(file):
            scan(file, index, spec.storage, builder, ids, types)
    duplicates = ids.duplicates()
    if duplicates:
        raise _duplicate_error(duplicates)
    del ids
    shards = builder.finish()
    identity = {
        "input": _digest([[f.uri, f.size, f.version] for f in files]),
        "model": (spec.model_fingerprint or {}).get("content_hash"),
        "settings": spec.settings or {},
        "shard_rows": int(spec.shard_rows),
        "output_format": output_format,
    }
    plan = JobPlan(
        job_key=_digest(identity)[:32],
        identity=identity,
        inputs=inputs,
        output=spec.output,
        output_format=output_format,
        work_dir=work_dir,
        storage=spec.storage,
        files=[f.to_dict() for f in files],
        shards=shards,
        total_rows=sum(s["rows"] for s in shards),
        model=dict(spec.model_fingerprint or {}),
        settings=dict(spec.settings or {}),
        shard_rows=int(spec.shard_rows),
        passthrough_schema=encode_schema(types.schema()),
        already_committed=[],
        planned_at=_now(),
        lease={"generation": lease.generation, "token": lease.holder.token},
        error_output=spec.error_output,
    )
    _held_for[_lease_key(*plan.work_fs())] = weakref.ref(plan)
    _claim_output(plan, spec.overwrite)
    plan.already_committed = committed_shards(plan)
    return plan


def _claim_output(plan: JobPlan, overwrite: bool) -> None:
    """Resume our own job, refuse another job's output, or (with overwrite) clear it."""
    fs, work = plan.work_fs()
    names = [n for n in list_names(fs, work) if not is_lease_file(n)]
    foreign = [n for n in names if not _is_ours(n) and not n.startswith(".")]
    if foreign:
        raise InputError(
            f"{plan.work_dir} holds files ossbatch did not write ({', '.join(foreign[:3])}); "
            "choose an empty or new --output"
        )
    previous = _read_job_file(fs, work) if JOB_FILE in names else None
    if previous and previous.get("job_key") == plan.job_key:
        if overwrite:  # whatever state the output is in, --overwrite leaves it this job's
            _drop_foreign_markers(plan, fs, work)
        return
    batch_fs, batch_path = plan.storage.filesystem(plan.output)
    batch_file_exists = plan.output_format == "batch_jsonl" and exists(batch_fs, batch_path)
    if names or batch_file_exists:
        if not overwrite:
            changed = _changed(previous.get("identity", {}), plan.identity) if previous else ["the job"]
            raise InputError(
                f"{plan.output} already holds results of a different job ({', '.join(changed)} changed); "
                "pass --overwrite to replace them, or choose another --output"
            )
        # _job.json goes first: until the new one is written, a re-run knows this is not a resume.
        for name in (JOB_FILE, *sorted(n for n in names if n != JOB_FILE and _is_ours(n))):
            remove(fs, join(work, name), recursive=True)
        if batch_file_exists:
            remove(batch_fs, batch_path)
    # The plan without its storage (credentials stay out of the output); load_plan takes it again.
    write_json_atomic(fs, join(work, JOB_FILE), {
        "version": PLAN_VERSION, "job_key": plan.job_key, "identity": plan.identity, "plan": plan.to_dict(),
    })


def _read_job_file(fs, work: str) -> dict:
    """_job.json, or {} when it cannot be read (cut short by an old version, edited by hand)."""
    try:
        previous = read_json(fs, join(work, JOB_FILE))
    except ValueError:
        return {}
    return previous if isinstance(previous, dict) else {}


def _drop_foreign_markers(plan: JobPlan, fs, work: str) -> None:
    """Markers (and their parts) another job left in our output: redone by this run."""
    for index in committed_shards(plan):
        path = _marker_path(work, index)
        try:
            marker = read_json(fs, path)
        except ValueError:
            marker = {}
        if marker.get("job_key") != plan.job_key:
            remove(fs, path)
            remove(fs, join(work, PART_NAME.format(index)))


def load_plan(output: str, storage: Storage = LOCAL) -> JobPlan:
    """The plan stored by plan_job in the output, for workers that did not plan."""
    _, work_dir = output_layout(output)
    fs, work = storage.filesystem(work_dir)
    stored = read_json(fs, join(work, JOB_FILE))["plan"]
    stored.pop("storage_options", None)  # written by versions that blanked it instead of leaving it out
    return JobPlan.from_dict(stored, storage)


def read_shard(plan: JobPlan, shard_index: int) -> list[dict]:
    """The normalized, validated requests of one shard, in input order."""
    ranges = plan.shards[shard_index]["ranges"]
    return list(read_ranges(plan.input_files(), ranges, plan.storage, model_names(plan)))


def model_names(plan: JobPlan) -> frozenset[str] | None:
    """The names a Batch line's ``model`` may give (None for a plan without a model, as in tests)."""
    if not plan.model.get("path") and not plan.model.get("config"):
        return None
    return served_names(plan.model.get("path"), plan.model.get("config"), plan.settings.get("served_model_name"))


def _marker_path(work: str, shard_index: int) -> str:
    return join(work, MARKER_DIR, MARKER_NAME.format(shard_index))


def committed_shards(plan: JobPlan) -> list[int]:
    """Shards whose marker exists."""
    fs, work = plan.work_fs()
    found = (_MARKER_RE.fullmatch(n) for n in list_names(fs, join(work, MARKER_DIR)))
    return sorted(int(m.group(1)) for m in found if m and int(m.group(1)) < plan.num_shards)


def pending_shards(plan: JobPlan) -> list[int]:
    """Shards without a marker: never run, killed mid-way, or failed."""
    committed = set(committed_shards(plan))
    return [i for i in range(plan.num_shards) if i not in committed]


def check_results(results: list[dict], expected_rows: int, shard_index: int) -> None:
    """One result per request (a line's n choices counted once), each id once, known statuses:
    a shard is committed whole or not at all."""
    try:
        lines = count_lines(results)
    except ValueError as err:
        raise ValueError(f"shard {shard_index}: {err}") from None
    if lines != expected_rows:
        answered = f" (answering {lines} input rows, a line's choices counted once)" if lines != len(results) else ""
        raise ValueError(f"shard {shard_index}: {len(results)} results for {expected_rows} requests{answered}")
    seen: set[str] = set()
    for r in results:
        rid = r.get("id")
        if not isinstance(rid, str) or not rid:
            raise ValueError(f"shard {shard_index}: a result has no id: {str(r)[:200]}")
        if rid in seen:
            raise ValueError(f"shard {shard_index}: id {rid!r} appears twice in the results")
        seen.add(rid)
        if r.get("status") not in STATUSES:
            raise ValueError(f"shard {shard_index}: id {rid!r} has status {r.get('status')!r}; expected one of {STATUSES}")


def commit_shard(plan: JobPlan, shard_index: int, results: list[dict], stats: dict, worker: str | None = None,
                 seconds: float = 0.0) -> dict:
    """Write one shard's rows, then its marker; returns the marker.

    The part file appears atomically under its final, deterministic name; the marker is written
    only after it, so a crash in between leaves an orphan part that the re-run overwrites. A shard
    that already has a marker is left as it is (the first commit wins) and its marker returned.
    """
    fs, work = plan.work_fs()
    marker_path = _marker_path(work, shard_index)
    check_lease(plan)  # a run that lost its output to another run must not write into it
    if exists(fs, marker_path):
        return read_json(fs, marker_path)
    check_results(results, plan.shards[shard_index]["rows"], shard_index)
    part = PART_NAME.format(shard_index)
    write_parquet_atomic(fs, join(work, part), results_table(results, plan.arrow_passthrough_schema()))
    summary = shard_summary(results)
    stats = stats or {}
    marker = {
        "shard": shard_index,
        "job_key": plan.job_key,
        "part": part,
        "rows": len(results),
        "statuses": summary["statuses"],
        "tokens": {
            **summary["tokens"],
            "padded_prompt_slots": int(stats.get("padded_prompt_slots") or 0),
            "decode_slots": int(stats.get("decode_slots") or 0),
            "prompt_computed": int(stats.get("prompt_computed") or 0),
            "kv_bytes_saved": int(stats.get("kv_bytes_saved") or 0),
        },
        "batches": int(stats.get("batches") or 0),
        "engine_seconds": float(stats.get("engine_seconds") or 0.0),
        "seconds": float(seconds),
        "worker": worker or default_worker(),
        "committed_at": _now(),
    }
    write_json_atomic(fs, marker_path, marker)
    return marker


def _read_markers(plan: JobPlan) -> dict[int, dict]:
    fs, work = plan.work_fs()
    markers = {}
    for i in committed_shards(plan):
        marker = read_json(fs, _marker_path(work, i))
        if marker.get("job_key") != plan.job_key:
            raise InputError(f"{_marker_path(work, i)} belongs to another job; re-run with --overwrite")
        markers[i] = marker
    return markers


def finalize_job(plan: JobPlan, wall_seconds: float) -> dict:
    """Aggregate the shard markers into _manifest.json (and write the Batch output file, if any).

    ``wall_seconds`` is this run's wall time; tokens/s counts the shards this run committed.
    A job that was already finished when planned returns its existing manifest untouched.
    """
    if set(plan.already_committed) == set(range(plan.num_shards)):
        # Every shard was done before this run planned: the job is finished, keep its record.
        finished = read_manifest(plan.output, plan.storage)
        if finished and finished.get("job_key") == plan.job_key:
            release_output(plan)
            return finished
    _check_may_finalize(plan)
    markers = _read_markers(plan)
    missing = [i for i in range(plan.num_shards) if i not in markers]
    if missing:
        raise RuntimeError(f"cannot finalize {plan.output}: shards {missing[:20]} are not committed yet")
    fs, work = plan.work_fs()
    ordered = [markers[i] for i in range(plan.num_shards)]
    parts = [m["part"] for m in ordered]
    if not ordered:  # no rows: still one (empty) part with the full schema, so OUTPUT/*.parquet reads
        parts = [PART_NAME.format(0)]
        write_parquet_atomic(fs, join(work, parts[0]), results_table([], plan.arrow_passthrough_schema()))
    rows = {"total": sum(m["rows"] for m in ordered), **{s: sum(m["statuses"][s] for m in ordered) for s in STATUSES}}
    tokens = {k: sum(m["tokens"].get(k, 0) for m in ordered) for k in TOKEN_KEYS}  # .get: shards committed before a key existed
    this_run = [m for m in ordered if m["shard"] not in set(plan.already_committed)]
    engine_seconds = sum(m["engine_seconds"] for m in ordered)
    batch_file = _write_batch_file(plan, ordered) if plan.output_format == "batch_jsonl" else None
    _remove_stale_temps(fs, work)
    manifest = {
        "format": "ossbatch.manifest/1",
        "job_key": plan.job_key,
        "created_at": _now(),
        "input": {
            "uris": plan.inputs,
            "rows": plan.total_rows,
            "fingerprint": plan.identity["input"],
            "files": [{k: f[k] for k in ("uri", "format", "size", "rows", "version")} for f in plan.files],
        },
        "output": {
            "uri": plan.output,
            "format": plan.output_format,
            "work_dir": plan.work_dir,
            "parts": parts,
            **({"batch_file": batch_file} if batch_file else {}),
        },
        "model": plan.model,
        "settings": plan.settings,
        "shard_rows": plan.shard_rows,
        "rows": rows,
        "tokens": tokens,
        "batches": sum(m["batches"] for m in ordered),
        "shards": [{"shard": m["shard"], "rows": m["rows"], "tokens": m["tokens"], "seconds": m["seconds"],
                    "worker": m["worker"], "committed_at": m["committed_at"]} for m in ordered],
        "wall_seconds": float(wall_seconds),
        "engine_seconds": engine_seconds,
        "shard_seconds": sum(m["seconds"] for m in ordered),
        "tokens_per_second": _rate(sum(m["tokens"]["completion"] for m in this_run), wall_seconds),
        "engine_tokens_per_second": _rate(tokens["completion"], engine_seconds),
        "resumed_shards": len(ordered) - len(this_run),
    }
    jsonschema.Draft202012Validator(load_schema("manifest.schema.json")).validate(manifest)
    write_json_atomic(fs, join(work, MANIFEST_FILE), manifest)
    release_output(plan)
    return manifest


def _remove_stale_temps(fs, work: str) -> None:
    """Temporary files of writers killed mid-write (local stores only; object stores leave none)."""
    for directory in (work, join(work, MARKER_DIR), join(work, DATA_DIR)):
        for name in list_names(fs, directory):
            if name.startswith(".") and ".tmp-" in name:
                remove(fs, join(directory, name))


def _rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 3) if seconds and seconds > 0 else 0.0


def batch_error_output(plan: JobPlan) -> str:
    return plan.error_output or error_output_of(plan.output)


def _write_batch_file(plan: JobPlan, markers: list[dict]) -> dict:
    """The Batch output file and its error file; returns their line counts for the manifest."""
    fs, work = plan.work_fs()
    default_model = (plan.settings.get("served_model_name") or plan.model.get("name")
                     or os.path.basename(str(plan.model.get("path") or "")) or "gpt-oss")

    def rows():
        for marker in markers:
            created = int(datetime.fromisoformat(marker["committed_at"]).timestamp())
            for row in iter_part_rows(fs, join(work, marker["part"])):
                yield row, created

    errors = batch_error_output(plan)
    succeeded, failed = write_batch_output(plan.output, plan.storage, rows(), model=default_model, job_key=plan.job_key,
                                           error_uri=errors, defaults=plan.settings)
    return {"lines": succeeded, "error_lines": failed, "error_uri": errors if failed else None}


def manifest_path(fs, work: str) -> str | None:
    """Where the manifest of the job in ``work`` is (_manifest.json, or an older output's
    manifest.json); None before the job is finished."""
    return next((join(work, name) for name in (MANIFEST_FILE, LEGACY_MANIFEST_FILE) if exists(fs, join(work, name))),
                None)


def read_manifest(output: str, storage: Storage = LOCAL) -> dict | None:
    _, work_dir = output_layout(output)
    fs, work = storage.filesystem(work_dir)
    path = manifest_path(fs, work)
    return read_json(fs, path) if path else None
