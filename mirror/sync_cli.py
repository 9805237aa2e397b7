"""``mirror warm`` and ``mirror sync``: warming on demand, one sync pass, sync status.

A server that is running owns the cache: when one answers (``--server URL``, or the
config's ``admin.listen`` or else ``listen`` address, on loopback), the command asks
it through its admin API (``POST /admin/warm``, ``POST /admin/sync``,
``GET /admin/sync``, through :mod:`mirror.admin_client`, with the node's local admin
token from the storage folder, or ``admin.token``), so its single flight,
budgets and records hold. Otherwise the command builds a node of its own on the
storage folder (without the scheduled loop) and does the work itself; the index is
SQLite in WAL mode and every blob is published by an atomic rename, as for
``mirror cache``, so a server started meanwhile is safe.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from typing import Any, TextIO

from mirror import launch, log
from mirror.admin_client import AdminClient
from mirror.cache.inventory import human_size, human_time
from mirror.config import Settings
from mirror.errors import CacheCommandError
from mirror.node import Node
from mirror.sync import SyncService
from mirror.sync.loop import POPULAR
from mirror.sync.rules import rule_fingerprint

BAR_WIDTH = 24


def add_parsers(commands: Any, common: Any) -> None:
    """``mirror warm`` and ``mirror sync`` on the CLI's sub-command parser."""
    warm = commands.add_parser("warm", help="fetch images into the cache now (the selected "
                               "platforms only); safe while the server runs")
    warm.add_argument("refs", nargs="+", metavar="REF",
                      help="image references (nginx:1.27, ghcr.io/org/app@sha256:...)")
    warm.add_argument("--platform", action="append", default=[], metavar="OS/ARCH",
                      help="platform to warm (repeatable; default: those served for the "
                      "repository, else sync.platforms, else this machine's)")
    warm.add_argument("--referrers", action="store_true",
                      help="also the signatures, SBOMs and attestations referring to it")
    common(warm)
    warm.set_defaults(func=warm_command)

    sync = commands.add_parser("sync", help="run the sync rules once, or show their status "
                               "(the loop itself runs inside mirror serve)")
    sync.add_argument("action", nargs="?", choices=["status"],
                      help="status: rules, last results, paused registries, popular tags")
    sync.add_argument("--once", action="store_true", help="one pass of every rule now")
    sync.add_argument("--dry-run", action="store_true",
                      help="with --once: what would be fetched and how many bytes (manifests "
                      "are read, blobs are not)")
    sync.add_argument("--local", action="store_true",
                      help="with --once --dry-run: plan from this config file's rules, even "
                      "when a running server (which may run other rules) answers")
    sync.add_argument("--json", action="store_true", help="print the JSON document")
    common(sync)
    sync.set_defaults(func=sync_command)


def add_server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL",
                        help="a running mirror to ask (default: the config's listen address "
                        "if a mirror answers there, else work on the storage folder directly)")


# --- mirror warm ------------------------------------------------------------------------
def command_settings(args: argparse.Namespace) -> Settings:
    """The settings of ``warm`` and ``sync`` (every ``*_env`` must be set: they may fetch),
    with the log at errors only: what failed is in the command's own summary."""
    settings = launch.load_settings(args.config, storage=args.storage)
    log.setup(dataclasses.replace(settings.log, level="error"))
    return settings


def warm_command(args: argparse.Namespace) -> int:
    """Warm references; exit 1 listing the failures."""
    settings = command_settings(args)
    body = {"refs": args.refs, "platforms": args.platform, "referrers": args.referrers}
    view = ProgressView(sys.stdout)
    server = AdminClient.find(settings, args.server)
    if server is not None:
        for event in server.post_lines("/admin/warm", body):
            if event.get("event") == "end":
                return _summary(event.get("results") or [], sys.stdout)
            view.update(event)
        raise CacheCommandError("the server ended the warm without a result")

    async def local() -> list[dict[str, Any]]:
        node = Node(settings, sync_loop=False)
        await node.start()
        try:
            results = await node.sync.warm_refs(args.refs, platforms=tuple(args.platform),
                                                referrers=args.referrers, progress=view.update)
        finally:
            await node.stop()
        return [r.as_json() for r in results]

    return _summary(asyncio.run(local()), sys.stdout)


def _summary(results: list[dict[str, Any]], out: TextIO) -> int:
    failed = [r for r in results if r.get("result") in ("failed", "deferred", "refused")]
    fetched = sum(int(r.get("fetched_bytes", 0)) for r in results)
    print(f"warm: {len(results) - len(failed)} of {len(results)} image(s) held, "
          f"{human_size(fetched)} fetched", file=out)
    for result in results:
        platforms = ", ".join(result.get("platforms") or []) or "single-platform image"
        if result in failed:
            print(f"  {result.get('result')}: {result.get('ref')}: {result.get('reason', '')}",
                  file=out)
        elif result.get("result") == "present":
            print(f"  present: {result.get('ref')} [{platforms}] already held", file=out)
        else:
            print(f"  {result.get('result')}: {result.get('ref')} [{platforms}] "
                  f"{human_size(int(result.get('fetched_bytes', 0)))} fetched", file=out)
    return 1 if failed else 0


class ProgressView:
    """A bar per image on a terminal; plain lines (plan, done) otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._images: dict[str, list[int]] = {}  # ref -> [done bytes, total bytes]
        self._lines = 0

    def update(self, event: dict[str, Any]) -> None:
        ref, kind = str(event.get("ref", "")), event.get("event")
        state = self._images.setdefault(ref, [0, 0])
        if kind == "plan":
            state[:] = [int(event.get("present", 0)), int(event.get("total", 0))]
            if not self.tty:
                print(f"{ref}: {event.get('blobs')} blob(s), {human_size(state[1] - state[0])} "
                      f"to fetch of {human_size(state[1])}", file=self.out, flush=True)
        elif kind == "blob":
            state[0] += int(event.get("size", 0))
        elif kind == "done":
            state[0] = state[1] if event.get("result") in ("warmed", "present") else state[0]
            if not self.tty:
                reason = f" ({event['reason']})" if event.get("reason") else ""
                platforms = f" [{', '.join(event['platforms'])}]" if event.get("platforms") \
                    else ""
                print(f"{ref}: {event.get('result')}{platforms}{reason}", file=self.out,
                      flush=True)
        if self.tty:
            self._draw(ref if kind == "done" else None, event)

    def _draw(self, finished: str | None, event: dict[str, Any]) -> None:
        if self._lines:
            self.out.write(f"\x1b[{self._lines}F")
        for ref, (done, total) in self._images.items():
            share = done / total if total else (1.0 if ref == finished else 0.0)
            bar = "#" * int(share * BAR_WIDTH)
            note = f" {event.get('result')}" if ref == finished else ""
            self.out.write(f"\x1b[2K{ref[:60]:<60} [{bar:<{BAR_WIDTH}}] {share:4.0%} "
                           f"{human_size(done)}/{human_size(total)}{note}\n")
        self._lines = len(self._images)
        self.out.flush()


# --- mirror sync ------------------------------------------------------------------------
def sync_command(args: argparse.Namespace) -> int:
    """``mirror sync --once [--dry-run]`` or ``mirror sync status``."""
    settings = command_settings(args)
    if args.action == "status":
        return _status(args, settings)
    if not args.once:
        raise CacheCommandError("give --once (one pass now) or status; the loop itself runs "
                                "inside mirror serve")
    if settings.sync is None:
        raise CacheCommandError("the config has no sync section: no rules to run")
    if args.local and not args.dry_run:
        raise CacheCommandError("--local plans only (give --dry-run too): a running server "
                                "owns the cache; put the rules in its config to warm them")
    server = None if args.local else AdminClient.find(settings, args.server)
    if server is not None:
        warn_if_rules_differ(server.get("/admin/sync"), settings, server.url, sys.stderr)
        report = server.post("/admin/sync", {"dry_run": args.dry_run})
    else:
        async def local() -> dict[str, Any]:
            node = Node(settings, sync_loop=False)
            # --local beside a running server: open the cache as `mirror cache` does.
            await node.start(exclusive=not args.local)
            try:
                return await node.sync.run_once(dry_run=args.dry_run)
            finally:
                await node.stop()

        report = asyncio.run(local())
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report)
    failed = [r for r in report.get("results") or []
              if r.get("result") in ("failed", "deferred", "refused")]
    return 1 if failed else 0


def warn_if_rules_differ(status: dict[str, Any], settings: Settings, server: str,
                         out: TextIO) -> bool:
    """Say so when the running server's sync rules are not the config file's: the pass
    runs the server's rules, not the file's. Returns whether they differ."""
    mine = {r.name: rule_fingerprint(r) for r in (settings.sync.rules if settings.sync else ())}
    theirs = {str(r.get("name")): r.get("fingerprint") for r in status.get("rules") or []
              if r.get("name") != POPULAR}
    differ = sorted(name for name in mine.keys() | theirs.keys()
                    if name not in mine or name not in theirs
                    or (theirs[name] is not None and theirs[name] != mine[name]))
    if differ:
        print(f"warning: the server at {server} runs other sync rules than this config "
              f"(differing: {', '.join(differ)}); this pass uses the server's rules. "
              "Give --local to plan from the file.", file=out)
    return bool(differ)


def _print_report(report: dict[str, Any]) -> None:
    dry = report.get("dry_run")
    for result in report.get("results") or []:
        reason = f"  {result['reason']}" if result.get("reason") else ""
        platforms = f" [{', '.join(result['platforms'])}]" if result.get("platforms") else ""
        if result.get("result") == "present":
            held = human_size(int(result.get("present_bytes", 0)))
            print(f"{'present':<9} {result.get('ref')}{platforms}  all {held} held{reason}")
            continue
        amount = result.get("missing_bytes", 0) if dry else result.get("fetched_bytes", 0)
        what = "to fetch" if dry else "fetched"
        print(f"{result.get('result', ''):<9} {result.get('ref')}{platforms}  "
              f"{human_size(amount)} {what}{reason}")
    counts = ", ".join(f"{n} {k}" for k, n in sorted((report.get("counts") or {}).items()))
    total = report.get("missing_bytes" if dry else "fetched_bytes", 0)
    print(f"sync{' (dry run)' if dry else ''}: {counts or 'nothing selected'}; "
          f"{human_size(int(total))} {'would be fetched' if dry else 'fetched'} "
          f"in {report.get('seconds', 0)}s")


def _status(args: argparse.Namespace, settings: Settings) -> int:
    server = AdminClient.find(settings, args.server)
    status = server.get("/admin/sync") if server is not None else \
        SyncService.offline_status(settings.sync, settings.storage.path)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    _print_status(status)
    return 0


def _print_status(status: dict[str, Any]) -> None:
    source = f"; no server answered, read from {status['source']}" if status.get("source") \
        else ""
    print(f"sync: {'on' if status.get('enabled') else 'off (no sync section)'}{source}")
    for rule in status.get("rules") or []:
        schedule = rule.get("schedule") or {}
        every = f"cron {schedule['cron']}" if schedule.get("cron") else \
            f"every {schedule.get('interval') or 0:g}s"
        when = f", next run {human_time(rule['next_run'])}" if rule.get("next_run") else ""
        print(f"  rule {rule['name']}: {every}{when}")
    for name, state in (status.get("registries") or {}).items():
        paused = state.get("paused_seconds") or 0
        remaining = state.get("ratelimit_remaining")
        left = f"ratelimit-remaining {remaining}" if remaining is not None else \
            "no rate limit reported yet"
        print(f"  {name}: {left}{f', paused {paused:.0f}s after a 429' if paused else ''}")
    last = status.get("last_run") or {}
    if last:
        counts = ", ".join(f"{n} {k}" for k, n in sorted((last.get("counts") or {}).items()))
        print(f"last run: {human_time(last.get('started', 0))}, {counts or 'nothing'}, "
              f"{human_size(int(last.get('fetched_bytes', 0)))} fetched")
    records = status.get("records") or []
    print(f"REFERENCES ({len(records)})")
    for record in records:
        reason = f"  {record['reason']}" if record.get("reason") else ""
        print(f"  {record.get('result', ''):<9} {record['ref']}  "
              f"{(record.get('held') or record.get('digest') or '')[:19]}  "
              f"last {human_time(record.get('last_run') or 0)}{reason}")
    popular = status.get("popular") or {}
    print(f"POPULAR (decaying window {popular.get('window_seconds', 0):.0f}s)")
    for item in popular.get("top") or []:
        key = f"{item['registry']}/{item['repository']}"
        platforms = ", ".join((popular.get("platforms") or {}).get(key, {}))
        print(f"  {item['score']:>8.2f}  {key}:{item['tag']}  {platforms}")
