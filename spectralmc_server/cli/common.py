"""What the subcommands share: exit codes, the errors that become them, the parser
class, stores opened for one command, the ``[certificate]`` settings, and the version a
server would serve from a store."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError

from spectralmc_server.store.objects import CorruptObjectError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_GATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class UsageError(Exception):
    """Bad input from the user: reported on one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


# -- stores -----------------------------------------------------------------------------


@contextlib.contextmanager
def store_errors() -> Iterator[None]:
    """Store failures as CLI outcomes: damage exits 1, anything else the user can act on 2."""

    from spectralmc_server.store.objects import StoreError
    from spectralmc_server.store.uri import InvalidStoreURIError

    try:
        yield
    except CorruptObjectError:
        raise  # damage: exit 1 (cli/__init__.py), not a usage error
    except (StoreError, InvalidStoreURIError) as exc:
        raise UsageError(str(exc)) from None


@contextlib.contextmanager
def store_session(uri: str, model: str) -> Iterator[tuple[asyncio.Runner, Any]]:
    """An event loop and the VersionStore of ``model`` at ``uri``, closed afterwards."""
    from spectralmc_server.store.uri import open_store
    from spectralmc_server.store.versions import VersionStore

    with store_errors(), asyncio.Runner() as runner:
        objects = runner.run(open_store(uri))
        try:
            yield runner, VersionStore(objects, model)
        finally:
            runner.run(objects.close())


# -- settings ---------------------------------------------------------------------------


def certificate_settings(path: Path | None) -> Any:
    """``[certificate]`` of a server settings file (and SPECTRALMC_ variables): the gate
    ``train --store`` and ``price --store`` apply, as a server does."""
    from spectralmc_server.settings import Settings

    if path is not None and not path.is_file():
        raise UsageError(f"--settings: no such file {path}")
    try:
        return Settings.load(path).certificate
    except ValidationError as exc:
        raise UsageError(validation_message("--settings: invalid settings", exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--settings {path}: not valid TOML: {exc}") from None


def validation_message(prefix: str, exc: ValidationError) -> str:
    from spectralmc_server.pricing.schemas import format_validation_error, one_line

    return f"{prefix}: {one_line(format_validation_error(exc))}"


# -- served models ----------------------------------------------------------------------


def served_from_store(uri: str, model: str, certificate: Any = None) -> Any:
    """The version a server would serve now: the store's pin, else its head; answered by
    the learned model only when its certificate passes the quality gate of
    ``certificate`` (CertificateSettings; default: the built-in gate) or an admin
    pinned it with force. A failing version is answered by the reference (a note on
    stderr says why), as a server that has no other version serves no learned answer."""
    from dataclasses import replace

    from spectralmc_server.engine.certificate import gate_failures
    from spectralmc_server.engine.served import load_served_model
    from spectralmc_server.settings import CertificateSettings

    certificate = certificate or CertificateSettings()
    with store_session(uri, model) as (run, vs):
        pin = run.run(vs.pin_entry())
        version = None if pin is None else pin.body.get("version")
        forced = version is not None and pin is not None and pin.body.get("force") is True
        if version is None:
            head = run.run(vs.head())
            if head is None:
                raise UsageError(f"--store: model {model!r} has no versions in {uri}")
            version = head.version
        ckpt = run.run(vs.load(version))
    failures = gate_failures(ckpt.certificate, certificate.limits(model))
    if failures and forced:
        print(
            f"note: model {model!r} version {version} fails its quality gate ({'; '.join(failures)}) "
            "and is pinned with force: its learned answers are served",
            file=sys.stderr,
        )
    elif failures:
        print(
            f"note: model {model!r} version {version} fails its quality gate ({'; '.join(failures)}): "
            "every measure is answered by the reference, not the learned model",
            file=sys.stderr,
        )
        ckpt = replace(ckpt, certificate=None)  # no certificate: nothing learned is served
    tolerance = {str(m): v for m, v in certificate.tolerance.items()}
    return load_served_model(ckpt, name=model, version=version, tolerance=tolerance)
