"""Running the ``spectralmc`` CLI in the test process: ``main(argv)`` with its output
captured, in the shape of a finished subprocess, for tests where a fresh interpreter
would only add its start-up (the console script itself is run by tests/test_cli.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest


def main_in_process(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> subprocess.CompletedProcess[str]:
    """``spectralmc ARGV...`` as ``main(ARGV)`` here: exit code, stdout and stderr."""
    from spectralmc_server.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)
