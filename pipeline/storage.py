"""Where the pipeline's bytes live: fsspec filesystems, input discovery and atomic writes.

Everything goes through fsspec (s3fs for ``s3://``) because pyarrow's native S3 filesystem
ignores ``AWS_ENDPOINT_URL``; s3 credentials, region and endpoint come from the standard
``AWS_*`` variables, and ``--storage-options`` adds whatever else a filesystem needs. Those options
travel inside one `Storage` object, the only thing that opens a filesystem; they may hold secrets,
so the object never shows them (repr, JSON, Prefect parameters) and no output file records them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import tempfile
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from pydantic import BaseModel, ConfigDict, Field, Secret, model_validator

PARQUET_SUFFIXES = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
LOCAL_PROTOCOLS = {"file", "local"}
# Filesystems whose storage options would only confuse them (s3 keys handed to the local fs).
OPTIONLESS_PROTOCOLS = LOCAL_PROTOCOLS | {"memory"}
# Writers of these stores keep an uncommitted upload invisible until commit() (multipart upload).
DEFERRED_COMMIT_PROTOCOLS = {"s3", "s3a"}
# Files this small are fingerprinted by content, so re-writing identical data still resumes.
HASH_CONTENT_BELOW_BYTES = 32 << 20


class InputError(ValueError):
    """The job cannot start or go on for a reason the user can fix (bad inputs, an output that
    belongs to a different job or another run, a store that refuses us): one line, exit 2."""


class StorageError(InputError):
    """A store refused or lost a read or write: no space, no permission, no bucket, no endpoint."""


# What to do about an OSError, by errno; the message names the path first.
_ERRNO_ADVICE = {
    errno.ENOSPC: "no space left on the device; free some and re-run the same command (committed shards are kept)",
    errno.EDQUOT: "disk quota exceeded; free some and re-run the same command (committed shards are kept)",
    errno.EROFS: "the file system is read-only; choose a writable --output",
    errno.EACCES: "permission denied; choose an --output you can write, or fix its permissions",
    errno.EPERM: "permission denied; choose an --output you can write, or fix its permissions",
}


def storage_error(err: BaseException, path: str, doing: str) -> StorageError:
    """One sentence for an error of a store, naming ``path`` and what to do."""
    text = str(err)
    code = getattr(err, "errno", None)
    if code in _ERRNO_ADVICE:
        return StorageError(f"{doing} {path}: {_ERRNO_ADVICE[code]}")
    bucket = path.split("://", 1)[-1].split("/", 1)[0]
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return StorageError(f"{doing} {path}: the bucket {bucket!r} does not exist; create it or fix --output")
    if isinstance(err, PermissionError) or any(
            word in text for word in ("AccessDenied", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")):
        return StorageError(f"{doing} {path}: access denied ({_first_line(text)}); check the credentials "
                            "(AWS_* variables or --storage-options) and the bucket's policy")
    return StorageError(f"{doing} {path}: {_first_line(text) or type(err).__name__}")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def protocol_of(uri: str) -> str:
    protocol = uri.split("://", 1)[0] if "://" in uri else "file"
    return "file" if protocol == "local" else protocol


class Storage(BaseModel):
    """Where a job's bytes live: the fsspec options (``--storage-options``) that reach its stores.

    Options may be flat (``{"anon": true}``, handed to every remote filesystem) or keyed by
    protocol (``{"s3": {...}, "gs": {...}}``) when inputs and output live in different stores.
    They are a pydantic ``Secret``: a Prefect parameter or a log shows ``**********``.
    """

    model_config = ConfigDict(frozen=True)

    secret_options: Secret[dict[str, Any]] = Field(default_factory=lambda: Secret({}))

    @model_validator(mode="before")
    @classmethod
    def _plain_options(cls, value):
        # A flow's parameters (prefect.yaml) give the options themselves: storage: {s3: {...}}.
        if isinstance(value, dict) and set(value) != {"secret_options"}:
            return {"secret_options": value}
        return value

    @classmethod
    def from_options(cls, storage_options: dict | None) -> Storage:
        if storage_options is not None and not isinstance(storage_options, dict):
            raise InputError(f"--storage-options must be a JSON object, got {type(storage_options).__name__}")
        return cls(secret_options=dict(storage_options or {}))

    @classmethod
    def from_flag(cls, text: str | None) -> Storage:
        """``--storage-options JSON`` (no flag: no options)."""
        if not text:
            return cls()
        try:
            storage_options = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"--storage-options is not valid JSON: {err}") from None
        if not isinstance(storage_options, dict):
            raise InputError("--storage-options must be a JSON object")
        return cls.from_options(storage_options)

    @property
    def options(self) -> dict:
        return self.secret_options.get_secret_value()

    def options_for(self, uri: str) -> dict:
        """The options that apply to ``uri`` (see the class docstring)."""
        options = self.options
        protocol = protocol_of(uri)
        nested = options.get(protocol)
        if isinstance(nested, dict):
            return dict(nested)
        if protocol in OPTIONLESS_PROTOCOLS:
            return {}
        return {k: v for k, v in options.items() if not isinstance(v, dict) or k not in fsspec.available_protocols()}

    def filesystem(self, uri: str):
        """(fs, path-within-fs) for a URI or local path."""
        return url_to_fs(uri, **self.options_for(uri))

    def exists(self, uri: str) -> bool:
        return exists(*self.filesystem(uri))

    def open(self, uri: str, mode: str = "rb", **kwargs):
        fs, path = self.filesystem(uri)
        return fs.open(path, mode, **kwargs)

    def atomic_open(self, uri: str, mode: str = "wb"):
        return atomic_open(*self.filesystem(uri), mode)

    def read_json(self, uri: str):
        return read_json(*self.filesystem(uri))

    def write_json(self, uri: str, obj) -> None:
        write_json_atomic(*self.filesystem(uri), obj)


LOCAL = Storage()  # no options: local paths, memory://, and s3 configured by AWS_* variables


def join(base: str, *names: str) -> str:
    return posixpath.join(base.rstrip("/"), *names)


def full_uri(fs, path: str) -> str:
    """A path as a URI that names its filesystem; local paths stay plain absolute paths."""
    if protocol_of(fs.unstrip_protocol(path)) in LOCAL_PROTOCOLS:
        return path
    return fs.unstrip_protocol(path)


def input_format(path: str) -> str | None:
    name = path.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def compression_of(path: str) -> str | None:
    return "gzip" if path.lower().endswith(".gz") else None


@dataclass
class InputFile:
    uri: str
    format: str  # "parquet" | "jsonl"
    size: int
    version: str  # etag / mtime / content hash: what makes a re-written file a different input
    label: str = ""  # short name used in synthetic ids and messages
    rows: int = 0  # filled in by the planner

    def to_dict(self) -> dict:
        return asdict(self)


def is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def _listed(fs, path: str) -> list[tuple[str, dict]]:
    """(path, info) of the files under ``path`` (a file, a directory, or a glob), in a stable order."""
    if is_glob(path):
        found = fs.glob(path, detail=True)
        return sorted(((p, i) for p, i in found.items() if i.get("type") == "file"), key=lambda item: item[0])
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return []
    if info.get("type") != "directory":
        return [(path, info)]
    # A directory means its data files, not the _SUCCESS / .crc / _temporary / .ipynb_checkpoints
    # litter other tools leave: any path component under it starting with "_" or "." is hidden
    # (Spark's and Hadoop's convention).
    found = fs.find(path, detail=True)
    root = path.rstrip("/") + "/"
    return sorted(
        ((p, i) for p, i in found.items() if input_format(p) and not _hidden(p[len(root):] if p.startswith(root) else p)),
        key=lambda item: item[0],
    )


def _hidden(relative: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative.split("/") if part)


def lists_under(directory: str, path: str) -> bool:
    """Whether a directory input would read files under ``path``: it lies inside the directory,
    under no hidden ("_" or ".") component."""
    root = directory.rstrip("/") + "/"
    return path.startswith(root) and not _hidden(path[len(root):])


def version_tag(info: dict) -> str:
    """The cheapest stable identity a store reports for an object's content."""
    for key in ("ETag", "etag", "md5Hash", "crc32c", "content_md5"):
        if info.get(key):
            return f"{key}:{str(info[key]).strip(chr(34))}"
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        if info.get(key) is not None:
            return f"{key}:{info[key]}"
    return ""


def content_hash(fs, path: str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def expand_inputs(inputs: list[str] | str, storage: Storage = LOCAL) -> list[InputFile]:
    """Every input file named by paths, URIs, directories or globs, each once, in order."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise InputError("no inputs given")
    files: list[InputFile] = []
    seen: set[str] = set()
    for spec in inputs:
        fs, path = storage.filesystem(spec)
        fs.invalidate_cache()
        listed = _listed(fs, path)
        if not listed:
            raise InputError(f"no input files match {spec}")
        for p, info in listed:
            uri = full_uri(fs, p)
            if uri in seen:
                continue
            seen.add(uri)
            fmt = input_format(p)
            if fmt is None:
                raise InputError(
                    f"{uri}: unknown input format; expected one of {', '.join(PARQUET_SUFFIXES + JSONL_SUFFIXES)}"
                )
            size = int(info.get("size") or 0)
            if fmt == "parquet" and size <= HASH_CONTENT_BELOW_BYTES:
                version = content_hash(fs, p)
            else:
                # JSONL is hashed anyway while planning streams it; see plan_job.
                version = version_tag(info)
            files.append(InputFile(uri=uri, format=fmt, size=size, version=version))
    _assign_labels(files)
    return files


def _assign_labels(files: list[InputFile]) -> None:
    """Basenames, unless two inputs share one; then paths relative to their common folder."""
    names = [posixpath.basename(f.uri.split("://", 1)[-1]) for f in files]
    if len(set(names)) == len(names):
        for f, name in zip(files, names):
            f.label = name
        return
    paths = [f.uri.split("://", 1)[-1] for f in files]
    root = posixpath.commonpath(paths) if len(paths) > 1 else posixpath.dirname(paths[0])
    for f, path in zip(files, paths):
        f.label = posixpath.relpath(path, root)


@contextlib.contextmanager
def atomic_open(fs, path: str, mode: str = "wb"):
    """Write ``path`` so that readers see either nothing or the whole file.

    Local: a temporary sibling, fsynced, then ``os.replace``. S3: a multipart upload with
    ``autocommit=False`` that is completed on success and aborted on error (s3fs's plain
    ``with fs.open(..., "wb")`` commits the partial object even when the block raises).
    Other stores: spooled to a local temporary file, then uploaded in one call, which the
    object stores (GCS, Azure, memory) make visible only once complete.
    """
    protocol = protocol_of(fs.unstrip_protocol(path))
    text = "b" not in mode
    if protocol in LOCAL_PROTOCOLS:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        temp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
        try:
            with open(temp, mode, **({"encoding": "utf-8", "newline": ""} if text else {})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, path)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.remove(temp)
            if isinstance(err, OSError) and err.errno in _ERRNO_ADVICE:
                raise storage_error(err, path, "cannot write") from err
            raise
        return
    if protocol in DEFERRED_COMMIT_PROTOCOLS:
        raw = fs.open(path, "wb", autocommit=False)
        try:
            if text:
                wrapper = _TextWriter(raw)
                yield wrapper
                wrapper.flush()
            else:
                yield raw
            raw.close()
            raw.commit()
        except BaseException:
            raw.discard()
            raw.closed = True  # so close()/__del__ never uploads what was written
            raise
        return
    with tempfile.NamedTemporaryFile(prefix="ossbatch-") as spool:
        if text:
            wrapper = _TextWriter(spool)
            yield wrapper
            wrapper.flush()
        else:
            yield spool
        spool.flush()
        fs.put_file(spool.name, path)


class _TextWriter:
    """Text on top of a binary writer without closing it (io.TextIOWrapper closes on GC)."""

    def __init__(self, raw):
        self._raw = raw

    def write(self, text: str) -> int:
        self._raw.write(text.encode("utf-8"))
        return len(text)

    def flush(self):
        pass


def write_bytes_atomic(fs, path: str, data: bytes) -> None:
    with atomic_open(fs, path, "wb") as f:
        f.write(data)


def write_json_atomic(fs, path: str, obj) -> None:
    # Strict JSON: a NaN would make the file unreadable to most JSON parsers (allow_nan=False raises).
    write_bytes_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n").encode())


def read_json(fs, path: str):
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def exists(fs, path: str) -> bool:
    fs.invalidate_cache(path)
    return fs.exists(path)


def list_names(fs, directory: str) -> list[str]:
    """Basenames of the files directly in ``directory``; empty when it does not exist."""
    fs.invalidate_cache(directory)
    try:
        entries = fs.ls(directory, detail=False)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)


def remove(fs, path: str, recursive: bool = False) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=recursive)
    fs.invalidate_cache(path)
