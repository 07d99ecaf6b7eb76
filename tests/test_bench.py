"""The benchmarks run (in their --quick mode, writing nowhere but a temporary folder)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize(
    "name",
    [
        "accuracy_gbm",
        "speed_gbm",
        "ablation_gbm",
        "store",
        "server_load",
        "stream",
        "accuracy_heston",
        "accuracy_merton",
        "accuracy_asian",
        "gpu_probe",
        "calibration",
        "variance_reduction",
    ],
)
def test_benchmark_quick_mode(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    docs = (BENCH.parent / "docs" / "benchmarks.md").read_text()
    plot = tmp_path / f"{name}.png"
    assert _load(name).main(["--quick", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "|" in out and "plot:" in out  # printed a table
    assert plot.stat().st_size > 10_000  # wrote a PNG
    assert (BENCH.parent / "docs" / "benchmarks.md").read_text() == docs  # recorded nothing
