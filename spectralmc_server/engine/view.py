"""ModelView: what the serving side knows of one loaded model version, without torch.

The engine holds each served version as a :class:`~spectralmc_server.engine.served.ServedModel`
(its network, pricer and certificate). What admission, classification and the answers'
identities need of it is plain data: the name, version and content hash, the process, the
domain's box, the certified strikes (K/F) and whether the learned model may answer at all.
A view carries exactly that, built once per loaded version, and pickles small; the HTTP
side reads views only, so it never touches an engine object.

This module imports neither torch nor anything of the engine that does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class ModelView:
    """One loaded version of a served model, as plain data."""

    name: str  # the served model's name (an answer's ``models`` key)
    process: str  # the process it prices
    version: int | None
    content_hash: str
    # the domain's closed box: (name, low, high) per process parameter in the process's
    # parameter order, then expiry_years last (engine/processes/base.py ModelDomain)
    ranges: tuple[tuple[str, float, float], ...]
    moneyness: tuple[float, float]  # K/F inside which learned prices are served (certified)
    qualified: bool  # may the learned model answer at all (ModelPricer.qualified)
    domain: dict[str, Any]  # the domain as JSON, as /v1/models shows it
    certificate: dict[str, Any] | None = None  # the version's certificate (JSON), as stored

    @property
    def param_ranges(self) -> tuple[tuple[str, float, float], ...]:
        return self.ranges[:-1]

    @property
    def expiry_range(self) -> tuple[float, float]:
        return self.ranges[-1][1], self.ranges[-1][2]

    def box(self) -> tuple[Floats, Floats]:
        """Lows and highs of the box, parameters in the process's order then expiry."""
        return (
            np.array([r[1] for r in self.ranges], dtype=np.float64),
            np.array([r[2] for r in self.ranges], dtype=np.float64),
        )
