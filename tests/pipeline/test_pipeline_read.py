"""Reading inputs through fsspec: local files, globs, gzip, Parquet by ranges, s3:// and memory://."""

import gzip
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fakes import jsonl_bytes, prompt_rows, write_jsonl

from ossbatch.pipeline.read import iter_records, read_requests
from ossbatch.pipeline.storage import InputError, Storage, expand_inputs


def ids(requests):
    return [r["id"] for r in requests]


def test_jsonl_and_gzip_read_the_same_requests(tmp_path):
    rows = prompt_rows(5)
    plain = write_jsonl(tmp_path / "a.jsonl", rows)
    packed = write_jsonl(tmp_path / "b.jsonl.gz", rows, gz=True)
    assert list(read_requests(plain)) == list(read_requests(packed))
    first = next(read_requests(plain))
    assert first == {
        "id": "r00000", "messages": [{"role": "user", "content": "question number 0"}], "instructions": None,
        "reasoning_effort": None, "max_tokens": None, "temperature": None, "top_p": None, "seed": None,
        "max_reasoning_tokens": None, "schema": None, "stop": None, "logit_bias": None, "presence_penalty": None,
        "frequency_penalty": None, "request_kind": "row", "passthrough": {"meta": 0},
        "error": None, "tools": None, "tool_choice": None,
        "logprobs": None, "top_logprobs": None,
    }


def test_blank_lines_are_skipped_but_counted_in_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one"}, "", "   ", {"prompt": "two"}, "{oops"])
    requests = list(read_requests(path))
    assert ids(requests) == ["in.jsonl:1", "in.jsonl:4", "in.jsonl:5"]
    assert requests[2]["error"].startswith(f"{path} line 5: not valid JSON")


def test_parquet_is_read_by_ranges_across_row_groups(tmp_path):
    table = pa.table({"id": [f"p{i}" for i in range(100)], "prompt": [f"q{i}" for i in range(100)],
                      "score": [float(i) for i in range(100)]})
    path = tmp_path / "in.parquet"
    pq.write_table(table, path, row_group_size=7)
    (file,) = expand_inputs(str(path))
    got = list(iter_records(file, 20, 45))
    assert [n for n, _ in got] == list(range(21, 46))  # row numbers count from 1
    assert [r["id"] for _, r in got] == [f"p{i}" for i in range(20, 45)]
    assert next(read_requests(str(path)))["passthrough"] == {"score": 0.0}


def test_globs_directories_and_uris_expand_in_order(tmp_path):
    for name in ("b.jsonl", "a.jsonl"):
        write_jsonl(tmp_path / name, prompt_rows(2, prefix=name[0]))
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "notes.txt").write_text("not an input")
    by_glob = [f.uri for f in expand_inputs(str(tmp_path / "*.jsonl"))]
    assert by_glob == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    assert [f.uri for f in expand_inputs(str(tmp_path))] == by_glob
    assert [f.uri for f in expand_inputs(f"file://{tmp_path}/a.jsonl")] == by_glob[:1]
    assert ids(read_requests([str(tmp_path / "*.jsonl")])) == ["a00000", "a00001", "b00000", "b00001"]


def test_missing_inputs_and_unknown_formats_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="no input files match"):
        expand_inputs(str(tmp_path / "nothing-*.jsonl"))
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(InputError, match="unknown input format"):
        expand_inputs(str(tmp_path / "data.csv"))


def test_same_basename_in_two_folders_gets_distinct_labels(tmp_path):
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        write_jsonl(tmp_path / folder / "part.jsonl", [{"prompt": "no id"}])
    assert ids(read_requests(str(tmp_path / "*" / "part.jsonl"))) == ["x/part.jsonl:1", "y/part.jsonl:1"]


def test_memory_filesystem():
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/ossbatch-read/in.jsonl", jsonl_bytes(prompt_rows(3)))
    assert ids(read_requests("memory://ossbatch-read/in.jsonl")) == ["r00000", "r00001", "r00002"]
    fs.rm("/ossbatch-read", recursive=True)


def test_s3_parts_by_glob(s3):
    s3.put("in/part-0.jsonl", jsonl_bytes(prompt_rows(3)))
    s3.put("in/part-1.jsonl.gz", gzip.compress(jsonl_bytes(prompt_rows(2, start=3))))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": ["q0", "q1"], "prompt": ["x", "y"]}), sink)
    s3.put("in/part-2.parquet", sink.getvalue().to_pybytes())
    files = expand_inputs(s3.uri("in/part-*"))
    assert [f.uri for f in files] == [s3.uri(f"in/{n}") for n in ("part-0.jsonl", "part-1.jsonl.gz", "part-2.parquet")]
    assert all(f.version for f in files)
    assert ids(read_requests(s3.uri("in/part-*"))) == ["r00000", "r00001", "r00002", "r00003", "r00004", "q0", "q1"]


def test_storage_options():
    assert Storage.from_flag('{"anon": false}').options == {"anon": False}
    assert Storage.from_flag(None).options == {}
    with pytest.raises(InputError, match="not valid JSON"):
        Storage.from_flag("{anon")
    nested = Storage.from_options({"s3": {"anon": True}, "gs": {"token": "x"}})
    assert nested.options_for("s3://b/k") == {"anon": True}
    assert nested.options_for("gs://b/k") == {"token": "x"}
    # Flat options go to remote stores only; the local filesystem would choke on s3 keys.
    assert Storage.from_options({"anon": True}).options_for("s3://b/k") == {"anon": True}
    assert Storage.from_options({"anon": True}).options_for("/tmp/x.jsonl") == {}


def test_jsonl_record_that_is_not_an_object(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [json.dumps([1, 2])])
    (request,) = read_requests(path)
    assert request["error"] == f"{path} line 1: expected a JSON object, got list"
