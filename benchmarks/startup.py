"""Start-up seconds of a 1-row job, per orchestrator, and what Prefect's temporary server costs.

    python benchmarks/startup.py [--repeats 3] [--model DIR]

Every row is a fresh `ossbatch run` process on a one-row input with --max-tokens 1 (the tiny
demo-shaped model unless --model), so its wall time is start-up: imports, model load, planning,
and for Prefect the server and the flow/task runs. Modes:

- none: --orchestrator none (no Prefect imported);
- prefect, temporary server (cold): a fresh PREFECT_HOME: the database is created and migrated;
- prefect, temporary server (warm): the same PREFECT_HOME again (the usual case: ossbatch keeps
  PREFECT_HOME under ~/.local/state), migrations and block registration skipped;
- prefect, running server: PREFECT_API_URL points at a `prefect server start` started here
  first (its own start-up is not counted), so no temporary server starts.

Also the parts: importing Prefect's client, importing its server code (what each temporary
server's process pays, and what a client that starts the server itself would pay), and the
temporary server's start to its first /health answer. Medians over --repeats. Timings are only
meaningful on a quiet machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import CACHE, matmul_peak_gflops, table

from ossbatch.engine.tiny_model import preset_config, write_random_checkpoint
from ossbatch.flows.server import stop_process

DEMO_SHAPE = dict(num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, hidden_size=128,
                  intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, sliding_window=16)
BASE_ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
BASE_ENV.pop("PREFECT_API_URL", None)


def demo_model() -> Path:
    path = CACHE / "demo-2L-8E-128"
    if not (path / "config.json").exists():
        write_random_checkpoint(path, preset_config("tiny", **DEMO_SHAPE), seed=0)
    return path


def seconds(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return took


def one_row_job(model: Path, work: Path, orchestrator: str, env: dict, n: int) -> float:
    inputs = work / "one.jsonl"
    inputs.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    return seconds([sys.executable, "-m", "ossbatch.flows.cli", "run", "--model", str(model), "--input", str(inputs),
                    "--output", str(work / f"out-{orchestrator}-{n}-{time.monotonic_ns()}"), "--max-tokens", "1",
                    "--orchestrator", orchestrator, "--quiet"], env)


def python_seconds(code: str, env: dict) -> float:
    return seconds([sys.executable, "-c", code], env)


def temporary_server_seconds(env: dict) -> float:
    code = ("import os, time\nfrom ossbatch.flows.server import TemporaryServer\nt = time.perf_counter()\n"
            "s = TemporaryServer(); s.wait(); print(time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(proc.stdout.strip().splitlines()[-1])


class RunningServer:
    """`prefect server start` on a free port, for the duration of a block."""

    def __init__(self, home: str):
        from ossbatch.flows.server import _free_port

        self.port = _free_port()
        self.env = {**BASE_ENV, "PREFECT_HOME": home}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/api"

    def __enter__(self):
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.2)
        self.__exit__()
        raise SystemExit("prefect server start did not answer in 180 s")

    def __exit__(self, *exc):
        stop_process(self.process, grace_seconds=15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode; the table shows medians (default: 3)")
    parser.add_argument("--model", help="checkpoint to run (default: a demo-shaped random model)")
    args = parser.parse_args()
    model = Path(args.model) if args.model else demo_model()

    rows = []
    with tempfile.TemporaryDirectory(prefix="ossbatch-startup-") as tmp:
        work = Path(tmp)

        def measure(name: str, run) -> None:
            times = [run(n) for n in range(args.repeats)]
            rows.append([name, f"{statistics.median(times):.2f}", " ".join(f"{t:.2f}" for t in times)])
            print(f"{name}: {rows[-1][1]} s", file=sys.stderr, flush=True)

        none_env = {**BASE_ENV, "PREFECT_HOME": str(work / "home-none")}
        measure("1-row job, --orchestrator none", lambda n: one_row_job(model, work, "none", none_env, n))

        def cold(n: int) -> float:
            return one_row_job(model, work, "prefect", {**BASE_ENV, "PREFECT_HOME": str(work / f"cold-{n}")}, n)

        measure("1-row job, prefect, temporary server, fresh PREFECT_HOME", cold)
        warm_env = {**BASE_ENV, "PREFECT_HOME": str(work / "warm")}
        one_row_job(model, work, "prefect", warm_env, -1)  # creates and migrates the database once
        measure("1-row job, prefect, temporary server, kept PREFECT_HOME", lambda n: one_row_job(model, work, "prefect",
                                                                                               warm_env, n))
        with RunningServer(str(work / "server-home")) as server:
            served_env = {**BASE_ENV, "PREFECT_HOME": str(work / "client-home"), "PREFECT_API_URL": server.url}
            measure("1-row job, prefect, running server (PREFECT_API_URL)",
                    lambda n: one_row_job(model, work, "prefect", served_env, n))

        measure("part: import prefect (client)", lambda n: python_seconds("import prefect", warm_env))
        measure("part: import prefect.server.api.server",
                lambda n: python_seconds("import prefect.server.api.server", warm_env))
        measure("part: temporary server start to /health (kept PREFECT_HOME)",
                lambda n: temporary_server_seconds(warm_env))
        measure("part: python + ossbatch.flows.cli import",
                lambda n: python_seconds("import ossbatch.flows.cli", none_env))

    print(f"float32 matmul peak in this run: {matmul_peak_gflops():.0f} GFLOP/s (IEEE): a slow machine shows here first")
    print(table(["start-up", "median s", f"runs (s), {args.repeats} each"], rows))


if __name__ == "__main__":
    main()
