"""Small helpers shared by the flow tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
# Run before the command line: it fails if anything imports Prefect.
NO_PREFECT = ("import builtins\n_real = builtins.__import__\n"
              "def _no_prefect(name, *a, **k):\n    assert not name.startswith('prefect'), 'prefect imported'\n"
              "    return _real(name, *a, **k)\nbuiltins.__import__ = _no_prefect")


def ossbatch(*args, code: str = "", env: dict | None = None, timeout: float = 600):
    """The command line in a fresh process, as a user runs it; ``code`` runs first."""
    script = f"import sys\n{code}\nfrom ossbatch.flows.cli import main\nsys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)



def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text(jsonl(rows))
    return str(path)
