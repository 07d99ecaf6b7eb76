"""Turn a validated :class:`PriceRequest` into a response, through the served models.

Shared by ``spectralmc price`` and the HTTP service. Contracts are grouped by process,
priced in one batch per process, and answered in request order. The same request
against the same model versions gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
import torch

from spectralmc_server.engine.pricer import OptionBatch, ServedModel, reference_pricer
from spectralmc_server.engine.processes import get_process
from spectralmc_server.service.schemas import Contract, PriceRequest


class RequestError(ValueError):
    """A request that validated but cannot be answered; ``field`` names the culprit."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _batch(contracts: list[Contract], param_names: tuple[str, ...]) -> OptionBatch:
    market = torch.tensor([c.market_inputs() for c in contracts], dtype=torch.float64)  # (n, 4)
    params = [c.process_params() for c in contracts]
    return OptionBatch(
        spot=market[:, 0],
        strike=torch.tensor([c.strike for c in contracts], dtype=torch.float64),
        expiry=market[:, 1],
        rate=market[:, 2],
        dividend=market[:, 3],
        is_call=torch.tensor([c.right == "call" for c in contracts], dtype=torch.bool),
        theta=torch.tensor([[p[n] for n in param_names] for p in params], dtype=torch.float64).reshape(
            len(contracts), len(param_names)
        ),
    )


class Valuer:
    """Prices requests with the models it holds (one per process name)."""

    def __init__(self, models: Mapping[str, ServedModel]) -> None:
        self.models = dict(models)

    def value(self, request: PriceRequest) -> dict[str, Any]:
        for i, c in enumerate(request.contracts):
            if not c.is_explicit:
                raise RequestError(
                    f"contracts[{i}]",
                    "prices by underlying/expiry need a market-data snapshot, and none is available "
                    "here; give spot, expiry_years, rate, dividend and vol instead",
                )
        measures = frozenset(request.measures)
        levels = torch.tensor(request.levels, dtype=torch.float64)
        by_process: dict[str, list[int]] = {}
        for i, c in enumerate(request.contracts):
            by_process.setdefault(c.process, []).append(i)
        rows: list[dict[str, Any]] = [{} for _ in request.contracts]
        used: dict[str, dict[str, Any]] = {}
        for proc_name, idx in sorted(by_process.items()):
            process = get_process(proc_name)
            contracts = [request.contracts[i] for i in idx]
            batch = _batch(contracts, process.param_names)
            served = self.models.get(proc_name)
            if served is not None:
                ev = served.pricer.evaluate(batch, measures, levels)
                values, learned = ev.values, ev.learned.tolist()
                if any(learned):
                    used[served.name] = {"version": served.version, "content_hash": served.content_hash}
            else:
                values = reference_pricer(process).evaluate(batch, measures, levels)
                learned = [False] * len(idx)
            for j, i in enumerate(idx):
                row: dict[str, Any] = {
                    "id": contracts[j].id,
                    "model": proc_name,
                    "method": "cvnn" if learned[j] else "reference",
                }
                for m in request.measures:
                    if m == "quantiles":
                        row[m] = {repr(q): float(v) for q, v in zip(request.levels, values[m][j].tolist(), strict=True)}
                    else:
                        row[m] = float(values[m][j])
                rows[i] = row
        return {"results": rows, "models": used, "market_data": None}


def dumps(response: dict[str, Any]) -> bytes:
    """Response bytes: deterministic for the same response."""
    return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
