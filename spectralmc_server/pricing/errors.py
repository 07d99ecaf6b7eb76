"""The pricing use case's refusal: what any entrypoint answers as a 4xx naming the field."""

from __future__ import annotations

from typing import Any

from spectralmc_server.pricing.valuation import RequestError


class RequestRefusedError(ValueError):
    """A request the pricing code will not answer: ``details`` name each field and
    reason; ``market`` is True when the market data is what is missing (the server's
    ``no_market_data``), else the input is invalid (``invalid_request``)."""

    def __init__(self, message: str, details: list[dict[str, Any]], *, market: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.market = market

    def __reduce__(self) -> tuple[Any, ...]:  # crosses to the HTTP process whole (engine_service)
        return (type(self), (self.message, self.details), {"market": self.market})

    @classmethod
    def of(cls, exc: RequestError, offset: int = 0) -> RequestRefusedError:
        """A :class:`RequestError` as a refusal; ``offset`` shifts a ``contracts[i]``
        field by the start of the slice it was found in."""
        field = exc.field
        if offset and field.startswith("contracts["):
            index = int(field[len("contracts[") : field.index("]")])
            field = f"contracts[{index + offset}]{field[field.index(']') + 1 :]}"
        return cls(f"{field}: {exc.reason}", [{"field": field, "reason": exc.reason}], market=exc.market)
