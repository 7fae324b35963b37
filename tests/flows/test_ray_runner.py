"""`--runner ray`: four shards on a local two-worker Ray cluster give the local runner's output.

Ray probes cloud metadata addresses when it starts, so Ray runs only inside a
loopback-only network namespace: a subprocess under `unshare -n` runs the whole
job (its own Prefect server included: the session's is outside the namespace),
and this test compares what it wrote with an in-process run without Ray.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ossbatch.flows.cli import main
from flow_helpers import write_jsonl


def _loopback_namespace_error() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`unshare -n` is not permitted here ({probe.stderr.strip() or probe.returncode}); Ray must not run outside a loopback-only namespace"
    return None


def _rows(out) -> dict:
    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / "data").glob("part-*.parquet"))])
    return {r["id"]: r for r in table.to_pylist()}


def test_ray_runner_matches_the_local_runner(tiny_model_dir, tmp_path):
    reason = _loopback_namespace_error()
    if reason:
        pytest.skip(reason)
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": f"q{i}", "prompt": f"question {i}", "n": i} for i in range(8)])
    job = ["--model", str(tiny_model_dir), "--input", source, "--shard-rows", "2", "--max-tokens", "4",
           "--temperature", "0", "--keep-token-ids", "--quiet"]

    home = tmp_path / "home"  # Ray writes its auth token under $HOME
    home.mkdir()
    # Ray's sessions and sockets: a short path (sockets have a ~107 character limit), removed after.
    ray_tmp = tempfile.mkdtemp(prefix="ossbatch-ray-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
    env |= {"HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect"), "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_TMPDIR": ray_tmp}
    command = [sys.executable, "-m", "ossbatch.flows.cli", "run", *job, "--output", str(tmp_path / "ray"),
               "--runner", "ray", "--ray-workers", "2"]
    try:
        ray_run = subprocess.run(["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command],
                                 env=env, capture_output=True, text=True, timeout=400)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert ray_run.returncode == 0, ray_run.stdout[-4000:] + ray_run.stderr[-4000:]

    assert main(["run", *job, "--output", str(tmp_path / "local"), "--orchestrator", "none"]) == 0
    on_ray, local = _rows(tmp_path / "ray"), _rows(tmp_path / "local")
    assert sorted(on_ray) == [f"q{i}" for i in range(8)]
    fields = ["status", "output_token_ids", "completion_tokens", "output_text", "error", "n"]
    assert {k: [r[f] for f in fields] for k, r in on_ray.items()} == {k: [r[f] for f in fields] for k, r in local.items()}

    manifest = json.loads((tmp_path / "ray" / "_manifest.json").read_text())
    workers = [s["worker"] for s in manifest["shards"]]
    assert len(workers) == 4 and all(w.startswith("ray:") for w in workers)
    assert len(set(workers)) == 2  # two actors, each reused across shards
