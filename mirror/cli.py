"""The ``mirror`` command.

::

    mirror serve [--config FILE] [--listen HOST:PORT] [--storage DIR]
    mirror config check FILE
    mirror cache ls|du [--json] [--config FILE] [--storage DIR]
    mirror cache fsck [--config FILE] [--storage DIR]
    mirror cache pin|unpin|evict REF|DIGEST [--config FILE] [--storage DIR] [--shared]
    mirror warm REF... [--platform OS/ARCH]... [--referrers] [--server URL] [--config FILE]
    mirror sync --once [--dry-run] | status  [--json] [--server URL] [--config FILE]

Errors are one readable line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import structlog
import uvloop
from aiohttp import web

from mirror import config, log, sync_cli
from mirror import worker as this_worker
from mirror.cache.inventory import Inventory, human_size, human_time
from mirror.cache.membership import FILE_NAME as MEMBERSHIP_FILE
from mirror.cache.membership import Membership
from mirror.config import checks
from mirror.errors import CacheCommandError, ConfigError, OciError
from mirror.routing import Router
from mirror.server import workers
from mirror.server.app import create_app


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if getattr(args, "with_settings", False):
            settings = load_settings(args.config, storage=args.storage)
            # What failed is in the command's own summary; the log would say it twice.
            log.setup(dataclasses.replace(settings.log, level="error"))
            result: int = args.func(args, settings)
            return result
        result = args.func(args)
        return result
    except ConfigError as exc:
        print(f"mirror: config error: {exc}", file=sys.stderr)
        return 2
    except CacheCommandError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mirror cache ls | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


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
    _cache_parser(commands)
    sync_cli.add_parsers(commands, _warm_options)
    return parser


def _warm_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config, as for serve")
    parser.add_argument("--storage", type=Path, help="cache folder, overrides the config")
    sync_cli.add_server_option(parser)
    parser.set_defaults(with_settings=True)


def _cache_parser(commands: Any) -> None:
    cache = commands.add_parser("cache", help="inspect and manage the local cache (safe while "
                                "the server runs)")
    actions = cache.add_subparsers(required=True, metavar="ACTION")
    helps = {
        "ls": ("images and blobs with size and last use", _cache_ls, False),
        "du": ("bytes used, pinned, and the limit", _cache_du, False),
        "pin": ("keep an image (index, manifests, configs, layers) or a digest from eviction",
                _cache_pin, True),
        "unpin": ("drop the pins an image reference or digest made", _cache_unpin, True),
        "evict": ("delete an image's or a digest's content now (pinned content, and "
                  "content other cached images use, stays)", _cache_evict, True),
        "fsck": ("re-hash everything stored and remove what does not match", _cache_fsck,
                 False),
    }
    for name, (text, func, takes_ref) in helps.items():
        action = actions.add_parser(name, help=text)
        if takes_ref:
            action.add_argument("ref", help="an image reference in any form Docker takes "
                                "(nginx:1.27, library/nginx:1.27, docker.io/nginx:1.27, "
                                "nginx@sha256:...) or a digest (sha256:...)")
        action.add_argument("--config", type=Path, help="YAML config, as for serve")
        action.add_argument("--storage", type=Path, help="cache folder, overrides the config")
        if name in ("ls", "du"):
            action.add_argument("--json", action="store_true",
                                help="print JSON, with a breakdown by registry")
        if name == "evict":
            action.add_argument("--shared", action="store_true",
                                help="also delete layers and configs other cached images use")
        action.set_defaults(func=func)


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
        settings = dataclasses.replace(settings,
                                       storage=dataclasses.replace(settings.storage, path=storage))
    return settings


def _config_check(args: argparse.Namespace) -> int:
    settings = config.load(args.file)
    checks.check_machine(settings)
    names = ", ".join(u.name + (" (default)" if u.default else "") for u in settings.upstreams)
    print(f"{args.file}: ok; upstreams: {names}")
    return 0


def _inventory(args: argparse.Namespace) -> Inventory:
    settings = load_settings(args.config, storage=args.storage)
    router = Router(settings.upstreams)

    def parse_ref(text: str) -> tuple[str, str, str]:
        name, at, reference = text.partition("@")
        if not at:
            slash, colon = text.rfind("/"), text.rfind(":")
            name, reference = (text[:colon], text[colon + 1:]) if colon > slash \
                else (text, "latest")
        try:
            target = router.route(f"/v2/{name}/manifests/{reference}")
        except OciError as exc:
            raise CacheCommandError(f"{text!r} is not an image reference this mirror serves: "
                                    f"{exc.message}") from None
        assert target.upstream is not None
        return target.upstream.name, target.repository, target.reference

    return Inventory(settings.storage, parse_ref)


def _cache_ls(args: argparse.Namespace) -> int:
    if args.json:
        return _print_json(_listing(args))
    inventory = _inventory(args)
    try:
        pins = inventory.pinned()
        images = inventory.images()
        print(f"IMAGES ({len(images)})")
        for ref, digest, size, pinned in images:
            print(f"  {ref}  {digest}  {human_size(size)}{'  pinned' if pinned else ''}")
        entries = inventory.entries()
        print(f"CONTENT ({len(entries)}, most recently used first)")
        for entry in entries:
            print(f"  {entry.kind:<8} {entry.digest}  {human_size(entry.size):>10}  "
                  f"{human_time(entry.last_use)}{'  pinned' if entry.digest in pins else ''}")
    finally:
        inventory.close()
    return 0


def _cache_du(args: argparse.Namespace) -> int:
    inventory = _inventory(args)
    try:
        usage = inventory.usage()
    finally:
        inventory.close()
    storage = inventory.settings
    by_registry = _bytes_by_registry(args)
    if args.json:
        return _print_json({**usage, "path": str(storage.path), "max_size": storage.max_size,
                            "by_registry": by_registry})
    total = usage["blob_bytes"] + usage["manifest_bytes"]
    print(f"cache:       {storage.path}")
    print(f"content:     {human_size(total)} ({total} bytes) in "
          f"{usage['blobs'] + usage['manifests']} entries")
    print(f"  blobs:     {human_size(usage['blob_bytes'])} in {usage['blobs']}")
    print(f"  manifests: {human_size(usage['manifest_bytes'])} in {usage['manifests']}")
    print(f"pinned:      {human_size(usage['pinned_bytes'])}")
    print(f"downloading: {human_size(usage['downloading_bytes'])}")
    if storage.max_size is None:
        print("limit:       none (storage.max_size is not set)")
    else:
        print(f"limit:       {human_size(storage.max_size)} ({100 * total / storage.max_size:.1f}"
              f"% used; evicts above {storage.high_watermark:.0%} down to "
              f"{storage.low_watermark:.0%})")
    print("by registry (content of several registries counts under each):")
    for registry, size in by_registry.items():
        print(f"  {registry:<30} {human_size(size):>10}")
    return 0


def _membership(args: argparse.Namespace) -> tuple[config.Settings, Membership | None]:
    settings = load_settings(args.config, storage=args.storage)
    path = settings.storage.path / MEMBERSHIP_FILE
    if not path.is_file():
        return settings, None
    membership = Membership(path)
    membership.open()
    return settings, membership


def _bytes_by_registry(args: argparse.Namespace) -> dict[str, int]:
    settings, membership = _membership(args)
    names = [u.name for u in settings.upstreams]
    if membership is None:
        return dict.fromkeys([*names, "other"], 0)
    try:
        return membership.bytes_by_registry(settings.storage.path / "index.db", names)
    finally:
        membership.close()


def _listing(args: argparse.Namespace) -> dict[str, Any]:
    """What ``cache ls --json`` prints: images by registry, content with its registries."""
    inventory = _inventory(args)
    try:
        pins = inventory.pinned()
        images = inventory.images()
        entries = inventory.entries()
    finally:
        inventory.close()
    _settings, membership = _membership(args)
    try:
        owners = membership.registries_of() if membership is not None else {}
    finally:
        if membership is not None:
            membership.close()
    by_registry: dict[str, list[dict[str, Any]]] = {}
    for ref, digest, size, pinned in images:
        registry = ref.split("/", 1)[0]
        by_registry.setdefault(registry, []).append(
            {"reference": ref, "digest": digest, "bytes": size, "pinned": pinned})
    content = [{"kind": e.kind, "digest": e.digest, "bytes": e.size, "last_use": e.last_use,
                "pinned": e.digest in pins, "registries": sorted(owners.get(e.digest, ()))}
               for e in entries]
    return {"images": by_registry, "content": content}


def _print_json(document: Any) -> int:
    print(json.dumps(document, indent=2, sort_keys=True))
    return 0


def _cache_pin(args: argparse.Namespace) -> int:
    inventory = _inventory(args)
    try:
        resolved, size = inventory.pin(args.ref)
    finally:
        inventory.close()
    note = f"; {len(resolved.missing)} referenced item(s) not cached" if resolved.missing else ""
    print(f"pinned {resolved.label}: {len(resolved.keys)} item(s), {human_size(size)}{note}")
    return 0


def _cache_unpin(args: argparse.Namespace) -> int:
    inventory = _inventory(args)
    try:
        label, count = inventory.unpin(args.ref)
    finally:
        inventory.close()
    if count == 0:
        raise CacheCommandError(f"{label} is not pinned")
    print(f"unpinned {label}: {count} pin(s) removed")
    return 0


def _cache_evict(args: argparse.Namespace) -> int:
    inventory = _inventory(args)
    try:
        done = inventory.evict(args.ref, shared=args.shared)
    finally:
        inventory.close()
    note = f"; {done.kept_pinned} pinned item(s) kept (unpin first)" if done.kept_pinned else ""
    if done.kept_shared:
        note += (f"; {done.kept_shared} item(s) kept that other cached images use "
                 "(--shared removes them too)")
    print(f"evicted {done.resolved.label}: {human_size(done.freed)} freed{note}")
    return 0


def _cache_fsck(args: argparse.Namespace) -> int:
    inventory = _inventory(args)
    try:
        report = inventory.fsck()
    finally:
        inventory.close()
    for item in report["removed"]:
        print(f"removed {item}: its bytes do not match its digest")
    print(f"fsck: checked {report['checked']} item(s), {human_size(report['bytes'])}; "
          f"removed {len(report['removed'])} corrupt; dropped {report['dropped']} index "
          f"entr(ies) without a file; adopted {report['adopted']} file(s) without an entry")
    return 1 if report["removed"] else 0


def _serve(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, args.listen, args.storage)
    # Every problem found here is one line and exit 2 (main); the port is bound before
    # the app starts, so ``mirror_started`` is never logged by a mirror that cannot listen.
    checks.check_storage(settings.storage.path, create=True)
    ssl_context = checks.tls_context(settings.tls) if settings.tls is not None else None
    worker = this_worker.current()
    if settings.server.workers > 1 and worker.count == 1:
        supervisor = workers.Supervisor(settings, _serve_argv(args), bind=checks.bind)
        supervisor.bind_first()
        log.setup(settings.log)
        return supervisor.run()
    if worker.count > 1:  # a worker: the supervisor's sockets, listening already
        socks = this_worker.inherited_sockets()
    else:
        socks = [checks.bind(settings.listen_host, settings.listen_port)]
        if settings.admin is not None and settings.admin.listen is not None:
            # The admin address is a second socket of the same app: the edge middleware
            # tells them apart by local port.
            socks.append(checks.bind(*settings.admin.listen))
    log.setup(settings.log)
    if worker.count > 1:
        structlog.contextvars.bind_contextvars(worker=worker.index)  # on its every log line
    loop_factory = None
    if settings.server.event_loop == "uvloop":
        loop_factory = uvloop.new_event_loop
    runner = asyncio.Runner(loop_factory=loop_factory)
    web.run_app(create_app(settings), sock=socks, ssl_context=ssl_context, access_log=None,
                print=None, shutdown_timeout=10, loop=runner.get_loop(),
                handler_cancellation=True)
    return 0


def _serve_argv(args: argparse.Namespace) -> list[str]:
    """The ``mirror`` arguments that start a worker with the same settings."""
    argv = ["serve"]
    for flag, value in (("--config", args.config), ("--listen", args.listen),
                        ("--storage", args.storage)):
        if value is not None:
            argv += [flag, str(value)]
    return argv
