"""Sharding and the commit layer: exactly-once shards, resume, refusal of a changed job, S3 safety."""

import json

import jsonschema
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pipeline_fakes import FakeEngine, jsonl_bytes, prompt_rows, write_jsonl

from ossbatch.pipeline import job as job_module
from ossbatch.pipeline import write as write_module
from ossbatch.pipeline.driver import run_job
from ossbatch.pipeline.inspect import format_manifest
from ossbatch.pipeline.job import (
    JobPlan, JobSpec, commit_shard, finalize_job, load_plan, pending_shards, plan_job, read_shard,
)
from ossbatch.pipeline.storage import LOCAL, Storage, atomic_open
from ossbatch.pipeline.validate import InputError, load_schema

MODEL = {"path": "/models/gpt-oss-20b", "content_hash": "sha256:model-a", "config": {"num_hidden_layers": 24}}


def spec(inputs, output, **kw):
    return JobSpec(inputs=inputs, output=str(output), shard_rows=kw.pop("shard_rows", 10), model_fingerprint=MODEL,
                   settings=kw.pop("settings", {"temperature": 1.0}), **kw)


def output_dataset(output: str) -> ds.Dataset:
    # OUTPUT/data holds nothing but the parts: the folder is the dataset.
    fs, path = LOCAL.filesystem(output)
    return ds.dataset(path + "/data", filesystem=fs, format="parquet")


def output_ids(output: str) -> list[str]:
    return output_dataset(output).to_table(columns=["id"]).column("id").to_pylist()


def test_shards_commit_once_and_a_rerun_skips_committed_ones(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(25))
    out = tmp_path / "out"
    crashing = FakeEngine(crash_after=1)
    with pytest.raises(RuntimeError, match="engine crashed"):
        run_job(spec(inputs, out), crashing)
    plan = plan_job(spec(inputs, out))
    assert plan.num_shards == 3 and pending_shards(plan) == [1, 2] and plan.already_committed == [0]
    del plan  # that run ends unfinished: its lease is free for the next one

    resumed = FakeEngine()
    manifest = run_job(spec(inputs, out), resumed)
    assert crashing.ids_seen == [f"r{i:05d}" for i in range(10)]
    assert resumed.ids_seen == [f"r{i:05d}" for i in range(10, 25)]  # shard 0 was not recomputed
    assert sorted(output_ids(str(out))) == [f"r{i:05d}" for i in range(25)]
    assert manifest["rows"]["total"] == 25 and manifest["resumed_shards"] == 1

    again = FakeEngine()
    assert run_job(spec(inputs, out), again) == manifest  # a finished job is not redone
    assert again.ids_seen == []


def test_duplicate_ids_stop_the_job_before_any_work(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", prompt_rows(3) + [{"id": "twice", "prompt": "x"}])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "twice", "prompt": "y"}, {"id": "r00001", "prompt": "z"}])
    engine = FakeEngine()
    with pytest.raises(InputError) as caught:
        run_job(spec(str(tmp_path / "*.jsonl"), tmp_path / "out"), engine)
    assert "duplicate ids" in str(caught.value)
    assert "'twice' (2 rows)" in str(caught.value) and "'r00001' (2 rows)" in str(caught.value)
    assert engine.ids_seen == [] and not (tmp_path / "out").exists()


def test_duplicate_ids_in_parquet_are_found_from_the_id_column(tmp_path):
    pq.write_table(pa.table({"id": [1, 2, 3, 2], "prompt": ["a", "b", "c", "d"]}), tmp_path / "in.parquet")
    with pytest.raises(InputError, match=r"'2' \(2 rows\)"):
        plan_job(spec(str(tmp_path / "in.parquet"), tmp_path / "out"))


def test_changed_input_model_or_settings_is_refused_without_overwrite(tmp_path):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, prompt_rows(25))
    out = tmp_path / "out"
    run_job(spec(str(path), out), FakeEngine())

    changed_model = spec(str(path), out)
    changed_model.model_fingerprint = {**MODEL, "content_hash": "sha256:model-b"}
    with pytest.raises(InputError, match="the model changed"):
        plan_job(changed_model)
    with pytest.raises(InputError, match="the settings changed"):
        plan_job(spec(str(path), out, settings={"temperature": 0.5}))

    write_jsonl(path, prompt_rows(5, prefix="new"))
    engine = FakeEngine()
    with pytest.raises(InputError, match=r"the input changed.*--overwrite"):
        run_job(spec(str(path), out), engine)
    assert engine.ids_seen == []
    assert sorted(output_ids(str(out)))[:1] == ["r00000"]  # the old results are untouched

    manifest = run_job(spec(str(path), out, overwrite=True), engine)
    assert sorted(output_ids(str(out))) == [f"new{i:05d}" for i in range(5)]
    assert manifest["output"]["parts"] == ["data/part-00000.parquet"]
    assert sorted(p.name for p in out.iterdir()) == ["_job.json", "_manifest.json", "_shards", "data"]
    assert sorted(p.name for p in (out / "data").iterdir()) == ["part-00000.parquet"]


def test_overwrite_does_not_throw_away_progress_of_the_same_job(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(25))
    with pytest.raises(RuntimeError):
        run_job(spec(inputs, tmp_path / "out", overwrite=True), FakeEngine(crash_after=2))
    resumed = FakeEngine()
    run_job(spec(inputs, tmp_path / "out", overwrite=True), resumed)
    assert resumed.ids_seen == [f"r{i:05d}" for i in range(20, 25)]


def test_a_rewritten_but_identical_jsonl_still_resumes(tmp_path):
    path = tmp_path / "in.jsonl"
    write_jsonl(path, prompt_rows(25))
    with pytest.raises(RuntimeError):
        run_job(spec(str(path), tmp_path / "out"), FakeEngine(crash_after=1))
    write_jsonl(path, prompt_rows(25))  # new mtime, same content
    assert pending_shards(plan_job(spec(str(path), tmp_path / "out"))) == [1, 2]


def test_part_written_without_marker_is_redone_and_not_duplicated(tmp_path, monkeypatch):
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(25))
    out = tmp_path / "out"
    plan = plan_job(spec(inputs, out))
    real_write_json = job_module.write_json_atomic

    def die_before_marker(fs, path, obj):
        if "_shards/shard-00001" in path:
            raise KeyboardInterrupt("killed between the part and its marker")
        real_write_json(fs, path, obj)

    monkeypatch.setattr(job_module, "write_json_atomic", die_before_marker)
    engine = FakeEngine()
    with pytest.raises(KeyboardInterrupt):
        for shard in pending_shards(plan):
            commit_shard(plan, shard, *engine(read_shard(plan, shard)), worker="w1", seconds=1.0)
    assert (out / "data" / "part-00001.parquet").exists() and pending_shards(plan) == [1, 2]
    monkeypatch.setattr(job_module, "write_json_atomic", real_write_json)
    del plan  # the killed run: its lease is free for the re-run

    rerun = FakeEngine()
    manifest = run_job(spec(inputs, out), rerun)
    assert rerun.shards_seen[0][0] == "r00010"
    ids = output_ids(str(out))
    assert len(ids) == len(set(ids)) == 25
    assert manifest["output"]["parts"] == ["data/part-00000.parquet", "data/part-00001.parquet", "data/part-00002.parquet"]


def test_commit_checks_results_and_keeps_the_first_commit(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(4))
    plan = plan_job(spec(inputs, tmp_path / "out"))
    results, stats = FakeEngine()(read_shard(plan, 0))
    with pytest.raises(ValueError, match="3 results for 4 requests"):
        commit_shard(plan, 0, results[:3], stats)
    with pytest.raises(ValueError, match="appears twice"):
        commit_shard(plan, 0, results[:3] + results[:1], stats)
    with pytest.raises(ValueError, match="status 'done'"):
        commit_shard(plan, 0, results[:3] + [{**results[3], "status": "done"}], stats)
    assert pending_shards(plan) == [0] and not (tmp_path / "out" / "data" / "part-00000.parquet").exists()
    first = commit_shard(plan, 0, results, stats, worker="first", seconds=2.0)
    second = commit_shard(plan, 0, results, stats, worker="second", seconds=3.0)
    assert first == second and second["worker"] == "first"


def test_atomic_open_leaves_nothing_when_the_writer_fails(tmp_path):
    fs, path = LOCAL.filesystem(str(tmp_path / "file.bin"))
    with pytest.raises(RuntimeError):
        with atomic_open(fs, path) as f:
            f.write(b"half")
            raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []


def test_manifest_counts_statuses_tokens_and_shards(tmp_path):
    rows = prompt_rows(12) + [{"id": "short", "prompt": "a b", "max_tokens": 2}, {"id": "bad", "prompt": "x", "top_p": 5}]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    manifest = run_job(spec(inputs, tmp_path / "out", shard_rows=5), FakeEngine(), worker="gpu-0")
    jsonschema.validate(manifest, load_schema("manifest.schema.json"))
    assert manifest["rows"] == {"total": 14, "ok": 12, "length": 1, "error": 1}
    assert manifest["tokens"] == {
        "prompt": 12 * 3 + 2, "reasoning": 13 * 3, "output": 13 * 4, "completion": 13 * 7,
        "padded_prompt_slots": 12 * 3 + 2 + 14, "decode_slots": 14 * 8,
        "cached_prompt": 0, "prompt_computed": 0, "kv_bytes_saved": 0,  # the fake engine shares nothing
    }
    assert manifest["batches"] == 3
    assert [(s["shard"], s["rows"], s["worker"]) for s in manifest["shards"]] == [(0, 5, "gpu-0"), (1, 5, "gpu-0"), (2, 4, "gpu-0")]
    assert manifest["model"] == MODEL and manifest["settings"] == {"temperature": 1.0}
    assert manifest["input"]["rows"] == 14 and manifest["input"]["files"][0]["version"].startswith("sha256:")
    on_disk = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert on_disk == manifest

    text = format_manifest(str(tmp_path / "out"))
    assert "14 total: 12 ok (85.7%), 1 length (7.1%), 1 error (7.1%)" in text
    assert "+36.8% over the prompt tokens" in text  # 14 padded slots over 38 prompt tokens
    assert "bad" in text and "top_p: must be a number in (0, 1], got 5" in text


def test_inspect_reports_an_unfinished_job(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(25))
    with pytest.raises(RuntimeError):
        run_job(spec(inputs, tmp_path / "out"), FakeEngine(crash_after=2))
    text = format_manifest(str(tmp_path / "out"))
    assert "in progress, 2 of 3 shards (20 of 25 rows) committed" in text
    assert "no ossbatch job here" in format_manifest(str(tmp_path / "elsewhere"))


def test_output_schema_is_the_same_in_every_shard(tmp_path):
    rows = [{"id": "a", "prompt": "x", "score": 1, "tags": ["t"], "mixed": 1},
            {"id": "b", "prompt": "x", "score": None, "mixed": "one"},
            {"id": "c", "prompt": "x", "score": 2.5, "status": "from input"}]
    inputs = write_jsonl(tmp_path / "in.jsonl", rows)
    run_job(spec(inputs, tmp_path / "out", shard_rows=1), FakeEngine())
    schemas = {pq.read_schema(p).remove_metadata() for p in sorted((tmp_path / "out" / "data").glob("part-*.parquet"))}
    assert len(schemas) == 1
    (schema,) = schemas
    assert schema.field("prompt_tokens").type == pa.int64()
    assert schema.field("output_token_ids").type == pa.list_(pa.int32())
    assert schema.field("output_logprobs").type == pa.list_(pa.float32())
    assert schema.field("score").type == pa.float64()
    assert schema.field("input_status").type == pa.string()  # renamed: "status" is ours
    table = output_dataset(str(tmp_path / "out")).to_table()
    by_id = {r["id"]: r for r in table.to_pylist()}
    # Values that disagree in type (or nest) pass through as JSON text.
    assert (by_id["a"]["tags"], by_id["a"]["mixed"], by_id["b"]["mixed"]) == ('["t"]', "1", '"one"')
    assert by_id["c"]["input_status"] == "from input" and by_id["b"]["score"] is None
    validator = jsonschema.Draft202012Validator(load_schema("output.schema.json"))
    for row in by_id.values():
        validator.validate(row)


def test_parquet_passthrough_keeps_its_arrow_types(tmp_path):
    table = pa.table({
        "id": ["a", "b"], "prompt": ["x", "y"],
        "when": pa.array([1_700_000_000_000, None], type=pa.timestamp("ms", tz="UTC")),
        "labels": pa.array([["p", "q"], []], type=pa.list_(pa.string())),
    })
    pq.write_table(table, tmp_path / "in.parquet")
    run_job(spec(str(tmp_path / "in.parquet"), tmp_path / "out"), FakeEngine())
    out = pq.read_table(tmp_path / "out" / "data" / "part-00000.parquet")
    assert out.schema.field("when").type == pa.timestamp("ms", tz="UTC")
    assert out.column("labels").to_pylist() == [["p", "q"], []]


def test_foreign_files_in_the_output_are_never_touched(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(2))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.csv").write_text("keep me")
    with pytest.raises(InputError, match="did not write"):
        plan_job(spec(inputs, tmp_path / "out", overwrite=True))
    assert (tmp_path / "out" / "precious.csv").read_text() == "keep me"


def test_plan_round_trips_as_json_for_workers_elsewhere(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(25))
    plan = plan_job(spec(inputs, tmp_path / "out"))
    copy = JobPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert read_shard(copy, 2) == read_shard(plan, 2)
    assert load_plan(str(tmp_path / "out")).shards == plan.shards
    with pytest.raises(RuntimeError, match="not committed"):
        finalize_job(copy, 1.0)


def test_gzip_and_parquet_inputs_shard_across_file_boundaries(tmp_path):
    write_jsonl(tmp_path / "a.jsonl.gz", prompt_rows(7, prefix="g"), gz=True)
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(9)], "prompt": ["x"] * 9}), tmp_path / "b.parquet", row_group_size=4)
    write_jsonl(tmp_path / "c.jsonl", prompt_rows(6, prefix="j"))
    plan = plan_job(spec([str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.parquet"), str(tmp_path / "c.jsonl")],
                         tmp_path / "out", shard_rows=5))
    assert [s["rows"] for s in plan.shards] == [5, 5, 5, 5, 2]
    shards = [[r["id"] for r in read_shard(plan, i)] for i in range(plan.num_shards)]
    expected = [f"g{i:05d}" for i in range(7)] + [f"p{i}" for i in range(9)] + [f"j{i:05d}" for i in range(6)]
    assert [i for shard in shards for i in shard] == expected
    assert plan.shards[3]["ranges"][-1]["offset"] is not None  # plain JSONL seeks to its shard


# --- S3 (moto's server on loopback, reached through AWS_ENDPOINT_URL only) ---


def test_job_on_s3_commits_once_and_resumes(s3):
    s3.put("in/part-0.jsonl", jsonl_bytes(prompt_rows(12)))
    s3.put("in/part-1.jsonl", jsonl_bytes(prompt_rows(13, start=12)))
    job = spec(s3.uri("in/*.jsonl"), s3.uri("out"))
    crashing = FakeEngine(crash_after=2)
    with pytest.raises(RuntimeError):
        run_job(job, crashing)
    assert pending_shards(plan_job(job)) == [2]
    resumed = FakeEngine()
    manifest = run_job(job, resumed)
    assert resumed.ids_seen == [f"r{i:05d}" for i in range(20, 25)]
    assert sorted(output_ids(s3.uri("out"))) == [f"r{i:05d}" for i in range(25)]
    assert manifest["rows"]["total"] == 25 and manifest["resumed_shards"] == 2
    assert json.loads(s3.fs.cat(f"{s3.bucket}/out/_manifest.json")) == manifest
    assert "25 total: 25 ok" in format_manifest(s3.uri("out"))

    s3.put("in/part-1.jsonl", jsonl_bytes(prompt_rows(3, start=12)))
    with pytest.raises(InputError, match="--overwrite"):
        plan_job(job)
    job.overwrite = True
    run_job(job, FakeEngine())
    assert sorted(output_ids(s3.uri("out"))) == [f"r{i:05d}" for i in range(15)]
    assert sorted(s3.fs.ls(f"{s3.bucket}/out/_shards", detail=False)) == [
        f"{s3.bucket}/out/_shards/shard-0000{i}.json" for i in range(2)]


def test_s3_failure_mid_write_leaves_no_committed_shard(s3, monkeypatch):
    s3.put("in.jsonl", jsonl_bytes(prompt_rows(8)))
    plan = plan_job(spec(s3.uri("in.jsonl"), s3.uri("out"), shard_rows=4))
    real_write = write_module.write_parquet

    def write_half_then_fail(table, sink):
        sink.write(b"PAR1" + b"\0" * 1024)  # the part's first bytes are already on their way
        raise OSError("connection reset mid-upload")

    monkeypatch.setattr(write_module, "write_parquet", write_half_then_fail)
    results, stats = FakeEngine()(read_shard(plan, 0))
    with pytest.raises(OSError, match="connection reset"):
        commit_shard(plan, 0, results, stats)
    s3.fs.invalidate_cache()
    assert not s3.fs.exists(f"{s3.bucket}/out/data/part-00000.parquet")
    assert not s3.fs.exists(f"{s3.bucket}/out/_shards/shard-00000.json")
    assert pending_shards(plan) == [0, 1]
    # No multipart upload is left open either: it was aborted, not abandoned.
    assert s3.fs.call_s3("list_multipart_uploads", Bucket=s3.bucket).get("Uploads", []) == []

    monkeypatch.setattr(write_module, "write_parquet", real_write)
    commit_shard(plan, 0, results, stats)
    assert pending_shards(plan) == [1]
    assert pq.read_table(s3.fs.open(f"{s3.bucket}/out/data/part-00000.parquet", "rb")).num_rows == 4



def test_gzip_shards_read_in_order_decompress_the_file_once(tmp_path, monkeypatch):
    from ossbatch.pipeline import read as read_module

    inputs = write_jsonl(tmp_path / "in.jsonl.gz", prompt_rows(25), gz=True)
    plan = plan_job(spec(inputs, tmp_path / "out"))
    opened = []
    real_open = read_module.open_input
    monkeypatch.setattr(read_module, "open_input", lambda *a: opened.append(1) or real_open(*a))
    in_order = [[r["id"] for r in read_shard(plan, i)] for i in range(3)]
    assert len(opened) == 1
    assert [i for shard in in_order for i in shard] == [f"r{i:05d}" for i in range(25)]
    assert [r["id"] for r in read_shard(plan, 1)] == in_order[1]  # going back reopens the stream
    assert len(opened) == 2


def test_empty_input_makes_an_empty_job(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", [])
    manifest = run_job(spec(inputs, tmp_path / "out.jsonl"), FakeEngine())
    assert manifest["rows"]["total"] == 0 and manifest["shards"] == []
    assert (tmp_path / "out.jsonl").read_text() == ""


def test_storage_options_are_not_written_into_the_output(tmp_path):
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(3))
    secret = {"s3": {"secret": "hunter2"}}
    plan = plan_job(spec(inputs, tmp_path / "out", storage=Storage.from_options(secret)))
    assert plan.storage.options == secret
    assert "hunter2" not in (tmp_path / "out" / "_job.json").read_text()
    assert load_plan(str(tmp_path / "out"), Storage.from_options(secret)).storage.options == secret


def test_job_on_the_memory_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe_file("/ossbatch-job/in.jsonl", jsonl_bytes(prompt_rows(12)))
    manifest = run_job(spec("memory://ossbatch-job/in.jsonl", "memory://ossbatch-job/out.jsonl"), FakeEngine())
    lines = fs.cat_file("/ossbatch-job/out.jsonl").decode().splitlines()
    assert manifest["rows"]["total"] == 12 and len(lines) == 12
    assert sorted(fs.ls("/ossbatch-job/out.jsonl.parts", detail=False)) == [
        "/ossbatch-job/out.jsonl.parts/_job.json", "/ossbatch-job/out.jsonl.parts/_manifest.json",
        "/ossbatch-job/out.jsonl.parts/_shards", "/ossbatch-job/out.jsonl.parts/data"]
    fs.rm("/ossbatch-job", recursive=True)
