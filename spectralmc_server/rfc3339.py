"""Times on the wire are RFC 3339 only (paths, queries, bodies, command-line options).

A date-time is ``YYYY-MM-DDTHH:MM:SS[.fraction]`` followed by its zone, ``Z`` or
``±hh:mm`` (RFC 3339 section 5.6; ``T`` and ``Z`` may be written in lower case). A date
is ``YYYY-MM-DD``. Everything else is refused, in particular what a lenient ISO 8601 or
pydantic parser would take: Unix seconds (``1700000000``, ``0``, ``-1``, also as JSON
numbers), a date-time without a zone or without seconds, a space for ``T``, the compact
form ``20261126T160000Z``, an offset without its colon. Each of those silently names an
instant the client may not have meant. Fractions have at most 6 digits: the store keys
are microseconds, and truncating more would make two spellings name one key.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone
from typing import Annotated

from pydantic import AwareDatetime, BeforeValidator

DATETIME_FORMAT = "an RFC 3339 date-time with a time zone, e.g. 2026-11-26T16:00:00Z or 2026-11-26T11:00:00-05:00"
DATE_FORMAT = "an RFC 3339 full-date, e.g. 2026-11-20"
MAX_FRACTION_DIGITS = 6

_DATETIME_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))"
)
_DATE_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")


def parse_datetime(text: str) -> datetime:
    """An aware datetime (in the offset written) from RFC 3339 text; otherwise a
    ValueError saying what is wrong and what is expected (callers quote the input)."""
    m = _DATETIME_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"expected {DATETIME_FORMAT}")
    year, month, day, hour, minute, second, fraction, z, sign, oh, om = m.groups()
    if fraction is not None and len(fraction) > MAX_FRACTION_DIGITS:
        raise ValueError(f"at most {MAX_FRACTION_DIGITS} fraction digits (microseconds): expected {DATETIME_FORMAT}")
    if z is None and (int(oh) > 23 or int(om) > 59):
        raise ValueError(f"offset {sign}{oh}:{om} out of range: expected {DATETIME_FORMAT}")
    offset = timedelta(0) if z is not None else (1 if sign == "+" else -1) * timedelta(hours=int(oh), minutes=int(om))
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "0").ljust(MAX_FRACTION_DIGITS, "0")),
            tzinfo=timezone(offset),
        )
    except ValueError as exc:  # month 13, day 31 in June, hour 24, a leap second 60, year 0
        raise ValueError(f"{exc}: expected {DATETIME_FORMAT}") from None


def parse_date(text: str) -> date:
    """A date from RFC 3339 ``full-date`` text; ValueError saying what is wrong otherwise."""
    m = _DATE_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"expected {DATE_FORMAT}")
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError as exc:
        raise ValueError(f"{exc}: expected {DATE_FORMAT}") from None


def _datetime_input(value: object) -> object:
    if isinstance(value, datetime):  # built in code (or by a TOML parser), not parsed from text
        return value
    if isinstance(value, str):
        return parse_datetime(value)
    raise ValueError(f"expected {DATETIME_FORMAT}, as a string (not a {type(value).__name__})")


def _date_input(value: object) -> object:
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        return parse_date(value)
    raise ValueError(f"expected {DATE_FORMAT}, as a string (not a {type(value).__name__})")


# Field types for the schemas: the same JSON schema (format date-time / date) as
# pydantic's own, with the strict parsing above in front.
DateTime = Annotated[AwareDatetime, BeforeValidator(_datetime_input)]
Date = Annotated[date, BeforeValidator(_date_input)]
