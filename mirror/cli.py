"""The ``mirror`` command.

::

    mirror --version
    mirror serve [--config FILE] [--listen HOST:PORT] [--storage DIR]
    mirror reload [--config FILE] [--storage DIR]
    mirror config check FILE [--no-env]
    mirror cache ls|du [--json] [--config FILE] [--storage DIR]
    mirror cache fsck [--config FILE] [--storage DIR]
    mirror cache pin|unpin|evict REF|DIGEST [--config FILE] [--storage DIR] [--shared]
    mirror warm REF... [--platform OS/ARCH]... [--referrers] [--server URL] [--config FILE]
    mirror sync --once [--dry-run] | status  [--json] [--server URL] [--config FILE]
    mirror export REF... | --from-file LIST [--platform P]... [--referrers] [--policy]
                  [--since PREVIOUS] [--max-part-size SIZE] [--sign-key KEY]
                  [--dry-run] -o FILE.tar[.zst]
    mirror import FILE... [--verify-key PUB] [--allow-rollback] [--pin]
                  [--tags fresh|stale] [--repository REGISTRY/REPO] [--no-policy]
    mirror audit verify FILE...

Errors are one readable line on stderr and a non-zero exit status (``config check``:
one line per error it finds). ``serve`` reloads its TLS certificate and key on SIGHUP
(``mirror reload`` sends it to the pid in ``server.pid_file``) and stops gracefully on
SIGTERM. ``serve`` starts in :mod:`mirror.launch`, which serves without importing this
module. Only ``serve``, ``warm`` and ``sync`` need the environment variables the config
names (``*_env``): the other commands never fetch with upstream credentials, and an unset
variable only makes that credential absent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from mirror import audit as audit_trail
from mirror import config, launch, log, sync_cli
from mirror import worker as this_worker
from mirror.bundle.export import Planner
from mirror.bundle.export import write as export_write
from mirror.bundle.importer import Importer, read_bundle_json
from mirror.bundle.importer import Report as ImportReport
from mirror.bundle.manifest import BundleManifest, key_id, load_private_key, load_public_key
from mirror.bundle.parts import expand
from mirror.bundle.progress import Progress
from mirror.cache.inventory import ImageRow, Inventory, human_size, human_time
from mirror.config import checks
from mirror.errors import (
    BundleError,
    CacheCommandError,
    ConfigError,
    ListenError,
    OciError,
    PolicyDenied,
)
from mirror.node import Node, policy_gate
from mirror.routing import Router
from mirror.server import pidfile
from mirror.storage.filesystem import FilesystemStore
from mirror.storage.index import WARM_PIN
from mirror.version import VERSION


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
    except ListenError as exc:  # not a config error, but `serve`'s exit 2 all the same
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except (CacheCommandError, BundleError) as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `mirror cache ls | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through OCI registry mirror")
    parser.add_argument("--version", action="version", version=f"mirror {VERSION}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the mirror")
    serve.add_argument("--config", type=Path, help="YAML config (default: built-in Docker Hub "
                       "mirror with a local cache in ./mirror-data)")
    serve.add_argument("--listen", help="HOST:PORT, overrides the config")
    serve.add_argument("--storage", type=Path, help="cache folder, overrides the config")
    serve.set_defaults(func=_serve)

    reload = commands.add_parser(
        "reload", help="reload the running mirror's TLS certificate and key (SIGHUP)",
        description="Send SIGHUP to the mirror that serves this config: the pid in "
        "server.pid_file (default: mirror.pid in the storage folder).")
    reload.add_argument("--config", type=Path, help="YAML config, as for serve")
    reload.add_argument("--storage", type=Path, help="cache folder, as for serve")
    reload.set_defaults(func=_reload)

    audit = commands.add_parser("audit", help="check the audit trail")
    audit_commands = audit.add_subparsers(required=True, metavar="ACTION")
    verify = audit_commands.add_parser(
        "verify", help="check the hash chain of audit files (one line each: intact, or "
        "where it breaks)")
    verify.add_argument("files", type=Path, nargs="+", metavar="FILE")
    verify.set_defaults(func=_audit_verify)

    cfg = commands.add_parser("config", help="work with config files")
    cfg_commands = cfg.add_subparsers(required=True, metavar="ACTION")
    check = cfg_commands.add_parser("check", help="validate a config file (every error it "
                                    "finds, one a line)")
    check.add_argument("file", type=Path)
    check.add_argument("--no-env", action="store_true",
                       help="do not require the environment variables the file names "
                       "(*_env): check the file on a machine without the secrets")
    check.set_defaults(func=_config_check)
    _cache_parser(commands)
    sync_cli.add_parsers(commands, _warm_options)
    _bundle_parsers(commands)
    return parser


def _warm_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML config, as for serve")
    parser.add_argument("--storage", type=Path, help="cache folder, overrides the config")
    sync_cli.add_server_option(parser)


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


def _bundle_parsers(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="write images to an OCI image-layout tar for an air-gapped site",
        description="Write images (through this mirror's cache, fetching what is missing) "
        "to an OCI image layout in a tar, with bundle.json listing every blob. Safe while "
        "the server runs.")
    export.add_argument("refs", nargs="*", metavar="REF",
                        help="nginx:1.27, ghcr.io/org/app:v1, app@sha256:... (as docker pull)")
    export.add_argument("--from-file", type=Path, metavar="LIST",
                        help="a file of references, one a line (# comments)")
    export.add_argument("--platform", action="append", default=[], metavar="OS/ARCH[/VAR]",
                        help="only these platforms of multi-platform images (repeatable; "
                        "the index bytes are kept as they are)")
    export.add_argument("--policy", action="store_true",
                        help="export only the images the config's signature policy allows, "
                        "with their signatures (implies --referrers); say which were refused")
    export.add_argument("--referrers", action="store_true",
                        help="bring signatures, SBOMs and attestations (referrers API and "
                        "cosign's sha256-<hex>.sig/.att/.sbom tags)")
    export.add_argument("--since", type=Path, metavar="PREVIOUS",
                        help="a previous bundle (or its bundle.json): leave out the blobs it "
                        "and its bases shipped (a differential)")
    export.add_argument("--max-part-size", metavar="SIZE",
                        help="split into FILE.001, FILE.002 ... of at most SIZE (4GiB), with "
                        "FILE.sha256 listing each part's checksum")
    export.add_argument("--sign-key", type=Path, metavar="KEY",
                        help="ed25519 private key (PEM) to sign bundle.json with")
    export.add_argument("--dry-run", action="store_true",
                        help="say what would be exported and how many bytes, write nothing")
    export.add_argument("-o", "--output", type=Path, metavar="FILE.tar[.zst]",
                        help="the bundle (.zst: zstd-compressed)")
    export.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    export.add_argument("--config", type=Path, help="YAML config, as for serve")
    export.add_argument("--storage", type=Path, help="cache folder, overrides the config")
    export.set_defaults(func=_export)

    imp = commands.add_parser(
        "import", help="load bundles (ours, skopeo's oci-archive, oras's layout) into the cache",
        description="Verify bundles and load them into the cache, with their tags, so that "
        "this mirror serves them without its upstreams. Nothing is published from a bad "
        "bundle; a second run after an interruption finishes the job. Safe while the "
        "server runs. With a policy: section in the config, every image is judged offline "
        "with the signatures the bundle carries: one an enforce rule refuses is not "
        "imported (one line each says why). Exit status: 0 imported; 1 a bad bundle, "
        "nothing published; 3 imported, but the policy refused one or more images.")
    imp.add_argument("files", nargs="+", type=Path, metavar="FILE",
                     help="FILE.tar[.zst|.gz] or its first part FILE.001; several in order")
    imp.add_argument("--verify-key", type=Path, metavar="PUB",
                     help="refuse a bundle not signed by this ed25519 public key (PEM)")
    imp.add_argument("--allow-rollback", action="store_true",
                     help="move a tag back to what this bundle says even when a newer bundle "
                     "of the same signer set it")
    imp.add_argument("--pin", action="store_true", help="pin imported images (never evicted)")
    imp.add_argument("--tags", choices=("fresh", "stale"), default="fresh",
                     help="fresh: imported tags are answered without upstream for "
                     "cache.tag_ttl, then revalidated; stale: revalidated at their first "
                     "pull when upstream is reachable. Either way served while it is not "
                     "(up to cache.stale_if_error)")
    imp.add_argument("--repository", metavar="REGISTRY/REPO",
                     help="where bare-tag ref names of another tool's layout belong")
    imp.add_argument("--no-policy", action="store_true",
                     help="import every image as the bundle says, without the config's "
                     "signature policy")
    imp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    imp.add_argument("--config", type=Path, help="YAML config, as for serve")
    imp.add_argument("--storage", type=Path, help="cache folder, overrides the config")
    imp.set_defaults(func=_import)


def load_settings(path: Path | None, listen: str | None = None,
                  storage: Path | None = None, *, require_env: bool = True) -> config.Settings:
    """Settings from a file (or the defaults) with command-line overrides.

    Args:
        require_env: every ``*_env`` variable must be set (``serve``, ``warm``, ``sync``);
            else an unset one leaves its credential out.

    Raises:
        ConfigError: the file or an override is invalid.
    """
    return launch.load_settings(path, listen, storage, require_env=require_env)


def _config_check(args: argparse.Namespace) -> int:
    settings, errors = config.check(args.file, require_env=not args.no_env)
    if settings is not None:
        errors += checks.machine_errors(settings)
    for error in errors:
        print(f"mirror: config error: {error}", file=sys.stderr)
    if errors or settings is None:
        if len(errors) > 1:
            print(f"mirror: {args.file}: {len(errors)} errors", file=sys.stderr)
        return 2
    names = ", ".join(u.name + (" (default)" if u.default else "") for u in settings.upstreams)
    print(f"{args.file}: ok; upstreams: {names}")
    return 0


def _inventory(args: argparse.Namespace) -> Inventory:
    """The cache of the command's config, read as the server routes references; use it
    in a ``with`` block."""
    settings = load_settings(args.config, storage=args.storage, require_env=False)
    router = Router(settings.upstreams)

    def parse_ref(text: str) -> tuple[str, str, str]:
        try:
            target = router.image(text)
        except OciError as exc:
            raise CacheCommandError(f"{text!r} is not an image reference this mirror serves: "
                                    f"{exc.message}") from None
        assert target.upstream is not None
        return target.upstream.name, target.repository, target.reference

    return Inventory(settings.storage, parse_ref, [u.name for u in settings.upstreams])


def _cache_ls(args: argparse.Namespace) -> int:
    with _inventory(args) as inventory:
        if args.json:
            return _print_json(inventory.listing())
        pins = inventory.pinned()
        images = inventory.images()
        print(f"IMAGES ({len(images)})")
        for row in images:
            print(f"  {row.reference}  {row.digest}  {human_size(row.size)}  "
                  f"{_image_state(row)}{_pin_note(row.pins)}")
        entries = inventory.entries()
        print(f"CONTENT ({len(entries)}, most recently used first)")
        for entry in entries:
            print(f"  {entry.kind:<8} {entry.digest}  {human_size(entry.size):>10}  "
                  f"{human_time(entry.last_use)}{'  pinned' if entry.digest in pins else ''}")
    return 0


def _image_state(row: ImageRow) -> str:
    """``complete``, ``complete (1 of 4 platforms)``, ``partial: 2 blobs missing``,
    ``evicted: manifest gone``."""
    if row.state == "evicted":
        return "evicted: manifest gone"
    platforms = f" ({row.platforms[0]} of {row.platforms[1]} platforms)" \
        if row.platforms and row.platforms[0] < row.platforms[1] else ""
    if row.state == "partial":
        gone = f": {row.missing_blobs} blob(s) missing" if row.missing_blobs else ""
        return f"partial{gone}{platforms}"
    return f"complete{platforms}"


def _pin_note(sources: tuple[str, ...]) -> str:
    """``  pinned by REF``, ``  pinned by warm-until:EPOCH:REF (until 2026-...)``."""
    if not sources:
        return ""
    notes = []
    for source in sources:
        if source.startswith(WARM_PIN):
            stamp = source[len(WARM_PIN):].partition(":")[0]
            until = human_time(float(stamp)).split(" ")[0] if stamp.isdigit() else "?"
            notes.append(f"{source} (until {until})")
        else:
            notes.append(source)
    return f"  pinned by {', '.join(notes)}"


def _cache_du(args: argparse.Namespace) -> int:
    with _inventory(args) as inventory:
        usage = inventory.disk_usage()
    if args.json:
        return _print_json(usage)
    total, limit, storage = usage["blob_bytes"] + usage["manifest_bytes"], usage["max_size"], \
        inventory.settings
    print(f"cache:       {usage['path']}")
    print(f"content:     {human_size(total)} ({total} bytes) in "
          f"{usage['blobs'] + usage['manifests']} entries")
    print(f"  blobs:     {human_size(usage['blob_bytes'])} in {usage['blobs']}")
    print(f"  manifests: {human_size(usage['manifest_bytes'])} in {usage['manifests']}")
    print(f"pinned:      {human_size(usage['pinned_bytes'])}")
    print(f"downloading: {human_size(usage['downloading_bytes'])}")
    if limit is None:
        print("limit:       none (storage.max_size: none)")
    else:
        print(f"limit:       {human_size(limit)} ({usage['max_size_from']}; "
              f"{100 * total / limit:.1f}% used; evicts above "
              f"{storage.high_watermark:.0%} down to {storage.low_watermark:.0%})")
    print("by registry (content of several registries counts under each):")
    for registry, size in usage["by_registry"].items():
        print(f"  {registry:<30} {human_size(size):>10}")
    return 0


def _print_json(document: Any) -> int:
    print(json.dumps(document, indent=2, sort_keys=True))
    return 0


def _cache_pin(args: argparse.Namespace) -> int:
    with _inventory(args) as inventory:
        resolved, size = inventory.pin(args.ref)
    note = f"; {len(resolved.missing)} referenced item(s) not cached" if resolved.missing else ""
    print(f"pinned {resolved.label}: {len(resolved.keys)} item(s), {human_size(size)}{note}")
    return 0


def _cache_unpin(args: argparse.Namespace) -> int:
    with _inventory(args) as inventory:
        label, count = inventory.unpin(args.ref)
    if count == 0:
        raise CacheCommandError(f"{label} is not pinned")
    print(f"unpinned {label}: {count} pin(s) removed")
    return 0


def _cache_evict(args: argparse.Namespace) -> int:
    with _inventory(args) as inventory:
        done = inventory.evict(args.ref, shared=args.shared)
    note = f"; {done.kept_pinned} pinned item(s) kept (unpin first)" if done.kept_pinned else ""
    if done.kept_shared:
        note += (f"; {done.kept_shared} item(s) kept that other cached images use "
                 "(--shared removes them too)")
    print(f"evicted {done.resolved.label}: {human_size(done.freed)} freed{note}")
    return 0


def _cache_fsck(args: argparse.Namespace) -> int:
    with _inventory(args) as inventory:
        report = inventory.fsck()
    for item in report["removed"]:
        print(f"removed {item}: its bytes do not match its digest")
    print(f"fsck: checked {report['checked']} item(s), {human_size(report['bytes'])}; "
          f"removed {len(report['removed'])} corrupt; dropped {report['dropped']} index "
          f"entr(ies) without a file; adopted {report['adopted']} file(s) without an entry")
    return 1 if report["removed"] else 0


def _serve(args: argparse.Namespace) -> int:
    if this_worker.current().count > 1:  # a worker: it serves on the supervisor's sockets
        return launch.serve_worker(load_settings(args.config, args.listen, args.storage))
    return launch.serve(args.config, args.listen, args.storage)


def _reload(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, storage=args.storage)
    try:
        pid = pidfile.signal_running(settings)
    except pidfile.NotRunning as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 1
    print(f"reload: sent SIGHUP to the mirror (pid {pid})")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        found = audit_trail.verify(path)
        print(f"audit: {found.message}", file=sys.stdout if found.ok else sys.stderr)
        failed = failed or not found.ok
    return 1 if failed else 0


def _export(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, storage=args.storage, require_env=False)
    log.setup(config.LogSettings(level="warning", format=settings.log.format))
    refs = list(args.refs)
    if args.from_file is not None:
        try:
            lines = args.from_file.read_text().splitlines()
        except OSError as exc:
            raise BundleError(f"{args.from_file}: {exc.strerror}") from None
        refs += [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]
    if not refs:
        raise BundleError("nothing to export: name images, or --from-file LIST")
    if args.output is None and not args.dry_run:
        raise BundleError("say where the bundle goes: -o FILE.tar or FILE.tar.zst")
    if args.output is not None and not args.output.parent.resolve().is_dir():
        raise BundleError(f"{args.output.parent}: no such folder")
    key = load_private_key(args.sign_key) if args.sign_key else None
    base = _base_bundle(args.since) if args.since is not None else None
    max_part = config.parse_size(args.max_part_size, "--max-part-size") \
        if args.max_part_size else None
    return asyncio.run(_export_async(args, settings, refs, key, base=base, max_part=max_part))


def _base_bundle(path: Path) -> BundleManifest:
    """The bundle.json given to ``--since``, or the one inside a bundle given instead."""
    try:
        with path.open("rb") as file:
            data = file.read(1)
    except OSError as exc:
        raise BundleError(f"{path}: {exc.strerror}") from None
    data = path.read_bytes() if data == b"{" else read_bundle_json(expand([path])[0])
    return BundleManifest.parse(data, str(path))


async def _export_async(args: argparse.Namespace, settings: config.Settings, refs: list[str],
                        key: Any, *, base: BundleManifest | None, max_part: int | None) -> int:
    node = Node(settings)
    await node.start(exclusive=False)
    try:
        if not args.policy:
            node.pull.gate = None  # exported as asked; --policy applies the config's
        elif node.pull.gate is None:
            raise BundleError("export --policy: the config has no policy: section")
        planner = Planner(node.pull, node.router, args.platform,
                          args.referrers or args.policy)
        refused = 0
        for ref in refs:
            try:
                await planner.add(ref)
            except PolicyDenied as exc:
                refused += 1
                print(f"  refused: {ref}: {exc.message}", file=sys.stderr)
        if refused and not planner.plan.references:
            raise BundleError(f"nothing to export: the policy refused all {refused} image(s)")
        if base is not None:
            planner.since(base)
        plan = planner.plan
        for item in plan.references:
            print(f"  {item['name']}  {item['digest']}")
        blobs = len(plan.manifests) + len(plan.blobs) - len(plan.omitted)
        omitted = sum(plan.omitted.values())
        print(f"{len(plan.references)} reference(s), {len(plan.manifests)} manifest(s), "
              f"{len(plan.blobs)} blob(s); {blobs} to write, {human_size(plan.included())}"
              + (f"; {len(plan.omitted)} left out ({human_size(omitted)}, in base "
                 f"{base.id} seq {base.sequence})" if base is not None else ""))
        if args.dry_run:
            return 0
        bar = Progress("export", plan.included(), quiet=args.quiet)
        files = await export_write(node.pull, plan, args.output, platforms=args.platform,
                                   base=base, max_part_size=max_part, key=key,
                                   progress=lambda done, _total: bar.set(done))
        bar.finish()
    finally:
        await node.stop()
    for file in files:
        print(f"wrote {file} ({human_size(file.stat().st_size)})")
    if key is not None:
        print(f"signed bundle.json with key {key_id(key.public_key())}")
    return 0


def _import(args: argparse.Namespace) -> int:
    settings = load_settings(args.config, storage=args.storage, require_env=False)
    key = load_public_key(args.verify_key) if args.verify_key else None
    trusted = [load_public_key(path) for path in settings.imports.trusted_keys]
    if key is not None and trusted and key_id(key) not in {key_id(k) for k in trusted}:
        raise BundleError(f"--verify-key {args.verify_key}: not one of import.trusted_keys")
    groups = expand(args.files)
    gate = None if args.no_policy else policy_gate(settings)
    refused = 0
    store = FilesystemStore(settings.storage.path)
    store.open_shared()
    try:
        importer = Importer(store, Router(settings.upstreams), verify_key=key,
                            trusted_keys=trusted, allow_rollback=args.allow_rollback,
                            pin=args.pin,
                            tag_state=args.tags, tag_ttl=settings.cache.tag_ttl,
                            repository=args.repository, gate=gate)
        with importer.locked():
            for group in groups:
                bar = Progress(f"import {group[0].name}", 1, quiet=args.quiet)

                def step(done: int, total: int, bar: Progress = bar) -> None:
                    bar.total = max(total, 1)
                    bar.set(done)

                importer.progress = step
                report = importer.run(group)
                bar.finish()
                _print_import(group[0], report)
                refused += len(report.refused)
    finally:
        store.index.close()
    if refused:
        print(f"mirror: import: the policy refused {refused} image(s); the others were "
              "imported", file=sys.stderr)
        return 3
    return 0



def _print_import(file: Path, report: ImportReport) -> None:
    if report.key_id is not None:
        print(f"{file}: signature of bundle.json verified with key {report.key_id}")
    elif report.signed:
        print(f"{file}: bundle.json is signed; no --verify-key given, so not checked")
    bundle = f" (bundle {report.bundle_id} seq {report.sequence})" if report.bundle_id else ""
    print(f"imported {file}{bundle}: {report.blobs_new} new blob(s) and "
          f"{report.manifests_new} manifest(s), {human_size(report.bytes_new)}, each hashed "
          f"and verified; {report.skipped} already cached")
    for line in report.refused:
        print(f"  refused: {line}", file=sys.stderr)
    for line in report.warned:
        print(f"  warning: imported, but {line}", file=sys.stderr)
    if report.withheld:
        print(f"  {report.withheld} blob(s) and manifest(s) only refused images reach were "
              "not imported")
    for tag in report.tags:
        print(f"  tag {tag}")
    if report.pinned:
        print(f"  pinned {report.pinned} image(s)")
    for note in report.notes:
        print(f"  note: {note}")
