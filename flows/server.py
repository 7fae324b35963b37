"""Where Prefect runs report to, and the temporary server's start-up, made cheaper.

With PREFECT_API_URL set (``prefect server start``, Prefect Cloud) every flow run reports there
and no server is started. Without it Prefect starts a temporary server for the one command: a
uvicorn subprocess that imports Prefect's whole server (FastAPI, SQLAlchemy, the models), checks
the database's migrations and registers block types before it answers (benchmarks/startup.py
measures it). Three cuts:

- PREFECT_HOME is persistent (flows.environment), so the SQLite database and the block types
  registered in it outlive the command; block registration is skipped (no flow here uses blocks);
- once a server of this Prefect version has migrated that database, later starts skip the
  migration check (`migrated_marker`);
- `TemporaryServer` starts that subprocess itself, first thing, and points PREFECT_API_URL at it:
  the command then imports Prefect's client only (not its server, the costliest import), and the
  server starts while the command imports Prefect and loads the model.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from ossbatch.flows.environment import use_prefect_server


def reports_to_a_server() -> bool:
    """A Prefect server to report to was named (PREFECT_API_URL, or the settings of a Prefect
    already imported, as in tests): no temporary server is started."""
    if os.environ.get("PREFECT_API_URL"):
        return True
    if "prefect.settings" in sys.modules:
        from prefect.settings import get_current_settings

        return bool(get_current_settings().api.url)
    return False


def migrated_marker(home: Path) -> Path:
    return home / f".ossbatch-migrated-prefect-{importlib.metadata.version('prefect')}"


def temporary_server_settings(home: Path) -> dict[str, str]:
    """Settings that cut the temporary server's start-up, for an environment without a server."""
    settings = {"PREFECT_SERVER_REGISTER_BLOCKS_ON_START": "false"}
    own_database = any(name in os.environ for name in ("PREFECT_SERVER_DATABASE_CONNECTION_URL",
                                                       "PREFECT_API_DATABASE_CONNECTION_URL"))
    if not own_database and migrated_marker(home).exists() and (home / "prefect.db").exists():
        settings["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] = "false"
    return settings


class TemporaryServer:
    """Prefect's temporary server, started as Prefect starts it (a uvicorn subprocess serving
    ``prefect.server.api.server:create_app``) but by us, before this process imports Prefect:
    PREFECT_API_URL then points at it, so this process never imports Prefect's server code (the
    costliest import of a Prefect run), and the server starts while the command imports Prefect
    and loads the model. `wait` returns once it answers; it stops when the command exits."""

    def __init__(self):
        package = Path(importlib.util.find_spec("prefect").submodule_search_locations[0])
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.log = tempfile.TemporaryFile()
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env |= {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(package.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        atexit.register(self.stop)
        use_prefect_server(self.url)

    def wait(self) -> None:
        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's temporary server exited ({self.process.returncode}): {self._output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError(f"Prefect's temporary server did not answer within {timeout:g} s: {self._output()}")
        marker = migrated_marker(Path(os.environ["PREFECT_HOME"]))
        if not marker.exists():
            marker.touch()  # this version's migrations have run on the database

    def _output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:]

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen, grace_seconds: float = 5) -> None:
    """Terminates ``process`` (a server), killing it if it has not exited after ``grace_seconds``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_in_background() -> TemporaryServer | None:
    """Starts the temporary server now, unless runs report to a running server."""
    if reports_to_a_server():
        return None
    return TemporaryServer()
