"""The ``mirror`` command.

::

    mirror serve [--config FILE] [--listen HOST:PORT] [--storage DIR]
    mirror config check FILE

Errors are one readable line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ssl
import sys
from pathlib import Path

import uvloop
from aiohttp import web

from mirror import config, log
from mirror.errors import ConfigError
from mirror.server.app import create_app


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.func(args)
        return result
    except ConfigError as exc:
        print(f"mirror: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through OCI registry mirror")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the mirror")
    serve.add_argument("--config", type=Path, help="YAML config (default: built-in Docker Hub "
                       "mirror with a local cache in ./mirror-data)")
    serve.add_argument("--listen", help="HOST:PORT, overrides the config")
    serve.add_argument("--storage", type=Path, help="cache folder, overrides the config")
    serve.set_defaults(func=_serve)

    cfg = commands.add_parser("config", help="work with config files")
    cfg_commands = cfg.add_subparsers(required=True, metavar="ACTION")
    check = cfg_commands.add_parser("check", help="validate a config file")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_config_check)
    return parser


def load_settings(path: Path | None, listen: str | None = None,
                  storage: Path | None = None) -> config.Settings:
    """Settings from a file (or the defaults) with command-line overrides.

    Raises:
        ConfigError: the file or an override is invalid.
    """
    settings = config.load(path) if path else config.default_settings()
    if listen:
        host, port = config.parse_listen(listen)
        settings = dataclasses.replace(settings, listen_host=host, listen_port=port)
    if storage:
        settings = dataclasses.replace(settings, storage=config.StorageSettings(path=storage))
    return settings


def _config_check(args: argparse.Namespace) -> int:
    settings = config.load(args.file)
    names = ", ".join(u.name + (" (default)" if u.default else "") for u in settings.upstreams)
    print(f"{args.file}: ok; upstreams: {names}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, args.listen, args.storage)
    log.setup(settings.log)
    ssl_context = None
    if settings.tls is not None:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(settings.tls.cert, settings.tls.key)
    loop_factory = None
    if settings.server.event_loop == "uvloop":
        loop_factory = uvloop.new_event_loop
    runner = asyncio.Runner(loop_factory=loop_factory)
    web.run_app(create_app(settings), host=settings.listen_host, port=settings.listen_port,
                ssl_context=ssl_context, access_log=None, print=None, shutdown_timeout=10,
                loop=runner.get_loop())
    return 0
