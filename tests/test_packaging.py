"""The wheel installs one import package of ours, `ossbatch`, and nothing called `engine` or `pipeline`."""

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_one_top_level_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "dist"), str(ROOT)], check=True, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("ossbatch-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"ossbatch"}
    assert "ossbatch/schemas/request.schema.json" in names

    # `pip install` into an empty environment; no dependencies: only the package's own layout is checked.
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = {p.name for p in Path(site).iterdir() if not p.name.endswith(".dist-info")}
    assert ours == {"ossbatch"}
    clash = subprocess.run([str(python), "-c", "import pipeline"], cwd=tmp_path, capture_output=True, text=True)
    assert clash.returncode != 0 and "No module named 'pipeline'" in clash.stderr
    found = subprocess.run([str(python), "-c", "import ossbatch.schemas, ossbatch.engine.config; print(ossbatch.schemas.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert found.stdout.startswith(site)
