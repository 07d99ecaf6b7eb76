"""Models bundled with the package, so pricing works on a fresh install without training.

Each subfolder is a checkpoint directory (see ``engine/checkpoint.py``) produced by the
``spectralmc train`` command recorded in its manifest and in docs/benchmarks.md.
"""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent


def bundled_models() -> dict[str, Path]:
    """Model name -> checkpoint directory, for every bundled model."""
    return {p.name: p for p in sorted(BUNDLED_DIR.iterdir()) if (p / "manifest.json").is_file()}


BARRIER_DIR = BUNDLED_DIR / "barrier"


def bundled_barrier_models() -> dict[str, Path]:
    """Model name -> checkpoint directory, for every bundled barrier law (models/barrier/:
    defective laws, engine/processes/gbm_barrier.py, gbm_barrier_discrete.py and
    heston_barrier.py, measured by bench/accuracy_barrier*.py, and not served: they
    are not among :func:`bundled_models`)."""
    if not BARRIER_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(BARRIER_DIR.iterdir()) if (p / "manifest.json").is_file()}
