"""Stream input records out of JSONL (plain or gzip) and Parquet files, a range at a time.

Nothing here holds more than one Parquet batch or one JSONL block: the planner walks whole
inputs through these iterators, and a shard reads just its own ranges.
A range is a dict ``{"file": i, "start": a, "stop": b, "offset": o, "line": n}``: records
``[a, b)`` of input file ``i`` counted from 0 (blank JSONL lines are not records); ``offset`` is the
byte where record ``a`` starts in an uncompressed JSONL file (None otherwise) and ``line`` its line
(JSONL) or row (Parquet) number counted from 1.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
import zlib
from collections.abc import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ossbatch.pipeline.batch_api import expand_choices
from ossbatch.pipeline.storage import LOCAL, InputError, InputFile, Storage, compression_of, expand_inputs
from ossbatch.pipeline.validate import MAX_NESTING, error_request, normalize

READ_BLOCK_BYTES = 1 << 20
# s3fs reads ahead 50 MB by default; a shard is usually much smaller than that.
REMOTE_BLOCK_BYTES = 8 << 20
PARQUET_BATCH_ROWS = 8192


class BadLine:
    """A JSONL line that is not a JSON object; becomes an error request, not an exception."""

    __slots__ = ("message",)

    def __init__(self, message: str):
        self.message = message


def iter_jsonl_lines(f, *, offset: int = 0, first_line: int = 1, digest=None) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, bytes) of each non-blank line of an open binary file.

    ``offset``/``first_line`` say where ``f`` is positioned (for a shard that seeked there);
    ``digest`` (a hashlib object) sees every byte read, so planning fingerprints as it scans.
    """
    line_no, position, pending = first_line, offset, b""
    while True:
        block = f.read(READ_BLOCK_BYTES)
        if not block:
            break
        if digest is not None:
            digest.update(block)
        pieces = (pending + block).split(b"\n")
        pending = pieces.pop()
        for piece in pieces:
            if piece.strip():
                yield line_no, position, piece
            line_no += 1
            position += len(piece) + 1
    if pending.strip():
        yield line_no, position, pending


def parse_jsonl_line(raw: bytes, where: str) -> dict | BadLine:
    try:
        record = json.loads(raw)
    except UnicodeDecodeError:
        return BadLine(f"{where}: not valid UTF-8")
    except json.JSONDecodeError as err:
        return BadLine(f"{where}: not valid JSON ({err.msg} at column {err.colno})")
    except RecursionError:
        return BadLine(f"{where}: nested more than {MAX_NESTING} levels deep")
    if not isinstance(record, dict):
        return BadLine(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


@contextlib.contextmanager
def input_errors(file: InputFile):
    """A damaged input file as one line naming it (a truncated .gz or Parquet, a .gz that is not gzip)."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise InputError(f"{file.uri}: not a complete gzip file ({err}); re-compress it, or leave it out of "
                         "--input") from None
    except pa.ArrowException as err:
        if file.format != "parquet":
            raise
        raise InputError(f"{file.uri}: not a readable Parquet file ({str(err).strip()[:200]}); it may be "
                         "truncated: write it again, or leave it out of --input") from None


def open_input(file: InputFile, storage: Storage):
    return storage.open(file.uri, "rb", compression=compression_of(file.uri), block_size=REMOTE_BLOCK_BYTES)


def iter_records(file: InputFile, start: int = 0, stop: int | None = None, *, offset: int | None = None,
                 line: int | None = None, storage: Storage = LOCAL,
                 columns: list[str] | None = None, resume_stream: bool = False) -> Iterator[tuple[int, dict | BadLine]]:
    """(line or row number, record) for records ``[start, stop)`` of one input file.

    ``resume_stream``: a gzip file cannot seek, so continue the stream the previous call on this
    thread left open when it stopped at or before ``start`` (shards read in order decompress the
    file once, not once per shard). Only for callers that drain the iterator before the next call.
    """
    with input_errors(file):
        if file.format == "parquet":
            yield from _iter_parquet(file, start, stop, storage, columns)
        elif compression_of(file.uri) and resume_stream:
            yield from _iter_compressed(file, start, stop, storage)
        else:
            yield from _iter_jsonl(file, start, stop, offset, line, storage)


def _iter_jsonl(file, start, stop, offset, line, storage):
    with open_input(file, storage) as f:
        if offset:
            f.seek(offset)
            lines = iter_jsonl_lines(f, offset=offset, first_line=line or 1)
            ordinal = start
        else:
            lines = iter_jsonl_lines(f)
            ordinal = 0  # gzip cannot seek: walk from the top and skip
        for line_no, _, raw in lines:
            if stop is not None and ordinal >= stop:
                return
            if ordinal >= start:
                yield line_no, parse_jsonl_line(raw, f"{file.uri} line {line_no}")
            ordinal += 1


class _Stream:
    """An open compressed input and how far into it the last reader got."""

    def __init__(self, key, f):
        self.key, self.f, self.lines, self.next_ordinal = key, f, iter_jsonl_lines(f), 0

    def close(self):
        self.f.close()


_streams = threading.local()


def _iter_compressed(file, start, stop, storage):
    key = (file.uri, file.version)
    stream = getattr(_streams, "current", None)
    if stream is None or stream.key != key or stream.next_ordinal > start:
        if stream is not None:
            stream.close()
        stream = _streams.current = _Stream(key, open_input(file, storage))
    while stop is None or stream.next_ordinal < stop:
        item = next(stream.lines, None)
        if item is None:
            stream.close()
            _streams.current = None
            return
        line_no, _, raw = item
        ordinal, stream.next_ordinal = stream.next_ordinal, stream.next_ordinal + 1
        if ordinal >= start:
            yield line_no, parse_jsonl_line(raw, f"{file.uri} line {line_no}")
    if file.rows and stream.next_ordinal >= file.rows:  # the planner counted the rows: nothing is left
        stream.close()
        _streams.current = None


@contextlib.contextmanager
def parquet_file(file: InputFile, storage: Storage) -> Iterator[pq.ParquetFile]:
    with storage.open(file.uri, "rb", block_size=REMOTE_BLOCK_BYTES) as f:
        yield pq.ParquetFile(f)


def _iter_parquet(file, start, stop, storage, columns):
    with parquet_file(file, storage) as reader:
        yield from _iter_parquet_rows(reader, start, stop, columns)


def _iter_parquet_rows(reader: pq.ParquetFile, start, stop, columns):
    meta = reader.metadata
    stop = meta.num_rows if stop is None else min(stop, meta.num_rows)
    groups, first_row, row = [], None, 0
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if row + n > start and row < stop:
            groups.append(g)
            first_row = row if first_row is None else first_row
        row += n
    if not groups:
        return
    if columns is not None:
        columns = [c for c in columns if c in reader.schema_arrow.names]
    row = first_row
    for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=columns):
        lo, hi = max(start - row, 0), min(stop - row, batch.num_rows)
        if lo < hi:
            for i, record in enumerate(batch.slice(lo, hi - lo).to_pylist()):
                yield row + lo + i + 1, record
        row += batch.num_rows
        if row >= stop:
            break


def where_of(file: InputFile, number: int) -> str:
    return f"{file.uri} {'row' if file.format == 'parquet' else 'line'} {number}"


def requests_from(file: InputFile, records: Iterable[tuple[int, dict | BadLine]],
                  models: frozenset[str] | None = None) -> Iterator[dict]:
    """Normalized requests; ids of rows that have none are "label:line". A Batch line with
    ``n`` choices gives n requests (see batch_api.expand_choices); one asking for a model not
    in ``models`` (the job's names) fails."""
    for number, record in records:
        fallback = f"{file.label}:{number}"
        if isinstance(record, BadLine):
            yield error_request(fallback, record.message)
        else:
            yield from expand_choices(record, normalize(record, fallback_id=fallback, where=where_of(file, number),
                                                        models=models))


def read_ranges(files: list[InputFile], ranges: list[dict], storage: Storage = LOCAL,
                models: frozenset[str] | None = None) -> Iterator[dict]:
    """Requests of the given ranges; drain it before the next call (see ``resume_stream``)."""
    for r in ranges:
        file = files[r["file"]]
        records = iter_records(file, r["start"], r["stop"], offset=r.get("offset"), line=r.get("line"),
                               storage=storage, resume_stream=True)
        yield from requests_from(file, records, models)


def read_requests(inputs: list[str] | str, storage: Storage = LOCAL) -> Iterator[dict]:
    """Every request of the inputs, in order, streamed (no duplicate check: that is plan_job's)."""
    for file in expand_inputs(inputs, storage):
        yield from requests_from(file, iter_records(file, storage=storage))
