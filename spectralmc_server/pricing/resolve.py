"""Contracts by reference made explicit against a market-data snapshot: the one place
the pricing use case turns ``underlying`` + ``expiry`` into spot, rate, dividend and
parameters (docs/marketdata.md)."""

from __future__ import annotations

from pydantic import ValidationError

from spectralmc_server.engine.processes import get_process
from spectralmc_server.marketdata.inputs import MissingMarketDataError, contract_inputs
from spectralmc_server.marketdata.objects import MarketSnapshot
from spectralmc_server.marketdata.store import SnapshotRecord, iso
from spectralmc_server.pricing.book import all_explicit
from spectralmc_server.pricing.schemas import Contract, PriceRequest, format_validation_error
from spectralmc_server.pricing.valuation import RequestError


def needs_market_data(request: PriceRequest) -> bool:
    return not all_explicit(request)


def explicit_request(request: PriceRequest, record: SnapshotRecord, snapshot: MarketSnapshot) -> PriceRequest:
    """``request`` with every contract by reference given its explicit inputs from the
    snapshot; a missing object raises RequestError naming it and the contract."""
    where = f"{record.namespace}/{iso(record.val_datetime)} as of {iso(record.data_asof)}"
    contracts: list[Contract] = []
    for i, c in enumerate(request.contracts):
        if c.is_explicit:
            contracts.append(c)
            continue
        assert c.underlying is not None and c.expiry is not None  # the schema guarantees both
        names = get_process(c.process).market_param_names
        try:
            got = contract_inputs(
                snapshot,
                where,
                underlying=c.underlying,
                expiry=c.expiry,
                strike=c.strike,
                process=c.process,
                param_names=names,
                val_datetime=record.val_datetime,
            )
            explicit = Contract(
                id=c.id,
                right=c.right,
                strike=c.strike,
                spot=got.spot,
                expiry_years=got.expiry_years,
                rate=got.rate,
                dividend=got.dividend,
                process=c.process,
                vol=got.params["vol"] if names == ("vol",) else None,
                params=None if names == ("vol",) else got.params,
                fixings=c.fixings,
                barrier=c.barrier,
            )
        except MissingMarketDataError as exc:
            raise RequestError(f"contracts[{i}]", str(exc)) from None
        except ValidationError as exc:
            # a lone Contract's errors are located from its root: "(body).spot" -> "spot"
            reason = "; ".join(
                f"{d['field'].removeprefix('(body)').lstrip('.') or 'contract'}: {d['reason']}"
                for d in format_validation_error(exc)
            )
            raise RequestError(
                f"contracts[{i}]", f"the inputs resolved from {where} are out of range: {reason}"
            ) from None
        contracts.append(explicit)
    return request.model_copy(update={"contracts": contracts})
