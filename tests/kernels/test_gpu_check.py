"""benchmarks/gpu_check.sh --dry-run: the GPU check's every section at tiny shapes on the CPU,
under the Triton interpreter, so the script made for the first GPU cannot rot."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run_writes_its_table(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True,
                            env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    rows = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["rows"]
    sections = {row["section"] for row in rows}
    assert {"correctness", "kernel vs roofline (tiny)", "engine (tiny)", "engine, 120b scaling (tiny)", "imports"} <= sections, sections
    assert not [row for row in rows if row["verdict"] == "FAIL"], table
    # Every table configuration was checked against the reference, and the engine produced tokens/s.
    from ossbatch.kernels import configs

    for config in [*configs.MOE_BY_ROWS_PER_EXPERT.values(), *configs.ATTENTION_BY_BUCKET.values()]:
        assert any(config.name in row["item"] and row["verdict"] == "ok" for row in rows), config.name
    assert sum("tok/s" in row["value"] for row in rows) >= 4
    imports = next(row for row in rows if row["section"] == "imports")
    assert imports["value"] == "none"


def test_gpu_check_flags_a_pipeline_import(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setitem(sys.modules, "pyarrow", object())
    report = gpu_check.Report()
    assert not gpu_check.imports_check(report)
    assert report.rows[-1]["verdict"] == "FAIL" and "pyarrow" in report.rows[-1]["value"]
