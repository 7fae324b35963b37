"""prefect.yaml: its deployments load, their entrypoints import, their parameters fit the
flows, their cron schedules parse; `ossbatch serve` refuses without a server; `ossbatch
deploy` registers them with a work pool on a real (test) Prefect server."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ossbatch.flows import schedules

ROOT = Path(__file__).resolve().parents[2]
PREFECT_FILE = ROOT / "prefect.yaml"
EXPECTED = {"nightly-labels": "label", "nightly-synth": "synth", "nightly-eval": "eval"}


def test_prefect_yaml_deployments_load_and_their_parameters_and_crons_are_valid():
    from prefect.client.schemas.schedules import CronSchedule

    deployments = schedules.load_deployments(PREFECT_FILE)
    assert {d["name"] for d in deployments} == set(EXPECTED)
    for deployment in deployments:
        flow = schedules.load_flow(deployment["entrypoint"], ROOT)
        assert flow.name == EXPECTED[deployment["name"]]
        flow.validate_parameters(deployment["parameters"])  # raises on a name or type the flow does not take
        crons = [CronSchedule(cron=s["cron"], timezone=s.get("timezone")) for s in deployment["schedules"]]
        assert crons and all(c.cron.split()[1:] != ["*"] * 4 for c in crons)  # nightly, not every minute
        for value in deployment["parameters"].values():
            # Example inputs exist (paths relative to the project, the workers' working directory).
            for path in value if isinstance(value, list) else [value]:
                if isinstance(path, str) and path.startswith("examples/"):
                    assert (ROOT / path).exists(), path
        assert (deployment.get("work_pool") or {}).get("name") == schedules.DEFAULT_POOL


def test_runner_deployments_carry_schedules_and_parameters():
    built = schedules.runner_deployments(PREFECT_FILE, ["nightly-eval"])
    (eval_deployment,) = built
    assert eval_deployment.name == "nightly-eval"
    assert eval_deployment.entrypoint == "ossbatch.flows.nightly.eval_job"
    assert [s.schedule.cron for s in eval_deployment.schedules] == ["0 4 * * *"]
    assert eval_deployment.parameters["grading_rule"] == "choice"
    with pytest.raises(ValueError, match="no deployment named nope"):
        schedules.runner_deployments(PREFECT_FILE, ["nope"])


def test_serve_without_a_server_explains_what_schedules_need(monkeypatch, capsys):
    monkeypatch.setattr(schedules, "api_url", lambda: None)
    assert schedules.serve(PREFECT_FILE) == 2
    guidance = capsys.readouterr().err
    assert "prefect server start" in guidance and "PREFECT_API_URL" in guidance and "never fires a schedule" in guidance


def test_deploy_registers_every_deployment_with_its_cron_on_the_server(prefect_server):
    from prefect.client.orchestration import get_client

    env = dict(os.environ, PREFECT_API_URL=prefect_server)
    done = subprocess.run([sys.executable, "-m", "ossbatch.flows.cli", "deploy", "--prefect-file", str(PREFECT_FILE)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "prefect worker start --pool ossbatch-nightly" in done.stdout
    with get_client(sync_client=True) as client:
        assert client.read_work_pool("ossbatch-nightly").type == "process"
        found = {d.name: d for d in client.read_deployments()}
    for name in EXPECTED:
        assert found[name].work_pool_name == "ossbatch-nightly"
        assert [s.schedule.cron for s in found[name].schedules] == \
            [s["cron"] for d in schedules.load_deployments(PREFECT_FILE) if d["name"] == name for s in d["schedules"]]
