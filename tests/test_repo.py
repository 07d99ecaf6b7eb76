"""The repository keeps its promises: CI runs the README's test command, and the
package that `pip install .` builds carries the bundled models."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    return [b.strip() for b in blocks]


def test_ci_runs_the_readme_test_command() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, "the README's set-up is two commands"
    run_cmd, test_cmd = commands
    assert run_cmd.endswith("spectralmc serve") and "pip install ." in run_cmd
    assert "./scripts/test" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci


def test_wheel_contains_the_bundled_models(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("spectralmc_server-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for f in ("manifest.json", "model.safetensors", "training.safetensors"):
        assert f"spectralmc_server/models/gbm/{f}" in names
    assert "spectralmc_server/py.typed" in names
    assert "spectralmc_server/service/static/ui.html" in names  # the /ui page ships
