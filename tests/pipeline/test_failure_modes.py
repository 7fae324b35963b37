"""What `ossbatch run` does when its inputs, its output or its store misbehave: one line and exit 2
(never a traceback), and nothing committed is lost. Issue 12, items 4 and 6."""

import errno
import gzip
import json
import os
import threading
import urllib.request

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_fakes import FakeEngine, jsonl_bytes, prompt_rows, write_jsonl

from ossbatch.flows.cli import main
from ossbatch.pipeline import driver, infer, write
from ossbatch.pipeline.storage import LOCAL, expand_inputs, write_json_atomic
from ossbatch.pipeline.write import RESULT_FIELDS


@pytest.fixture
def fake_engine(monkeypatch):
    """`ossbatch run` with the fake engine: these tests are about files and stores, not tokens."""
    engines = []

    def make(job):
        engines.append(FakeEngine())
        return engines[-1]

    monkeypatch.setattr(infer, "ShardInferencer", make)
    return engines


def run(model, source, output, *extra):
    return main(["run", "--model", str(model), "--input", str(source), "--output", str(output),
                 "--orchestrator", "none", "--quiet", "--shard-rows", "5", *extra])


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def parquet_ids(folder) -> list[str]:
    return sorted(i for p in sorted((folder / "data").glob("*.parquet")) for i in pq.read_table(p).column("id").to_pylist())


# --- inputs and outputs that surprise (item 4) ---

def test_a_directory_input_skips_every_hidden_or_underscored_path_component(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "real.jsonl", prompt_rows(2))
    for hidden in (".ipynb_checkpoints/real-checkpoint.jsonl", "_temporary/0/task/part-0.jsonl", "_SUCCESS.jsonl",
                   "nested/.hidden.jsonl"):
        (data / hidden).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(data / hidden, prompt_rows(2))
    write_jsonl(data / "nested" / "more.jsonl", prompt_rows(1, start=5))
    assert [f.uri for f in expand_inputs(str(data))] == [str(data / "nested" / "more.jsonl"), str(data / "real.jsonl")]


def test_an_input_inside_the_output_is_refused_before_anything_is_deleted(tiny_model_dir, tmp_path, fake_engine, capsys):
    out = tmp_path / "out"
    assert run(tiny_model_dir, write_jsonl(tmp_path / "in.jsonl", prompt_rows(6)), out) == 0
    before = sorted(p.name for p in out.iterdir())
    assert run(tiny_model_dir, out, out, "--overwrite") == 2
    assert "lies inside --output" in one_line(capsys)
    assert run(tiny_model_dir, out / "data" / "part-00000.parquet", out, "--overwrite") == 2
    assert "lies inside --output" in one_line(capsys)
    assert sorted(p.name for p in out.iterdir()) == before and parquet_ids(out) == [f"r{i:05d}" for i in range(6)]


def test_an_output_inside_a_directory_input_is_refused(tiny_model_dir, tmp_path, fake_engine, capsys):
    """The next run would read this job's results as its input: refused, nothing written. A hidden
    folder ('_' or '.'), which a directory input never reads, is fine."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "rows.jsonl", prompt_rows(3))
    assert run(tiny_model_dir, data, data / "out") == 2
    assert "--output" in (line := one_line(capsys)) and "lies inside --input" in line
    assert sorted(p.name for p in data.iterdir()) == ["rows.jsonl"]
    assert run(tiny_model_dir, data, data / "_results") == 0
    assert parquet_ids(data / "_results") == [f"r{i:05d}" for i in range(3)]
    assert [f.uri for f in expand_inputs(str(data))] == [str(data / "rows.jsonl")]


@pytest.mark.parametrize("content", [b"", b"\n  \n\t\n"])
def test_an_empty_input_writes_a_zero_row_part_with_the_full_schema(tiny_model_dir, tmp_path, fake_engine, content):
    (tmp_path / "in.jsonl").write_bytes(content)
    assert run(tiny_model_dir, tmp_path / "in.jsonl", tmp_path / "out") == 0
    table = pq.read_table(tmp_path / "out" / "data" / "part-00000.parquet")
    assert table.num_rows == 0 and table.schema.names == [f.name for f in RESULT_FIELDS]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["output"]["parts"] == ["data/part-00000.parquet"] and manifest["rows"]["total"] == 0


def test_an_integral_float_id_keeps_its_integers_text_in_parquet(tiny_model_dir, tmp_path, fake_engine):
    pq.write_table(pa.table({"id": [7.0, 8.0], "prompt": ["a", "b"]}), tmp_path / "in.parquet")
    assert run(tiny_model_dir, tmp_path / "in.parquet", tmp_path / "out") == 0
    assert parquet_ids(tmp_path / "out") == ["7", "8"]


# --- damaged inputs (item 6) ---

@pytest.mark.parametrize("damage", ["truncated", "not-gzip"])
def test_a_damaged_gz_input_is_one_line_naming_it(tiny_model_dir, tmp_path, fake_engine, capsys, damage):
    data = gzip.compress(jsonl_bytes(prompt_rows(200)))
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"just text, not gzip\n")
    assert run(tiny_model_dir, path, tmp_path / "out") == 2
    line = one_line(capsys)
    assert str(path) in line and "not a complete gzip file" in line
    assert not (tmp_path / "out").exists()  # refused before any work: not even the lease is left


def test_a_truncated_parquet_input_is_one_line_naming_it(tiny_model_dir, tmp_path, fake_engine, capsys):
    pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["x", "y"]}), tmp_path / "good.parquet")
    data = (tmp_path / "good.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) - 20])
    assert run(tiny_model_dir, tmp_path / "cut.parquet", tmp_path / "out") == 2
    line = one_line(capsys)
    assert str(tmp_path / "cut.parquet") in line and "not a readable Parquet file" in line


# --- outputs that cannot be written (item 6) ---

def test_a_full_disk_mid_job_is_one_line_and_committed_shards_stay(tiny_model_dir, tmp_path, fake_engine, capsys,
                                                                  monkeypatch):
    source, out = write_jsonl(tmp_path / "in.jsonl", prompt_rows(20)), tmp_path / "out"
    real = write.write_parquet
    written = []

    def filling_up(table, sink):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(table.num_rows)
        real(table, sink)

    monkeypatch.setattr(write, "write_parquet", filling_up)
    assert run(tiny_model_dir, source, out) == 2
    line = one_line(capsys)
    assert "no space left on the device" in line and "part-00002.parquet" in line and "re-run" in line
    assert sorted(p.name for p in (out / "_shards").iterdir()) == ["shard-00000.json", "shard-00001.json"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(write, "write_parquet", real)
    assert run(tiny_model_dir, source, out) == 0  # space freed: the re-run resumes at shard 2
    assert fake_engine[-1].ids_seen[0] == "r00010"
    assert parquet_ids(out) == [f"r{i:05d}" for i in range(20)]


def test_a_read_only_output_is_one_line(tiny_model_dir, tmp_path, fake_engine, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(3))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        # root ignores permission bits; /sys refuses even root (EPERM), as a read-only mount would.
        output = locked / "out" if os.geteuid() != 0 else "/sys/ossbatch-test-output"
        assert run(tiny_model_dir, source, output) == 2
    finally:
        locked.chmod(0o755)
    line = one_line(capsys)
    assert str(output) in line and ("permission denied" in line or "read-only" in line)


def test_a_nan_never_reaches_the_job_files(tiny_model_dir, tmp_path, fake_engine, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(3))
    assert run(tiny_model_dir, source, tmp_path / "out", "--temperature", "nan") == 2
    assert "--temperature" in one_line(capsys)
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        write_json_atomic(*LOCAL.filesystem(str(tmp_path / "x.json")), {"temperature": float("nan")})
    assert not (tmp_path / "x.json").exists()


# --- S3 (moto on loopback) ---

def test_s3_missing_output_bucket_is_one_line_and_is_not_created(tiny_model_dir, tmp_path, fake_engine, capsys, s3):
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(3))
    assert run(tiny_model_dir, source, "s3://no-such-bucket-here/out") == 2
    line = one_line(capsys)
    assert "no-such-bucket-here" in line and "does not exist" in line
    assert "no-such-bucket-here" not in s3.fs.ls("", refresh=True)


def test_s3_bucket_policy_denying_put_is_one_line_before_any_work(tiny_model_dir, tmp_path, fake_engine, capsys, s3):
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(3))
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                                                      "Resource": f"arn:aws:s3:::{s3.bucket}/*"}]}
    s3.fs.call_s3("put_bucket_policy", Bucket=s3.bucket, Policy=json.dumps(policy))
    assert run(tiny_model_dir, source, s3.uri("out")) == 2
    line = one_line(capsys)
    assert s3.uri("out") in line and "access denied" in line and "policy" in line
    assert fake_engine[0].ids_seen == []  # nothing ran


def test_s3_wrong_credentials_are_one_line(tiny_model_dir, tmp_path, fake_engine, capsys, s3, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(3))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()

    def auth(count: str):  # moto checks credentials once told to (its /moto-api/reset-auth)
        urllib.request.urlopen(urllib.request.Request(f"{s3.endpoint}/moto-api/reset-auth", data=count.encode(),
                                                      headers={"Content-Type": "text/plain"}, method="POST")).close()

    auth("0")
    try:
        assert run(tiny_model_dir, source, s3.uri("out")) == 2
    finally:
        auth("inf")
    line = one_line(capsys)
    assert s3.uri("out") in line and "access denied" in line and "credentials" in line


def test_s3_endpoint_going_away_mid_job_stops_cleanly_and_the_rerun_resumes(tiny_model_dir, tmp_path, fake_engine,
                                                                             capsys, monkeypatch):
    """Its own moto server, stopped after the first commit, started again on the same port."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("going-away")
    monkeypatch.setattr(driver, "RETRY_FIRST_WAIT_SECONDS", 0.05)
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(15))
    real_commit = driver.commit_shard
    stopped = threading.Event()

    def commit_then_lose_the_endpoint(plan, shard_index, *args):
        marker = real_commit(plan, shard_index, *args)
        if shard_index == 0:
            server.stop()
            stopped.set()
        return marker

    monkeypatch.setattr(driver, "commit_shard", commit_then_lose_the_endpoint)
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own retries (each with a backoff), before ours
    options = json.dumps({"s3": {"config_kwargs": {"retries": {"max_attempts": 1}}}})
    try:
        assert run(tiny_model_dir, source, "s3://going-away/out", "--storage-options", options) == 2
        line = one_line(capsys)
        assert "s3://going-away/out" in line and "stopped answering" in line and "re-run the same command" in line
        assert stopped.is_set()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        s3fs.S3FileSystem.clear_instance_cache()
        assert fs.ls("going-away/out/_shards", refresh=True) == ["going-away/out/_shards/shard-00000.json"]
        monkeypatch.setattr(driver, "commit_shard", real_commit)
        assert run(tiny_model_dir, source, "s3://going-away/out", "--storage-options", options) == 0
        assert fake_engine[-1].ids_seen[0] == "r00005"  # shard 0 stayed committed
        ids = []
        for name in sorted(fs.ls("going-away/out/data", refresh=True)):
            if name.endswith(".parquet"):
                with fs.open(name, "rb") as f:
                    ids += pq.read_table(f).column("id").to_pylist()
        assert sorted(ids) == [f"r{i:05d}" for i in range(15)]
    finally:
        server.stop()


# --- the release's original/ folder, given directly (item 5) ---

def test_the_releases_original_folder_runs_given_directly_or_through_its_root(tmp_path):
    from ossbatch.engine.tiny_model import TINY, write_random_checkpoint

    root = write_random_checkpoint(tmp_path / "gpt-oss-tiny", TINY, seed=0, layout="original")
    assert not (root / "config.json").exists() and (root / "original" / "config.json").exists()
    source = write_jsonl(tmp_path / "in.jsonl", prompt_rows(2))
    outputs = {}
    for name, model in (("root", root), ("original", root / "original")):
        assert run(model, source, tmp_path / name, "--max-tokens", "3", "--temperature", "0") == 0
        outputs[name] = {r["id"]: r["output_text"] for p in sorted((tmp_path / name / "data").glob("*.parquet"))
                         for r in pq.read_table(p).to_pylist()}
    assert outputs["root"] == outputs["original"] and len(outputs["root"]) == 2
