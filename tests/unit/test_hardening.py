"""Issue 10: what a hostile client, a bad upstream and a careless config found.

Each test names the item of the issue it covers; each failed before its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY

from mirror import config
from mirror.cache.eviction import Evictor
from mirror.cli import main
from mirror.config import StorageSettings
from mirror.errors import ConfigError
from mirror.fetch import SingleFlight
from mirror.oci import Digest
from mirror.storage.filesystem import FilesystemStore
from tests.support.fake import OCI_MANIFEST, FakeRegistry, sha256
from tests.unit.conftest import MirrorFactory

Client = TestClient[Any, Any]
EMPTY = sha256(b"")


# --- item 5: only ASCII digits are numbers ---------------------------------------------------
@pytest.mark.parametrize("value", ["²-5", "٣-5", "\uff11-5", "0-²", "-²", "0-٣"])
async def test_item05_range_with_unicode_digits_is_ignored(mirror: Client, fake: FakeRegistry,
                                                           value: str) -> None:
    digest = fake.add_blob(b"0123456789")
    await (await mirror.get(f"/v2/app/blobs/{digest}")).read()  # cached from now on
    response = await mirror.get(f"/v2/app/blobs/{digest}", headers={"Range": f"bytes={value}"})
    assert response.status == 200  # an unparsable Range is ignored (RFC 9110)
    assert await response.read() == b"0123456789"


@pytest.mark.parametrize("value", ["²", "٣", "\uff11\uff10"])
async def test_item05_tag_list_n_with_unicode_digits_is_400(mirror: Client, fake: FakeRegistry,
                                                            value: str) -> None:
    fake.add_image("app", "v1", [b"a"])
    response = await mirror.get("/v2/app/tags/list", params={"n": value})
    assert response.status == 400
    assert (await response.json())["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"
    assert fake.count(contains="/tags/list") == 0


# --- item 6: two upstreams with one name ----------------------------------------------------
def test_item06_duplicate_upstream_names_are_refused() -> None:
    with pytest.raises(ConfigError) as error:
        config.parse({"upstreams": [{"name": "r", "url": "http://a"},
                                    {"name": "r", "url": "http://b"}]}, env={})
    assert error.value.key == "upstreams[1]" and "upstreams[0]" in str(error.value)


# --- item 7: durations and sizes within sane bounds -------------------------------------------
@pytest.mark.parametrize(("entry", "key"), [
    ({"read_timeout": float("inf")}, "upstreams[0].read_timeout"),
    ({"read_timeout": float("nan")}, "upstreams[0].read_timeout"),
    ({"read_timeout": 0}, "upstreams[0].read_timeout"),
    ({"read_timeout": "0s"}, "upstreams[0].read_timeout"),
    ({"connect_timeout": "2h"}, "upstreams[0].connect_timeout"),
    ({"max_retry_wait": -1}, "upstreams[0].max_retry_wait"),
    ({"breaker": {"cool_down": float("inf")}}, "upstreams[0].breaker.cool_down"),
])
def test_item07_upstream_durations_are_bounded(entry: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        config.parse({"upstreams": [{"name": "r", "url": "http://a", **entry}]}, env={})
    assert error.value.key == key


@pytest.mark.parametrize("value", ["9" * 400, int("9" * 400), "9" * 400 + "GiB", "2EiB",
                                   "1e30"])
def test_item07_huge_sizes_name_their_key(value: Any) -> None:
    with pytest.raises(ConfigError) as error:
        config.parse({"storage": {"max_size": value}}, env={})
    assert error.value.key == "storage.max_size"


def test_item07_cache_durations_are_finite() -> None:
    with pytest.raises(ConfigError) as error:
        config.parse({"cache": {"tag_ttl": float("inf")}}, env={})
    assert error.value.key == "cache.tag_ttl"
    assert config.parse({"cache": {"stale_if_error": "30d"}}, env={}).cache.stale_if_error \
        == 30 * 86400


# --- item 10 (second half): duplicate YAML keys -----------------------------------------------
def test_item10_duplicate_yaml_keys_are_refused(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("version: 1\nstorage: {path: /a}\ncache: {tag_ttl: 1m}\n"
                    "storage: {path: /b}\n")
    with pytest.raises(ConfigError, match="duplicate key 'storage'"):
        config.load(path)
    nested = tmp_path / "nested.yaml"
    nested.write_text("upstreams:\n  - name: r\n    url: http://a\n    url: http://b\n")
    assert main(["config", "check", str(nested)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "duplicate key 'url'" in err


def test_item10_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("x-defaults: &d {read_timeout: 5s, retries: 1}\n"
                    "upstreams:\n  - <<: *d\n    name: r\n    url: http://a\n    retries: 2\n")
    with pytest.raises(ConfigError, match="x-defaults"):  # unknown top-level key, not a dup
        config.load(path)


# --- item 8 (config file half): not UTF-8 ------------------------------------------------------
def test_item08_config_not_utf8_is_one_line(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\n# caf\xe9\n".encode("latin-1"))
    assert main(["config", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not UTF-8" in err


# --- item 13: HEAD of the empty blob --------------------------------------------------------
async def test_item13_head_of_empty_blob_has_content_length_zero(mirror: Client,
                                                                 fake: FakeRegistry) -> None:
    fake.add_blob(b"")
    before = await mirror.head(f"/v2/app/blobs/{EMPTY}")  # not cached yet: asks upstream
    assert before.status == 200 and before.headers.get("Content-Length") == "0"
    get = await mirror.get(f"/v2/app/blobs/{EMPTY}")
    assert get.status == 200 and await get.read() == b""
    assert get.headers.get("Content-Length") == "0"
    cached = await mirror.head(f"/v2/app/blobs/{EMPTY}")
    assert cached.status == 200 and cached.headers.get("Content-Length") == "0"


# --- item 1: anonymous clients cannot open a registry's circuit breaker -------------------------
def _breaker_state() -> float:
    return REGISTRY.get_sample_value("mirror_upstream_breaker_state",
                                     {"registry": "fake.test"}) or 0.0


async def test_item01_bad_names_that_upstream_fails_on_never_open_the_breaker(
        make_mirror: MirrorFactory, fake: FakeRegistry) -> None:
    mirror = await make_mirror(upstream={"retries": 1, "breaker": {"failures": 2,
                                                                   "cool_down": "1h"}})
    fake.add_image("app", "v1", [b"x"])
    evil = "a" * 240
    fake.fault(kind="status", status=500, path=f"/{evil}/")  # upstream chokes on the name
    for _ in range(6):
        assert (await mirror.get(f"/v2/{evil}/manifests/v1")).status == 502
    assert fake.count("GET", f"/{evil}/manifests/") == 12  # each tried twice
    assert _breaker_state() == 0
    good = await mirror.get("/v2/app/manifests/v1")
    assert good.status == 200  # not 503 "circuit open" for everyone else
    # /v2/ was asked once per would-be opening, not once per failure.
    assert fake.count("GET", "/v2/") - fake.count("GET", "/v2/a") == 3


async def test_item01_retries_of_one_request_count_once(make_mirror: MirrorFactory,
                                                        fake: FakeRegistry) -> None:
    mirror = await make_mirror(upstream={"retries": 2, "breaker": {"failures": 2,
                                                                   "cool_down": "1h"}})
    fake.fault(kind="status", status=503, path="/v2/")  # the whole registry is down
    assert (await mirror.get("/v2/app/manifests/v1")).status == 502
    assert fake.count("GET", "/manifests/") == 3
    assert _breaker_state() == 0  # one failed request, however many tries
    assert (await mirror.get("/v2/app/manifests/v2")).status == 502
    assert _breaker_state() == 1  # a real outage still opens it
    fast = await mirror.get("/v2/app/manifests/v3")
    assert fast.status == 503 and fake.count("GET", "/manifests/") == 4  # no more tries


async def test_item01_names_are_checked_after_library_is_added(make_mirror: MirrorFactory,
                                                               fake: FakeRegistry) -> None:
    mirror = await make_mirror(upstream={"library_prefix": True})
    for name in ("a" * 255, "a" * 248):
        response = await mirror.get(f"/v2/{name}/manifests/v1")
        assert response.status == 400
        assert (await response.json())["errors"][0]["code"] == "NAME_INVALID"
    assert (await mirror.get(f"/v2/{'a' * 247}/manifests/v1")).status == 404  # 255 in all
    assert fake.count(contains="/manifests/") == 1


# --- item 2: one repository's manifest cannot make a blob unfetchable ---------------------------
def _evil_manifest(fake: FakeRegistry, repo: str, digest: str, size: int) -> None:
    """A manifest in another repository declaring a known layer with a wrong size."""
    config_blob = fake.add_blob(b'{"os":"linux"}')
    document = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                           "digest": config_blob, "size": 14},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": digest, "size": size}]}
    fake.add_manifest(repo, json.dumps(document).encode(), OCI_MANIFEST, "v1")


async def test_item02_wrong_size_in_another_manifest_does_not_break_the_blob(
        mirror: Client, fake: FakeRegistry) -> None:
    layer = os.urandom(1234)
    _, manifest = fake.add_image("app", "v1", [layer])
    digest = json.loads(manifest)["layers"][0]["digest"]
    _evil_manifest(fake, "evil", digest, 11378048)
    assert (await mirror.get("/v2/evil/manifests/v1")).status == 200  # the hint is learned
    response = await mirror.get(f"/v2/app/blobs/{digest}")
    assert response.status == 200
    assert await response.read() == layer


async def test_item02_wrong_hint_without_content_length_heals(mirror: Client,
                                                              fake: FakeRegistry) -> None:
    layer = os.urandom(200_000)
    _, manifest = fake.add_image("app", "v1", [layer])
    digest = json.loads(manifest)["layers"][0]["digest"]
    _evil_manifest(fake, "evil", digest, 100)
    fake.fault(kind="chunked", path="/blobs/", chunk=64 << 10, delay=0.001)
    assert (await mirror.get("/v2/evil/manifests/v1")).status == 200
    with contextlib.suppress(aiohttp.ClientPayloadError):
        await (await mirror.get(f"/v2/app/blobs/{digest}")).read()  # may be cut: 100 promised
    again = await mirror.get(f"/v2/app/blobs/{digest}")
    assert again.status == 200 and await again.read() == layer  # the wrong hint was dropped


# --- item 3: total deadlines, and work nobody waits for is cancelled ----------------------------
async def test_item03_manifests_and_tag_lists_have_a_total_deadline(make_mirror: MirrorFactory,
                                                                   fake: FakeRegistry) -> None:
    mirror = await make_mirror(upstream={"request_timeout": "500ms", "retries": 0})
    fake.add_image("app", "v1", [b"x"])
    fake.fault(kind="drip", path="/app/", chunk=1, delay=0.2)  # never silent, never done
    for path in ("/v2/app/manifests/v1", "/v2/app/tags/list"):
        response = await mirror.get(path)
        assert response.status == 504, path
        assert "request_timeout" in (await response.json())["errors"][0]["message"]
    async with asyncio.timeout(10):
        await fake.wait_for(lambda: fake.cut_short == 2)  # both upstream connections closed


async def test_item03_single_flight_cancels_work_nobody_waits_for() -> None:
    flight: SingleFlight[str, str] = SingleFlight(cancel_abandoned=True)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    first = asyncio.ensure_future(flight.run("k", work))
    second = asyncio.ensure_future(flight.run("k", work))
    await started.wait()
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert not cancelled.is_set() and flight.in_flight("k")  # the second still waits
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    await cancelled.wait()
    assert not flight.in_flight("k")
    assert await flight.run("k", _answer) == ("fresh", False)  # a new caller starts afresh


async def _answer() -> str:
    return "fresh"


# --- item 4: unverifiable answers come from the registry's own hosts, in their own shape ------
async def _elsewhere(aiohttp_server: Any) -> tuple[FakeRegistry, str]:
    """Another registry on another origin, holding a different app:v1."""
    other = FakeRegistry()
    other.add_image("app", "v1", [b"not what upstream has"])
    other.tags["app"] = ["evil"]
    server = await aiohttp_server(other.app())
    return other, str(server.make_url("")).rstrip("/")


@pytest.mark.parametrize("path", ["/v2/app/tags/list", "/v2/app/manifests/v1",
                                  f"/v2/app/referrers/{EMPTY}"])
async def test_item04_unverifiable_answers_do_not_follow_redirects_off_the_registry(
        mirror: Client, fake: FakeRegistry, aiohttp_server: Any, path: str) -> None:
    fake.add_image("app", "v1", [b"x"])
    other, base = await _elsewhere(aiohttp_server)
    fake.fault(kind="status", status=307, path=path, headers={"Location": base + path})
    response = await mirror.get(path)
    assert response.status == 502
    assert "not the registry's own" in (await response.json())["errors"][0]["message"]
    assert other.count() == 0
    fake.faults.clear()
    if "manifests" in path:  # nothing was stored or tagged: the real one is served now
        assert (await mirror.get(path)).headers["Docker-Content-Digest"] \
            == sha256(fake.manifests[("app", "v1")][0])


async def test_item04_blobs_and_manifests_by_digest_still_follow_redirects(
        mirror: Client, fake: FakeRegistry, aiohttp_server: Any) -> None:
    other, base = await _elsewhere(aiohttp_server)
    digest, _ = other.add_image("app", None, [b"layer"])
    blob = other.add_blob(b"a blob on a CDN")
    for ref in (f"manifests/{digest}", f"blobs/{blob}"):
        fake.fault(kind="status", status=307, path=f"/v2/app/{ref}",
                   headers={"Location": f"{base}/v2/app/{ref}"})
        assert (await mirror.get(f"/v2/app/{ref}")).status == 200  # verified by digest
    same_host = "/v2/moved/tags/list"
    fake.tags["moved"] = ["v9"]
    fake.fault(kind="status", status=307, path="/v2/app/tags/list",
               headers={"Location": same_host})
    listed = await mirror.get("/v2/app/tags/list")
    assert listed.status == 200 and (await listed.json())["tags"] == ["v9"]


@pytest.mark.parametrize(("path", "body"), [
    ("/v2/app/tags/list", b'{"repositories": ["a"]}'),
    ("/v2/app/tags/list", b'{"name": "app", "tags": "v1"}'),
    ("/v2/app/tags/list", b"[]"),
    (f"/v2/app/referrers/{EMPTY}", b'{"name": "app", "tags": []}'),
    (f"/v2/app/referrers/{EMPTY}",
     b'{"schemaVersion": 2, "mediaType": "text/html", "manifests": []}'),
    ("/v2/app/manifests/v1", b'{"schemaVersion": 2, "mediaType": "text/html", "layers": []}'),
    ("/v2/app/manifests/v1", b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image'
                             b'.manifest.v1+json", "layers": "none"}'),
    ("/v2/app/manifests/v1", b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image'
                             b'.index.v1+json", "manifests": [1, 2]}'),
])
async def test_item04_answers_must_have_the_shape_asked_for(mirror: Client, fake: FakeRegistry,
                                                            path: str, body: bytes) -> None:
    fake.fault(kind="status", status=200, path=path, body=body,
               headers={"Content-Type": "application/json"})
    response = await mirror.get(path)
    assert response.status == 502
    assert (await response.json())["errors"][0]["code"] in ("UNAVAILABLE", "MANIFEST_INVALID")


# --- item 9: the cache commands take every name Docker takes; evict keeps shared layers ----------
def _hub_cli(root: Path, *args: str) -> int:
    """``mirror cache ARGS`` with Docker Hub configured, as an operator of a Hub mirror runs it."""
    config = root.parent / "hub.yaml"
    config.write_text("version: 1\nupstreams: [{name: docker.io, url: 'http://127.0.0.1:9', "
                      "default: true}]\n")
    return main(["cache", *args, "--config", str(config), "--storage", str(root)])


async def _pull_all(mirror: Client, name: str, tag: str) -> str:
    response = await mirror.get(f"/v2/{name}/manifests/{tag}",
                                headers={"Accept": OCI_MANIFEST})
    manifest = await response.json()
    for blob in [manifest["config"], *manifest["layers"]]:
        assert await (await mirror.get(f"/v2/{name}/blobs/{blob['digest']}")).read()
    return str(response.headers["Docker-Content-Digest"])


async def test_item09_every_docker_name_form_pins_and_unpins_the_same_image(
        make_mirror: MirrorFactory, fake: FakeRegistry, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cache"
    mirror = await make_mirror(upstream={"name": "docker.io", "library_prefix": True})
    fake.add_image("library/small-04", "v1", [os.urandom(1000)])
    digest = await _pull_all(mirror, "small-04", "v1")
    forms = ["small-04:v1", "library/small-04:v1", "docker.io/small-04:v1",
             "docker.io/library/small-04:v1", "index.docker.io/small-04:v1"]
    for pin_form in forms:
        for unpin_form in forms:
            assert await asyncio.to_thread(_hub_cli, root, "pin", pin_form) == 0
            assert await asyncio.to_thread(_hub_cli, root, "unpin", unpin_form) == 0, unpin_form
            assert "unpinned docker.io/library/small-04:v1" in capsys.readouterr().out
    assert await asyncio.to_thread(_hub_cli, root, "pin", f"small-04@{digest}") == 0
    assert await asyncio.to_thread(_hub_cli, root, "unpin",
                                   f"docker.io/library/small-04@{digest}") == 0
    assert await asyncio.to_thread(_hub_cli, root, "pin", digest) == 0
    assert await asyncio.to_thread(_hub_cli, root, "unpin", digest) == 0
    capsys.readouterr()
    assert await asyncio.to_thread(_hub_cli, root, "unpin", "small-04:v1") == 1
    assert capsys.readouterr().err == \
        "mirror: docker.io/library/small-04:v1 is not pinned\n"


async def test_item09_evict_keeps_what_other_images_share_unless_told(
        make_mirror: MirrorFactory, fake: FakeRegistry, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "cache"
    mirror = await make_mirror(upstream={"name": "docker.io", "library_prefix": True})
    base, own_a, own_b = os.urandom(5000), os.urandom(3000), os.urandom(3000)
    fake.add_image("library/a", "v1", [base, own_a])
    fake.add_image("library/b", "v1", [base, own_b])
    await _pull_all(mirror, "a", "v1")
    await _pull_all(mirror, "b", "v1")

    def stored(data: bytes) -> bool:
        hexdigest = sha256(data)[7:]
        return (root / "blobs" / "sha256" / hexdigest[:2] / hexdigest).exists()

    assert await asyncio.to_thread(_hub_cli, root, "evict", "a:v1") == 0
    out = capsys.readouterr().out
    assert "2 item(s) kept that other cached images use" in out  # the base layer, the config
    assert stored(base) and not stored(own_a) and stored(own_b)
    assert await asyncio.to_thread(_hub_cli, root, "evict", "--shared", "b:v1") == 0
    assert not stored(base) and not stored(own_b)


# --- item 10: the access line of a cut fill says what the client saw -----------------------------
async def test_item10_fill_cut_after_headers_is_logged_as_the_client_saw_it(
        mirror: Client, fake: FakeRegistry) -> None:
    data = os.urandom(2 << 20)
    digest = fake.add_blob(data)
    fake.fault(kind="drop", path="/blobs/", after=500_000)  # every try, resumes included
    logged = asyncio.Event()

    def notice(_logger: Any, _method: str, event: Any) -> Any:
        if event.get("event") == "request":
            logged.set()
        return event

    with structlog.testing.capture_logs(processors=[notice]) as logs:
        response = await mirror.get(f"/v2/app/blobs/{digest}")
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
        async with asyncio.timeout(10):
            await logged.wait()  # the line is written when the handler ends
    line, = [e for e in logs if e["event"] == "request"]
    assert line["status"] == 200 and line["cut"] is True
    assert "connection lost" in line["error"] and "sent_status" not in line


# --- item 11: eviction stops at the low watermark however many fills reserve at once ----------
async def test_item11_concurrent_reservations_evict_down_to_low_watermark_once(
        tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "cache")
    store.startup()
    for i in range(95):  # 950,000 bytes: right at the high watermark
        data = i.to_bytes(4, "big") * 2500
        fd, temp = store.new_temp()
        os.write(fd, data)
        os.close(fd)
        store.publish_blob(temp, Digest("sha256", hashlib.sha256(data).hexdigest()))
    settings = StorageSettings(path=store.root, max_size=1_000_000, high_watermark=0.95,
                               low_watermark=0.85)
    evictor = Evictor(store, settings)
    await asyncio.gather(*(evictor.reserve(20_000) for _ in range(5)))
    # The first reservation took it over the high watermark: eviction made room down to
    # the low one (850,000 with what was reserved then), and the four others found room.
    # Each evicting the whole excess it saw before the lock took it to 150,000.
    assert 750_000 <= store.index.total_bytes <= 850_000
    assert store.index.total_bytes + 100_000 <= 950_000
    store.index.close()


# --- item 12 (in process): known from the manifest only, the size is enough --------------------
async def test_item12_blob_sized_by_its_manifest_is_relayed_from_the_first_byte(
        make_mirror: MirrorFactory, fake: FakeRegistry, tmp_path: Path) -> None:
    mirror = await make_mirror(storage={"max_size": "256KiB"})
    data = os.urandom(1 << 20)
    _, manifest = fake.add_image("app", "v1", [data])
    digest = json.loads(manifest)["layers"][0]["digest"]
    fake.fault(kind="chunked", path="/blobs/", chunk=64 << 10, delay=0.001)  # no length
    assert (await mirror.get("/v2/app/manifests/v1")).status == 200
    with structlog.testing.capture_logs() as logs:
        response = await mirror.get(f"/v2/app/blobs/{digest}")
        assert await response.read() == data
    relayed, = [e for e in logs if e["event"] == "blob_relayed"]
    assert relayed["offset"] == 0 and relayed["reason"] == "too_large"
    assert not any((tmp_path / "cache" / "blobs").rglob(digest[7:]))
