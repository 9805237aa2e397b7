"""The ``mirror`` command's entry point: ``serve`` starts here, light.

::

    mirror serve   (not a worker)
      load the config; check the storage folder and the TLS pair
      lock the storage folder (one mirror per folder)            -> exit 2 if in use
      bind listen (and admin.listen) once, without SO_REUSEPORT   -> exit 2 "port in use"
      workers > 1: empty tmp/, create the index, then exec the supervisor
                   (mirror.server.workers, same pid) with those sockets: it imports
                   only the standard library (a small resident size)
      workers = 1: the pid file, then the server in this process (mirror.cli.run_server)
    every other command, and a worker's ``serve``: mirror.cli

A worker (``MIRROR_WORKER`` in its environment) is started by the supervisor with the
same arguments; it serves on the sockets it inherited.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import sys
from pathlib import Path

from mirror import config
from mirror.config import Settings, checks
from mirror.errors import ConfigError, ListenError
from mirror.worker import ENV_INDEX


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and of ``python -m mirror``."""
    args = sys.argv[1:] if argv is None else list(argv)
    serve_args = _serve_args(args)
    if serve_args is None:
        from mirror.cli import main as cli_main  # noqa: PLC0415 (every command)

        return cli_main(args)
    try:
        if ENV_INDEX in os.environ:  # a worker: the supervisor checked, locked and bound
            return serve_worker(load_settings(serve_args.config, serve_args.listen,
                                              serve_args.storage))
        return serve(serve_args.config, serve_args.listen, serve_args.storage)
    except ConfigError as exc:
        print(f"mirror: config error: {exc}", file=sys.stderr)
        return 2
    except ListenError as exc:  # the machine's state, not the file's: exit 2 all the same
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _serve_args(args: list[str]) -> argparse.Namespace | None:
    """The options of ``serve``, or None for anything else (help and mistakes included:
    the full parser of mirror.cli answers those)."""
    if args[:1] != ["serve"] or {"-h", "--help"} & set(args):
        return None
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--listen")
    parser.add_argument("--storage", type=Path)
    parsed, rest = parser.parse_known_args(args[1:])
    return None if rest else parsed


def load_settings(path: Path | None, listen: str | None = None,
                  storage: Path | None = None, *, require_env: bool = True) -> Settings:
    """Settings from a file (or the defaults) with command-line overrides.

    Args:
        require_env: every ``*_env`` variable must be set (``serve``, ``warm``, ``sync``);
            else an unset one leaves its credential out.

    Raises:
        ConfigError: the file or an override is invalid.
    """
    settings = config.load(path, require_env=require_env) if path else \
        config.default_settings()
    if listen:
        host, port = config.parse_listen(listen)
        settings = dataclasses.replace(settings, listen_host=host, listen_port=port)
    if storage:
        settings = dataclasses.replace(settings,
                                       storage=dataclasses.replace(settings.storage, path=storage))
    return settings


def serve(config_path: Path | None, listen: str | None, storage: Path | None) -> int:
    """``mirror serve``: check, lock, bind, then supervise workers or serve in-process.

    Every problem found before serving is one line and exit 2 (a :class:`ConfigError`);
    the ports are bound before anything starts, so ``mirror_started`` is never logged by a
    mirror that cannot listen.
    """
    from mirror import log  # noqa: PLC0415 (not needed by the other commands' start)
    from mirror.server import pidfile  # noqa: PLC0415

    settings = load_settings(config_path, listen, storage)
    checks.check_storage(settings.storage.path, create=True)
    if settings.tls is not None:
        checks.tls_context(settings.tls)
    lock = pidfile.lock_storage(settings.storage.path)
    sockets = _bind(settings)
    log.setup(settings.log)
    pid_path = pidfile.pid_path(settings)
    pidfile.write_pid(pid_path)
    try:
        if settings.server.workers > 1:
            _prepare_storage(settings.storage.path)
            _exec_supervisor(settings, _worker_argv(config_path, listen, storage), sockets,
                             lock, pid_path)
        return run_server(settings, sockets)
    finally:
        pidfile.remove_pid(pid_path)
        os.close(lock)


def serve_worker(settings: Settings) -> int:
    """A worker's ``serve``: on the listening sockets the supervisor passed it."""
    from mirror import worker  # noqa: PLC0415

    return run_server(settings, worker.inherited_sockets())


def run_server(settings: Settings, sockets: list[socket.socket]) -> int:
    """Serve on ``sockets`` (listening already) in this process until SIGTERM or SIGINT.

    Only the server's modules are imported (not the other commands', such as bundles'
    signatures), which keeps an idle worker small.
    """
    import asyncio  # noqa: PLC0415

    import structlog  # noqa: PLC0415
    import uvloop  # noqa: PLC0415
    from aiohttp import web  # noqa: PLC0415

    from mirror import log, worker  # noqa: PLC0415
    from mirror.server.app import create_app  # noqa: PLC0415
    from mirror.server.tls import ServerTls, reload_on_sighup  # noqa: PLC0415
    from mirror.version import VERSION  # noqa: PLC0415

    ssl_context = checks.tls_context(settings.tls) if settings.tls is not None else None
    this = worker.current()
    log.setup(settings.log)
    if this.count > 1:
        structlog.contextvars.bind_contextvars(worker=this.index)  # on its every log line
    loop_factory = uvloop.new_event_loop if settings.server.event_loop == "uvloop" else None
    runner = asyncio.Runner(loop_factory=loop_factory)
    app = create_app(settings)
    # The listener keeps this one context; SIGHUP loads a renewed pair into it.
    tls = ServerTls(settings.tls, ssl_context) if settings.tls and ssl_context else None
    reload_on_sighup(app, tls)

    async def log_stopping(_app: web.Application) -> None:
        structlog.get_logger(__name__).info("mirror_stopping", version=VERSION,
                                            hint="finishing requests for up to 10 s")

    app.on_shutdown.append(log_stopping)  # the node logs mirror_stopped when it is done
    web.run_app(app, sock=sockets, ssl_context=ssl_context, access_log=None,
                print=None, shutdown_timeout=10, loop=runner.get_loop(),
                handler_cancellation=True)
    return 0


def _prepare_storage(root: Path) -> None:
    """Once for the node, before any worker starts: empty ``tmp/`` (writes left by a crash
    of every process), and create the index, so that workers opening it at once never
    race to create it and switch it to WAL mode ("database is locked")."""
    from mirror.storage.index import INDEX_NAME, Index  # noqa: PLC0415

    tmp = root / "tmp"
    if tmp.exists():
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    index = Index(root / INDEX_NAME)
    index.open()
    index.close()


def _exec_supervisor(settings: Settings, argv: list[str], sockets: list[socket.socket],
                     lock: int, pid_path: Path) -> None:
    """Become the supervisor (:mod:`mirror.server.workers`): same pid, none of the
    modules this process has loaded."""
    from mirror.server import workers  # noqa: PLC0415

    as_json = settings.log.format == "json" or (settings.log.format == "auto"
                                                and not sys.stderr.isatty())
    workers.exec_supervisor(workers.Plan(
        count=settings.server.workers, argv=argv, fds=[s.fileno() for s in sockets],
        keep_fds=[lock], listen=f"{settings.listen_host}:{settings.listen_port}",
        shutdown_grace=settings.server.shutdown_grace, log_level=settings.log.level,
        log_json=as_json, pid_file=str(pid_path)))


def _bind(settings: Settings) -> list[socket.socket]:
    """The listening sockets: ``listen``, then ``admin.listen`` if set."""
    sockets = [checks.bind(settings.listen_host, settings.listen_port)]
    if settings.admin is not None and settings.admin.listen is not None:
        # The admin address is a second socket of the same app: the edge middleware
        # tells them apart by local port.
        sockets.append(checks.bind(*settings.admin.listen))
    return sockets


def _worker_argv(config_path: Path | None, listen: str | None,
                 storage: Path | None) -> list[str]:
    """The ``mirror`` arguments that start a worker with the same settings."""
    argv = ["serve"]
    for flag, value in (("--config", config_path), ("--listen", listen),
                        ("--storage", storage)):
        if value is not None:
            argv += [flag, str(value)]
    return argv
