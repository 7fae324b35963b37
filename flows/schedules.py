"""The nightly deployments of prefect.yaml: served from one machine, or deployed to a work pool.

Schedules only fire on a Prefect server that keeps running (`prefect server
start`, or Prefect Cloud) and that PREFECT_API_URL points at: the temporary
server `ossbatch run` starts lives for one command and schedules nothing.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import yaml

from ossbatch.pipeline.storage import InputError

PREFECT_FILE = "prefect.yaml"
DEFAULT_POOL = "ossbatch-nightly"

SERVER_GUIDANCE = """\
Schedules need a Prefect server that keeps running; the temporary one `ossbatch run`
starts lives for a single command and never fires a schedule. On this machine:

    prefect server start                      # in its own terminal (or a systemd unit)
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    ossbatch serve                            # runs the deployments of prefect.yaml on their cron

or deploy to a work pool (`ossbatch deploy`) and start workers with
`prefect worker start --pool {pool}`."""


def default_prefect_file() -> Path:
    """./prefect.yaml, else the one beside the installed flows package (the repository's)."""
    here = Path.cwd() / PREFECT_FILE
    return here if here.exists() else Path(__file__).resolve().parent.parent / PREFECT_FILE


def api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def load_deployments(prefect_file: Path | str) -> list[dict]:
    data = yaml.safe_load(Path(prefect_file).read_text()) or {}
    deployments = data.get("deployments") or []
    if not deployments:
        raise InputError(f"{prefect_file} defines no deployments")
    return deployments


def load_flow(entrypoint: str, root: Path):
    """The flow an entrypoint (``path/to/file.py:function``) names; our own modules are imported
    by module name, so the flows are the same objects `ossbatch` runs."""
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    path, _, function = entrypoint.rpartition(":")
    module_name = "ossbatch." + Path(path).with_suffix("").as_posix().replace("/", ".")
    try:
        found = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError):
        found = load_flow_from_entrypoint(str(root / path) + ":" + function)
    if not isinstance(found, Flow):
        raise InputError(f"{entrypoint} is not a Prefect flow")
    return found


def schedules_of(deployment: dict) -> list:
    from prefect.schedules import Cron

    return [Cron(s["cron"], timezone=s.get("timezone"), active=s.get("active", True))
            for s in deployment.get("schedules") or [] if s.get("cron")]


def runner_deployments(prefect_file: Path | str, names: list[str] | None = None) -> list:
    """The prefect.yaml deployments as RunnerDeployments for `prefect.serve`."""
    from prefect.deployments.runner import EntrypointType

    prefect_file = Path(prefect_file)
    chosen = [d for d in load_deployments(prefect_file) if not names or d["name"] in names]
    missing = set(names or []) - {d["name"] for d in chosen}
    if missing:
        raise InputError(f"no deployment named {', '.join(sorted(missing))} in {prefect_file}")
    return [
        load_flow(d["entrypoint"], prefect_file.parent).to_deployment(
            name=d["name"],
            schedules=schedules_of(d),
            parameters=d.get("parameters") or {},
            description=d.get("description"),
            tags=d.get("tags"),
            # By module name: the serving process finds the code wherever ossbatch is installed.
            entrypoint_type=EntrypointType.MODULE_PATH,
        )
        for d in chosen
    ]


def serve(prefect_file: Path | str, names: list[str] | None = None, limit: int = 1) -> int:
    """Runs the deployments' schedules in this process until interrupted."""
    if not api_url():
        print(SERVER_GUIDANCE.format(pool=DEFAULT_POOL), file=sys.stderr)
        return 2
    from prefect import serve as prefect_serve

    deployments = runner_deployments(prefect_file, names)
    # One machine, one model in memory at a time: runs beyond `limit` wait their turn.
    prefect_serve(*deployments, limit=limit)
    return 0


def deploy_command(prefect_file: Path | str, pool: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    return command + (["--pool", pool] if pool else [])


def ensure_work_pool(name: str, pool_type: str = "process") -> bool:
    """Creates the work pool when missing; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type))
            return True


def deploy(prefect_file: Path | str, pool: str | None = None) -> int:
    """`prefect deploy --all` for prefect.yaml (run from its directory, which becomes the
    workers' working directory), creating the work pool first if needed."""
    if not api_url():
        print(SERVER_GUIDANCE.format(pool=pool or DEFAULT_POOL), file=sys.stderr)
        return 2
    prefect_file = Path(prefect_file).resolve()
    named = {(d.get("work_pool") or {}).get("name") for d in load_deployments(prefect_file)}
    pools = sorted({pool} if pool else {n for n in named if n}) or [DEFAULT_POOL]
    for name in pools:
        if ensure_work_pool(name):
            print(f"created work pool {name} (type process)")
    env = dict(os.environ, PREFECT_API_URL=api_url())
    done = subprocess.run(deploy_command(prefect_file, pool), cwd=prefect_file.parent, env=env)
    if done.returncode == 0:
        print(f"deployed; start a worker with: prefect worker start --pool {pools[0]}")
    return done.returncode
