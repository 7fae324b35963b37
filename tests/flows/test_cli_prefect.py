"""Where `--orchestrator prefect` reports: to PREFECT_API_URL's server when set (no temporary
server), else to a temporary server that ossbatch starts itself and stops on exit."""

import json
from pathlib import Path

from ossbatch.flows.server import migrated_marker, temporary_server_settings
from flow_helpers import ENV, ossbatch, write_jsonl

NO_TEMPORARY_SERVER = ("import ossbatch.flows.server as server\n"
                       "def refuse(self): raise AssertionError('a temporary server was started')\n"
                       "server.TemporaryServer.__init__ = refuse")


def _one_row(tmp_path) -> str:
    return write_jsonl(tmp_path / "one.jsonl", [{"id": "a", "prompt": "hi"}])


def test_with_prefect_api_url_the_run_reports_there_and_starts_no_server(prefect_server, tiny_model_dir, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client

    async def flow_runs() -> list:
        async with get_client() as client:
            return [run.id for run in await client.read_flow_runs()]

    before = asyncio.run(flow_runs())
    env = {**ENV, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "home")}
    proc = ossbatch("run", "--model", tiny_model_dir, "--input", _one_row(tmp_path), "--output", tmp_path / "out",
                    "--max-tokens", "2", "--quiet", code=NO_TEMPORARY_SERVER, env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(asyncio.run(flow_runs())) == len(before) + 1
    assert not (tmp_path / "home" / "prefect.db").exists()  # no local database was created either


def test_without_a_server_a_temporary_one_runs_the_job_and_stops_with_it(tiny_model_dir, tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in ENV.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": str(home)}
    # Prints the temporary server's address at exit, then whether its process is gone.
    spy = ("import atexit, ossbatch.flows.server as server\n_init = server.TemporaryServer.__init__\n"
           "def init(self):\n    _init(self)\n    atexit.register(lambda: print('server', self.process.pid))\n"
           "server.TemporaryServer.__init__ = init")
    for output in ("first", "second"):
        proc = ossbatch("run", "--model", tiny_model_dir, "--input", _one_row(tmp_path), "--output", tmp_path / output,
                        "--max-tokens", "2", "--quiet", code=spy, env=env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads((tmp_path / output / "_manifest.json").read_text())["rows"]["total"] == 1
        pid = int(proc.stdout.split("server ")[1].split()[0])
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    # The first server migrated the kept database: later ones skip the migration check.
    assert migrated_marker(home).exists() and (home / "prefect.db").exists()
    assert temporary_server_settings(home)["PREFECT_SERVER_DATABASE_MIGRATE_ON_START"] == "false"


def test_a_fresh_prefect_home_migrates(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_SERVER_DATABASE_CONNECTION_URL", raising=False)
    assert "PREFECT_SERVER_DATABASE_MIGRATE_ON_START" not in temporary_server_settings(tmp_path)
    migrated_marker(tmp_path).touch()
    # A marker without the database (deleted since) is not trusted.
    assert "PREFECT_SERVER_DATABASE_MIGRATE_ON_START" not in temporary_server_settings(tmp_path)
