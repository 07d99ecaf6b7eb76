"""The version store's vocabulary: object formats, version records, certificate links.

Shared by ``store/versions.py`` (commit, load, pins) and ``store/audit.py`` (verify,
gc); the layout of a model's objects is described in ``store/versions.py``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from spectralmc_server.engine.checkpoint import MANIFEST, MODEL_FILE, TRAINING_FILE, library_versions
from spectralmc_server.store.cas import sha256_hex
from spectralmc_server.store.chain import VersionError, parse
from spectralmc_server.store.objects import CorruptObjectError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
RECORD_FORMAT = "spectralmc-version/1"
PIN_FORMAT = "spectralmc-pin/1"
GC_FORMAT = "spectralmc-gc/1"
LINK_FORMAT = "spectralmc-certificate-link/1"
LINK_FIELDS = frozenset({"format", "model", "version", "record", "model_hash", "certificate"})
CONTENT_ROLES = {"manifest": MANIFEST, "model": MODEL_FILE, "training": TRAINING_FILE}

LIBRARY = library_versions()


def hex_of(h: str) -> str:
    """A hash without its ``sha256:`` tag (how content keys name it)."""
    return h.removeprefix("sha256:")


@dataclass(frozen=True)
class StoredVersion:
    """A version record as stored, with its hash."""

    version: int
    record: dict[str, Any]
    record_hash: str

    @property
    def content_hash(self) -> str:
        return str(self.record["content_hash"])


def certificate_bytes(cert: Mapping[str, Any], model_hash: str, what: str) -> bytes:
    """The bytes a certificate is stored as (``certificate.encode``: canonical JSON), once it
    is known to be a certificate of ``model_hash``; VersionError otherwise (the caller's
    mistake, caught before anything is written)."""
    from spectralmc_server.engine import certificate  # imports torch: only where a certificate is handled

    if cert.get("model_hash") != model_hash:
        raise VersionError(f"{what}: the certificate is for model {cert.get('model_hash')!r}, not {model_hash!r}")
    data = certificate.encode(cert)
    try:
        certificate.decode(data, model_hash)
    except certificate.CertificateError as exc:
        raise VersionError(f"{what}: {exc}") from None
    return data


def decode_certificate(data: bytes, h: str, model_hash: str, what: str) -> dict[str, Any]:
    """A stored certificate blob, checked against its hash and the model it must certify."""
    from spectralmc_server.engine import certificate

    if sha256_hex(data) != h:
        raise CorruptObjectError(f"{what}: certificate {h} fails its SHA-256 (bytes changed)")
    try:
        return certificate.decode(data, model_hash)
    except certificate.CertificateError as exc:
        raise CorruptObjectError(f"{what}: {exc}") from None


def make_link(model: str, stored: StoredVersion, h: str) -> dict[str, Any]:
    """The certificate link of ``stored`` to certificate ``h``."""
    return {
        "format": LINK_FORMAT,
        "model": model,
        "version": stored.version,
        "record": stored.record_hash,
        "model_hash": stored.content_hash,
        "certificate": h,
    }


def link_problem(body: dict[str, Any], model: str, stored: StoredVersion) -> str | None:
    """Why a parsed link does not belong to ``stored`` of ``model`` (None: it does)."""
    if set(body) != LINK_FIELDS or body.get("format") != LINK_FORMAT:
        return f"not a certificate link (expected the fields of {LINK_FORMAT!r})"
    if body.get("model") != model or body.get("version") != stored.version:
        return "link names another model or version than its key"
    if body.get("record") != stored.record_hash:
        return "link names another record hash than the version's record"
    if body.get("model_hash") != stored.content_hash:
        return "link names another model hash than the version's record"
    h = body.get("certificate")
    if not isinstance(h, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", h):
        return "link does not name a certificate blob"
    return None


def check_link(data: bytes, key: str, model: str, stored: StoredVersion) -> str:
    """The certificate hash the link at ``key`` names, once it is checked against the record."""
    body = parse(data, key)
    problem = link_problem(body, model, stored)
    if problem is not None:
        raise CorruptObjectError(f"{key}: {problem}")
    return str(body["certificate"])
