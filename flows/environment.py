"""The process environment ossbatch sets, in one place: `prepare_environment`, called once by the
command line before anything reads it (Prefect reads its settings on import, the Triton kernels
choose the interpreter on import), and `use_prefect_server` once a temporary server is up."""

import os
from pathlib import Path


def prepare_environment(*, backend: str | None = None, device: str | None = None, quiet: bool = False) -> None:
    # Nothing leaves loopback: Prefect's local server and Ray phone home unless told not to.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if "PREFECT_HOME" not in os.environ:
        state = Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state"))
        os.environ["PREFECT_HOME"] = str(state / "ossbatch" / "prefect")
    Path(os.environ["PREFECT_HOME"]).mkdir(parents=True, exist_ok=True)
    if not os.environ.get("PREFECT_API_URL"):
        from ossbatch.flows.server import temporary_server_settings

        for name, value in temporary_server_settings(Path(os.environ["PREFECT_HOME"])).items():
            os.environ.setdefault(name, value)
    if quiet:
        # Cron mails whatever a job prints: only warnings and errors reach the terminal
        # (the Prefect server still records every log line).
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "WARNING"
    if backend == "triton" and device != "cuda":
        # Without a GPU the Triton kernels run under the interpreter, chosen before kernels/ is imported.
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")


def use_prefect_server(url: str) -> None:
    """Runs report to the server at ``url`` (read by Prefect when it is imported, after this)."""
    os.environ["PREFECT_API_URL"] = url
