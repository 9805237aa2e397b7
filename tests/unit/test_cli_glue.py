"""The CLI is thin glue (issue 24 item 4): one command signature, the inventory as a
context manager that lists itself, the sync status offline the same as the admin API's,
and one admin-API client that sends the node's local admin token.

The real-process proofs are tests/integration/test_sync_real.py (warm and sync through a
running mirror, and offline) and test_page_cli_real.py (``cache ls``/``du``).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from mirror import cli, config
from mirror.admin_client import AdminClient
from mirror.cache.inventory import Inventory
from mirror.errors import CacheCommandError
from mirror.server.localtoken import ensure_local_token
from mirror.server.state import NODE
from mirror.sync import SyncService
from mirror.sync.popularity import write_json
from tests.support.fake import FakeRegistry
from tests.unit.conftest import MirrorFactory


def _commands(parser: argparse.ArgumentParser) -> Iterator[Any]:
    for action in parser._actions:  # argparse keeps its sub-parsers only here
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _commands(sub)
    func = parser.get_default("func")
    if func is not None:
        yield func


def test_every_command_takes_only_its_arguments() -> None:
    funcs = list(_commands(cli._parser()))
    assert len(funcs) >= 12  # serve, reload, config check, 6 cache actions, warm, sync, ...
    for func in funcs:
        assert list(inspect.signature(func).parameters) == ["args"], func.__name__


async def test_the_inventory_lists_itself_and_closes_on_leaving(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    fake.add_image("lib/app", "v1", [b"layer" * 100])
    client = await make_mirror()
    assert (await client.get("/v2/lib/app/manifests/v1")).status == 200
    for digest in list(fake.blobs):
        response = await client.get(f"/v2/lib/app/blobs/{digest}")
        assert response.status == 200 and await response.read()  # read: stored in full
    storage = client.server.app[NODE].settings.storage

    def listing() -> tuple[dict[str, Any], dict[str, int], Inventory]:
        with Inventory(storage, lambda _t: ("fake.test", "lib/app", "v1"),
                       ["fake.test"]) as inventory:
            return inventory.listing(), inventory.by_registry(), inventory

    document, by_registry, inventory = await asyncio.to_thread(listing)
    [image] = next(iter(document["images"].values()))
    assert image["state"] == "complete" and image["bytes"] > 0
    assert {c["kind"] for c in document["content"]} == {"blob", "manifest"}
    assert set(by_registry) >= {"other"}
    with pytest.raises(Exception):  # noqa: B017 (closed: whatever SQLite says)
        inventory.store.index.all()


def test_an_inventory_of_no_cache_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CacheCommandError, match="no cache at"):
        Inventory(config.StorageSettings(path=tmp_path), lambda t: ("", "", ""))


async def test_the_offline_sync_status_is_the_admin_answer(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    fake.add_image("lib/app", "v1", [b"layer"])
    client = await make_mirror(sync={"rules": [{"name": "apps", "registry": "fake.test",
                                               "repositories": ["lib/app"], "tags": ["v1"]}],
                                     "popular": {"top": 3}})
    assert (await client.get("/v2/lib/app/manifests/v1")).status == 200
    node = client.server.app[NODE]
    await node.sync.run_once()
    await node.sync.save()
    node.popularity.save(node.popularity.snapshot())
    online = await (await client.get("/admin/sync")).json()
    offline = await asyncio.to_thread(SyncService.offline_status, node.settings.sync,
                                      node.settings.storage.path)
    assert offline.pop("source") == str(node.settings.storage.path / "sync")
    for document in (online, offline):  # what only a running loop knows
        document.pop("registries")
        for rule in document["rules"]:
            rule.pop("next_run")
        document["popular"].pop("processes")
    assert offline == online
    assert [r["name"] for r in offline["rules"]] == ["apps", "popular"]
    assert offline["records"] and offline["popular"]["top"]


def test_no_sync_section_reads_as_off(tmp_path: Path) -> None:
    status = SyncService.offline_status(None, tmp_path)
    assert status["enabled"] is False and status["records"] == [] and status["rules"] == []


class _Admin(BaseHTTPRequestHandler):
    """A stand-in for a running mirror's admin API that remembers what it was sent."""

    seen: list[tuple[str, str | None, bytes]] = []
    answer: bytes = b'{"ok": true}'
    code = 200

    def do_GET(self) -> None:
        self._reply()

    def do_POST(self) -> None:
        self._reply()

    def _reply(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append((self.path, self.headers.get("Authorization"), body))
        code = 200 if self.path == "/readyz" else self.code
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"ready" if self.path == "/readyz" else self.answer)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def admin_api() -> Iterator[tuple[str, type[_Admin]]]:
    handler = type("Admin", (_Admin,), {"seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _settings(tmp_path: Path) -> config.Settings:
    return config.parse({"version": 1, "listen": "127.0.0.1:9", "storage": {"path":
                         str(tmp_path)}, "upstreams": [{"name": "r.test",
                                                        "url": "http://127.0.0.1:9",
                                                        "default": True}]}, env={})


def test_the_admin_client_sends_the_local_token(
        tmp_path: Path, admin_api: tuple[str, type[_Admin]]) -> None:
    url, handler = admin_api
    token = ensure_local_token(tmp_path)
    server = AdminClient.find(_settings(tmp_path), url)
    assert server is not None
    assert server.post("/admin/sync", {"dry_run": True}) == {"ok": True}
    handler.answer = b'{"event": "plan"}\n\n{"event": "end"}\n'
    assert list(server.post_lines("/admin/warm", {"refs": []})) == [
        {"event": "plan"}, {"event": "end"}]
    path, auth, body = handler.seen[1]
    assert (path, auth, json.loads(body)) == ("/admin/sync", f"Bearer {token}",
                                              {"dry_run": True})
    assert handler.seen[2][1] == f"Bearer {token}"


def test_the_admin_client_faults_are_one_line(
        tmp_path: Path, admin_api: tuple[str, type[_Admin]]) -> None:
    url, handler = admin_api
    settings = _settings(tmp_path)
    assert AdminClient.find(settings, None) is None  # nothing at listen: work locally
    with pytest.raises(CacheCommandError, match="no mirror answers at"):
        AdminClient.find(settings, "http://127.0.0.1:9")
    server = AdminClient.find(settings, url)
    assert server is not None
    handler.answer = b"[1, 2]"
    with pytest.raises(CacheCommandError, match="did not answer a JSON object"):
        server.get("/admin/sync")
    handler.code, handler.answer = 403, b'{"errors": [{"code": "DENIED"}]}'
    with pytest.raises(CacheCommandError, match="403") as caught:
        server.get("/admin/sync")
    assert "\n" not in str(caught.value)


async def test_the_admin_answer_has_the_records_another_worker_saved(
        fake: FakeRegistry, make_mirror: MirrorFactory) -> None:
    fake.add_image("lib/app", "v1", [b"layer"])
    client = await make_mirror(sync={"rules": [{"name": "apps", "registry": "fake.test",
                                               "repositories": ["lib/app"], "tags": ["v1"]}]})
    node = client.server.app[NODE]
    state = node.settings.storage.path / "sync" / "state.json"
    other = {"ref": "fake.test/lib/other:v2", "rules": ["manual"], "result": "warmed",
             "last_run": 1000.0}
    mine = {"ref": "fake.test/lib/app:v1", "rules": ["apps"], "result": "failed",
            "last_run": 1.0}  # older than what this process knows
    await node.sync.run_once()
    await asyncio.to_thread(write_json, state, {"version": 1, "last_run": {"started": 1.0},
                                                "records": [other, mine]})
    status = await (await client.get("/admin/sync")).json()
    records = {r["ref"]: r["result"] for r in status["records"]}
    assert records == {"fake.test/lib/other:v2": "warmed", "fake.test/lib/app:v1": "present"}
    assert status["last_run"]["started"] > 1.0  # this process's run is the newer
    await node.sync.save()  # a save keeps the other worker's records
    saved = await asyncio.to_thread(SyncService.offline_status, node.settings.sync,
                                    node.settings.storage.path)
    assert {r["ref"] for r in saved["records"]} == set(records)
