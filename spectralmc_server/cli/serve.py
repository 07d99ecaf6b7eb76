"""``spectralmc serve``: the pricing server (HTTP API, metrics, online training)."""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from spectralmc_server.cli.common import EXIT_FAILURE, EXIT_OK, UsageError, validation_message


def add_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the pricing server (HTTP API, metrics, online training)")
    serve.add_argument("--config", type=Path, help="TOML settings file (see config/server.toml)")
    serve.add_argument("--host", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default 8080)")
    serve.add_argument("--role", choices=["serve", "train", "all"], help="what this process does (default all)")
    serve.add_argument("--data-dir", type=Path, help="where the default local store lives")
    serve.add_argument("--store", help="model store URI (file:///path or s3://bucket/prefix)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    # set by the supervisor of http_workers > 1 (cli/serve_workers.py), not by hand
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-dir", type=Path, help=argparse.SUPPRESS)


def _check_config_file(config: Path | None) -> None:
    """A missing or unparsable --config, refused before anything heavy is imported (the
    settings import torch: seconds, where these two take milliseconds)."""
    if config is None:
        return
    if not config.is_file():
        raise UsageError(f"--config: no such file {config}")
    try:
        tomllib.loads(config.read_text())
    except OSError as exc:
        raise UsageError(f"--config {config}: cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {config}: not valid TOML: {exc}") from None


def _settings(args: argparse.Namespace) -> Any:
    """The settings of ``args`` (its --config already checked by :func:`run`)."""
    from spectralmc_server.settings import Settings
    from spectralmc_server.store.uri import InvalidStoreURIError, parse_store_uri

    try:
        settings = Settings.load(
            args.config, host=args.host, port=args.port, role=args.role, data_dir=args.data_dir, store=args.store
        )
        parse_store_uri(settings.store_uri)
    except ValidationError as exc:
        raise UsageError(validation_message("invalid settings", exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {args.config}: not valid TOML: {exc}") from None
    except InvalidStoreURIError as exc:
        raise UsageError(f"store: {exc}") from None
    return settings


def run(args: argparse.Namespace) -> int:
    _check_config_file(args.config)
    from spectralmc_server import lazy_torch

    # The HTTP process imports the engine's modules for their constants and types, and
    # runs no torch with the engine in its own process: torch is imported on first use.
    lazy_torch.install()
    import logging

    from spectralmc_server.cli import serve_workers
    from spectralmc_server.service import keys
    from spectralmc_server.service.app import create_app
    from spectralmc_server.service.edge import run_app
    from spectralmc_server.service.engine_process import EngineStartError
    from spectralmc_server.service.http_workers import HTTPWorker, worker_settings
    from spectralmc_server.store.objects import StoreError

    settings = _settings(args)
    worker = None
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if args.worker is not None:  # one of several HTTP workers (cli/serve_workers.py)
        if args.worker_dir is None or not 0 <= args.worker < settings.http_workers:
            raise UsageError("--worker is set by the supervisor of http_workers > 1 only")
        serve_workers.die_with_parent()
        worker = HTTPWorker(args.worker, settings.http_workers, args.worker_dir)
        settings = worker_settings(settings, args.worker)
        fmt = f"%(asctime)s %(levelname)s [worker {args.worker}] %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=fmt)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").addFilter(_malformed_http_one_line)
    log = logging.getLogger("spectralmc_server")
    if settings.http_workers > 1 and worker is None:
        log.info("%d HTTP workers on %s:%d (SO_REUSEPORT)", settings.http_workers, settings.host, settings.port)
        return serve_workers.Supervisor(args.argv, settings).run()
    log.info("role %s, store %s, models %s", settings.role, settings.store_uri, ", ".join(settings.models))
    app = create_app(settings, worker=worker)
    try:
        run_app(  # web.run_app with JSON parser errors and the header-read timeout (service/edge.py)
            app,
            host=settings.host,
            port=settings.port,
            shutdown_timeout=settings.shutdown_timeout_seconds,
            on_start=lambda msg: log.info("%s", msg),
            reuse_port=worker is not None,
            unix_path=None if worker is None else str(worker.socket_path(worker.index)),
        )
    except OSError as exc:  # address in use, permission denied
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    except StoreError as exc:  # the store is unreachable or refuses us: the environment, not a bug
        print(f"error: cannot start: model store {settings.store_uri}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except EngineStartError as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return app[keys.LIFECYCLE].exit_code or EXIT_OK


def _malformed_http_one_line(record: Any) -> bool:
    """aiohttp logs a request it cannot parse (a client's fault, answered 4xx as JSON) with a
    traceback; keep one warning line instead."""
    from aiohttp.http_exceptions import HttpProcessingError

    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.msg, record.args, record.exc_info, record.exc_text = "malformed HTTP request: %s", (exc,), None, None
        record.levelno, record.levelname = 30, "WARNING"
    return True
