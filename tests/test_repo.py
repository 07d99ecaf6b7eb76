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


# -- apt: the package lists are refreshed before anything is installed ----------------------

_APT_INSTALL = re.compile(r"\bapt(?:-get)?\s+install\b")
_APT_UPDATE = re.compile(r"\bapt(?:-get)?\s+update\b")


def _shell_lines(text: str) -> list[str]:
    """Commands one per line: continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def _apt_sources() -> dict[str, list[str]]:
    """The shell the README tells a reader to run (its bash/sh code blocks) and CI's script."""
    blocks = re.findall(r"```(?:bash|sh|shell|console)\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    return {
        "README.md": [line for block in blocks for line in _shell_lines(block)],
        ".ci/run": _shell_lines((ROOT / ".ci" / "run").read_text()),
    }


def _apt_packages(lines: list[str]) -> set[str]:
    """The packages every ``apt-get install`` in ``lines`` names (options left out)."""
    packages: set[str] = set()
    for line in lines:
        for m in _APT_INSTALL.finditer(line):
            args = re.split(r"&&|\|\||[;|&)]", line[m.end() :], maxsplit=1)[0].split()
            packages.update(a for a in args if not a.startswith("-"))
    return packages


def test_apt_get_update_comes_before_every_install() -> None:
    """A fresh machine's apt lists are empty or stale: every ``apt-get install`` in the
    README and in CI runs after an ``apt-get update``, earlier in its own command chain or
    on an earlier line."""
    for name, lines in _apt_sources().items():
        installs = 0
        updated = False  # an earlier line ran apt-get update
        for line in lines:
            for m in _APT_INSTALL.finditer(line):
                installs += 1
                before = line[: m.start()]
                assert updated or _APT_UPDATE.search(before), f"{name}: apt-get install without an update first: {line}"
            if _APT_UPDATE.search(line):
                updated = True
        assert installs, f"{name} installs no apt packages: is this test still parsing the right lines?"


def test_readme_and_ci_install_the_same_apt_packages() -> None:
    sources = _apt_sources()
    readme, ci = _apt_packages(sources["README.md"]), _apt_packages(sources[".ci/run"])
    assert readme, "the README names no apt packages"
    assert readme == ci, f"only in the README: {sorted(readme - ci)}; only in .ci/run: {sorted(ci - readme)}"


def test_pre_commit_runs_the_lint_part_of_scripts_test() -> None:
    """.pre-commit-config.yaml runs, as local hooks with the project's own tools, exactly
    the checks scripts/test runs before pytest (ruff check, ruff format --check, mypy)."""
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    assert re.search(r"^\s*- repo: local\s*$", config, re.M), "the hooks are not `repo: local`"
    entries = re.findall(r"^\s*entry:\s*(.+?)\s*$", config, re.M)
    languages = re.findall(r"^\s*language:\s*(\S+)\s*$", config, re.M)
    assert languages == ["system"] * len(entries), "every hook runs the project's own tool (language: system)"
    assert len(re.findall(r"^\s*pass_filenames:\s*false\s*$", config, re.M)) == len(entries)
    script = (ROOT / "scripts" / "test").read_text().splitlines()
    lint = [line.strip() for line in script if line.strip().split(" ")[0] in ("ruff", "mypy")]
    assert lint, "scripts/test runs no ruff or mypy: is this test still parsing the right lines?"
    assert entries == lint, f"pre-commit runs {entries}, scripts/test runs {lint}"
