"""The shard driver: read ahead, infer, commit; and one job's settings feeding it."""

import threading

import pytest
from pipeline_fakes import FakeEngine, prompt_rows, write_jsonl

from ossbatch.pipeline import driver as driver_module
from ossbatch.pipeline.driver import run_job, run_shard, run_shards
from ossbatch.pipeline.job import JobSpec, finalize_job, pending_shards, plan_job
from ossbatch.pipeline.storage import StorageError

MODEL = {"path": "/models/gpt-oss-20b", "content_hash": "sha256:model-a", "config": {"num_hidden_layers": 24}}


def spec(inputs, output, **kw):
    return JobSpec(inputs=inputs, output=str(output), shard_rows=kw.pop("shard_rows", 10), model_fingerprint=MODEL,
                   settings=kw.pop("settings", {"temperature": 1.0}), **kw)


def test_a_shard_read_ahead_that_fails_surfaces_in_its_turn_after_the_shard_before_commits(tmp_path, monkeypatch):
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(25))
    out = tmp_path / "out"
    real_read = driver_module.read_shard

    def read_failing_on_shard_1(plan, shard_index):
        if shard_index == 1:
            raise OSError("storage went away while reading shard 1")
        return real_read(plan, shard_index)

    monkeypatch.setattr(driver_module, "read_shard", read_failing_on_shard_1)
    engine = FakeEngine()
    # A store's OSError becomes one line naming the shard, the output and the cause (exit 2 from the CLI).
    with pytest.raises(StorageError, match=r"reading shard 1 for .*out: storage went away while reading shard 1"):
        run_job(spec(inputs, out), engine)
    # Shard 1 was read (and failed) while shard 0 ran; shard 0 still committed, nothing after it ran.
    assert engine.ids_seen == [f"r{i:05d}" for i in range(10)]
    assert pending_shards(plan_job(spec(inputs, out))) == [1, 2]


def test_a_shard_at_a_time_through_the_same_driver_gives_the_same_output(tmp_path):
    # What a Prefect task or a Ray actor does: one shard per call, any order, then finalize.
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(25))
    plan = plan_job(spec(inputs, tmp_path / "by-shard"))
    engine = FakeEngine()
    markers = [run_shard(plan, i, engine, worker="actor-1") for i in reversed(pending_shards(plan))]
    assert [m["shard"] for m in markers] == [2, 1, 0] and {m["worker"] for m in markers} == {"actor-1"}
    by_shard = finalize_job(plan, 1.0)
    whole = run_job(spec(inputs, tmp_path / "whole"), FakeEngine())
    assert by_shard["rows"] == whole["rows"] and by_shard["tokens"] == whole["tokens"]
    assert sorted(engine.ids_seen) == [f"r{i:05d}" for i in range(25)]


def test_the_driver_reads_the_next_shard_while_the_engine_runs(tmp_path, monkeypatch):
    inputs = write_jsonl(tmp_path / "in.jsonl", prompt_rows(30))
    plan = plan_job(spec(inputs, tmp_path / "out"))
    reading = {i: threading.Event() for i in range(3)}
    real_read = driver_module.read_shard

    def read(plan, shard_index):
        reading[shard_index].set()
        return real_read(plan, shard_index)

    def infer(requests):
        shard = int(requests[0]["id"][1:]) // 10
        if shard + 1 < 3:  # without read-ahead the next read starts only after this returns: the wait times out
            assert reading[shard + 1].wait(timeout=30), f"shard {shard + 1} was not read while shard {shard} ran"
        return FakeEngine()(requests)

    monkeypatch.setattr(driver_module, "read_shard", read)
    committed = []
    run_shards(plan, [0, 1, 2], infer, on_commit=lambda marker, seconds: committed.append(marker["shard"]))
    assert committed == [0, 1, 2] and pending_shards(plan) == []
