"""Marker plugin: tests marked ``gpu`` need a CUDA device and are skipped, with the
reason in the summary (``-ra``), on machines without one. ``bench/gpu_check.sh`` runs them
on a GPU machine."""

from __future__ import annotations

import pytest
import torch


def gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return (
            "needs a CUDA device: torch.cuda.is_available() is False on this machine "
            "(bench/gpu_check.sh runs these on a GPU)"
        )
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
