"""Two `ossbatch run`s on one output at once (locally and on S3): one holds the output's lease, the
other exits 2 naming the holder, or finds a finished job; either way the output ends as exactly one
job's, every id once. Also: what --overwrite can and cannot take over."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fakes import prompt_rows, write_jsonl

from ossbatch.flows.cli import main
from ossbatch.pipeline.job import load_plan
from ossbatch.pipeline.lease import is_lease_file
from ossbatch.pipeline.storage import LOCAL, list_names

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ROWS = 60
VARIANTS = {
    "same": (["--max-tokens", "8"], ["--max-tokens", "8"]),
    "different": (["--max-tokens", "8"], ["--max-tokens", "4"]),
    "overwrite": (["--max-tokens", "8"], ["--max-tokens", "4", "--overwrite"]),
}


def _race(model, source, output, first, second, tmp_path):
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for extra in (first, second):
        args = ["run", "--model", str(model), "--input", source, "--output", output, "--orchestrator", "none",
                "--quiet", "--shard-rows", "5", *extra]
        procs.append(subprocess.Popen([sys.executable, str(HERE / "race_worker.py"), str(go), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    time.sleep(4)  # both imported and waiting on the go file (under load, give them time)
    go.write_text("go")
    return [(p.wait(timeout=240), p.stderr.read()) for p in procs]


def _rows(fs, work: str) -> list[dict]:
    tables = []
    for name in list_names(fs, f"{work}/data"):
        if name.endswith(".parquet"):
            with fs.open(f"{work}/data/{name}", "rb") as f:
                tables.append(pq.read_table(f))
    return pa.concat_tables(tables).to_pylist()


def _assert_one_jobs_output(output: str):
    fs, work = LOCAL.filesystem(output)
    job_file = json.loads(fs.cat_file(f"{work}/_job.json"))
    manifest = json.loads(fs.cat_file(f"{work}/_manifest.json"))
    assert manifest["job_key"] == job_file["job_key"]
    markers = [json.loads(fs.cat_file(f"{work}/_shards/{n}")) for n in list_names(fs, f"{work}/_shards")]
    assert len(markers) == ROWS // 5 and {m["job_key"] for m in markers} == {job_file["job_key"]}
    rows = _rows(fs, work)
    assert sorted(r["id"] for r in rows) == [f"r{i:05d}" for i in range(ROWS)]  # every id once
    assert not [n for n in list_names(fs, work) if is_lease_file(n)]  # the winner released and removed its lease
    return job_file, manifest


@pytest.mark.parametrize("store", ["local", "s3"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_runs_racing_for_one_output_leave_it_one_jobs(variant, store, tiny_model_dir, tmp_path, request):
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(ROWS))
    output = request.getfixturevalue("s3").uri("out") if store == "s3" else str(tmp_path / "out")
    first, second = VARIANTS[variant]
    (code_a, err_a), (code_b, err_b) = _race(tiny_model_dir, source, output, first, second, tmp_path)
    assert sorted([code_a, code_b]) in ([0, 0], [0, 2]), (err_a, err_b)
    for code, err in ((code_a, err_a), (code_b, err_b)):
        if code == 2:  # one line, naming the holder, or (came second) the finished other job
            line = err.strip().splitlines()[-1]
            assert "Traceback" not in err
            assert ("is in use by another run" in line and " pid " in line and "started" in line
                    and "lease" in line) or "already holds results of a different job" in line, err
    _, manifest = _assert_one_jobs_output(output)
    if variant == "same":
        assert code_a == 0 or code_b == 0
    if variant == "different" and code_a == 0 and code_b == 2 and "in use" not in err_b:
        assert manifest["settings"]["max_tokens"] == 8


def test_a_held_output_is_refused_naming_its_holder_even_with_overwrite(tmp_path, capsys, tiny_model_dir):
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(3))
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen(["sleep", "120"])  # a live process of this host holds the output
    now = time.time()
    (out / "_lease-000001.json").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": other.pid, "started_at": now, "expires_at": now + 120, "token": "t"}))
    try:
        code = main(["run", "--model", str(tiny_model_dir), "--input", source, "--output", str(out),
                     "--orchestrator", "none", "--quiet", "--overwrite", "--max-tokens", "2"])
    finally:
        other.kill()
        other.wait()
    err = capsys.readouterr().err
    assert code == 2
    assert f"pid {other.pid}" in err and "in use by another run" in err and "to take over" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(out)) == ["_lease-000001.json"]  # nothing else written
    # Its process gone (killed: it could not release), the output is free at once on this host.
    assert main(["run", "--model", str(tiny_model_dir), "--input", source, "--output", str(out),
                 "--orchestrator", "none", "--quiet", "--overwrite", "--max-tokens", "2"]) == 0


def test_overwrite_recovers_an_output_tangled_by_two_jobs(tmp_path):
    """What two unleased runs left (issue 12): _job.json of one job, markers of another. --overwrite
    recovers it; without it, the refusal's advice (--overwrite) works."""
    from pipeline_fakes import FakeEngine

    from ossbatch.pipeline.driver import run_job
    from ossbatch.pipeline.job import JobSpec
    from ossbatch.pipeline.storage import InputError

    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(20))
    out = tmp_path / "out"

    def spec(max_tokens, **kw):
        return JobSpec(inputs=source, output=str(out), shard_rows=5, settings={"max_tokens": max_tokens}, **kw)

    run_job(spec(4), FakeEngine())
    markers = {p.name: p.read_text() for p in (out / "_shards").iterdir()}
    run_job(spec(32, overwrite=True), FakeEngine())
    for name, text in markers.items():  # the tangle: job 32's _job.json, job 4's markers
        (out / "_shards" / name).write_text(text)
    (out / "_manifest.json").unlink()
    with pytest.raises(InputError, match="belongs to another job; re-run with --overwrite"):
        run_job(spec(32), FakeEngine())
    engine = FakeEngine()
    manifest = run_job(spec(32, overwrite=True), engine)
    assert len(engine.ids_seen) == 20  # every shard of the other job redone
    assert manifest["settings"] == {"max_tokens": 32}
    assert {json.loads(p.read_text())["job_key"] for p in (out / "_shards").iterdir()} == {manifest["job_key"]}
    assert load_plan(str(out)).job_key == manifest["job_key"]


def test_a_run_whose_lease_was_taken_over_stops_before_its_next_commit(tmp_path):
    """A run stalled past its lease's expiry while another took the output over: it must not write."""
    from pipeline_fakes import FakeEngine

    from ossbatch.pipeline.driver import run_job
    from ossbatch.pipeline.job import JobSpec
    from ossbatch.pipeline.lease import LeaseLost, lease_name

    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(15))
    out = tmp_path / "out"
    engine = FakeEngine()

    def infer_and_lose_the_lease(requests):
        if len(engine.shards_seen) == 1:  # shard 1: meanwhile, another run takes the next lease
            (current,) = [n for n in os.listdir(out) if is_lease_file(n)]
            generation = int(current[len("_lease-"):-len(".json")]) + 1
            (out / lease_name(generation)).write_text(json.dumps(
                {"host": "elsewhere", "pid": 1, "started_at": time.time(), "expires_at": time.time() + 60,
                 "token": "theirs"}))
        return engine(requests)

    with pytest.raises(LeaseLost, match="another run took the output over"):
        run_job(JobSpec(inputs=source, output=str(out), shard_rows=5), infer_and_lose_the_lease)
    assert sorted(os.listdir(out / "_shards")) == ["shard-00000.json"]
    assert not (out / "data" / "part-00001.parquet").exists()
