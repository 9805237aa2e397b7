"""UpstreamClient against an in-process fake registry (and a fake CDN) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY
from yarl import URL

from mirror.config import Secret, UpstreamSettings
from mirror.errors import Denied, NameUnknown, TooManyRequests, UpstreamUnavailable
from mirror.upstream import UpstreamClient
from mirror.upstream.client import parse_retry_after

DIGEST = "sha256:" + "a" * 64
MANIFEST = b'{"schemaVersion":2}'
BLOB = b"layer bytes"
PASSWORD = "hunter2-very-secret"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
SIGNED_QUERY = "X-Amz-Signature=abc%2Fdef&verify=1%3D2"

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]


@dataclass
class Seen:
    """One request as the fake saw it."""

    method: str
    raw_path: str
    headers: dict[str, str]

    @classmethod
    def of(cls, request: web.Request) -> Seen:
        return cls(request.method, request.raw_path, dict(request.headers))


@dataclass
class FakeRegistry:
    """A registry that records requests and injects the faults a test asks for."""

    auth: str = "none"  # none | bearer | basic
    username: str | None = None
    password: str | None = None
    expires_in: int | None = 300
    token_status: int = 200
    token_delay: float = 0.0
    failures: list[int] = field(default_factory=list)  # statuses answered first, in order
    retry_after: str | None = None
    missing: set[str] = field(default_factory=set)
    forbidden: bool = False
    blob_location: str | None = None
    stall: bool = False
    seen: list[Seen] = field(default_factory=list)
    token_calls: list[Seen] = field(default_factory=list)
    tokens: dict[str, set[str]] = field(default_factory=dict)
    unstall: asyncio.Event = field(default_factory=asyncio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.token)
        app.router.add_route("*", "/v2/{tail:.*}", self.registry)
        app.router.add_get("/cdn/{tail:.*}", self.cdn)
        return app

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    async def token(self, request: web.Request) -> web.Response:
        self.token_calls.append(Seen.of(request))
        await asyncio.sleep(self.token_delay)
        if self.token_status != 200:
            return web.Response(status=self.token_status)
        if self.username and request.headers.get("Authorization") != self.basic():
            return web.Response(status=401)
        value = f"tok-{len(self.token_calls)}"
        self.tokens[value] = set(request.query.getall("scope", []))
        body: dict[str, Any] = {"token": value}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return web.json_response(body)

    async def registry(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(Seen.of(request))
        if self.stall:
            await asyncio.wait_for(self.unstall.wait(), 5)
        if self.failures:
            status = self.failures.pop(0)
            limited = status == 429 and self.retry_after is not None
            headers = {"Retry-After": str(self.retry_after)} if limited else {}
            return web.Response(status=status, headers=headers)
        tail = request.match_info["tail"]
        repo = tail.split("/manifests/")[0].split("/blobs/")[0] if tail else ""
        refused = self.check_auth(request, repo)
        if refused is not None:
            return refused
        if self.forbidden:
            return web.Response(status=403)
        return self.serve(tail, repo)

    def serve(self, tail: str, repo: str) -> web.StreamResponse:
        if not tail:
            return web.json_response({})
        if repo in self.missing:
            return web.Response(status=404)
        if "/blobs/" in tail and self.blob_location:
            return web.Response(status=307, headers={"Location": self.blob_location})
        if "/manifests/" in tail:
            return web.Response(body=MANIFEST, content_type=OCI_MANIFEST)
        if tail.endswith(f"/blobs/{DIGEST}"):
            return web.Response(body=BLOB)
        return web.Response(status=404)

    def check_auth(self, request: web.Request, repo: str) -> web.Response | None:
        header = request.headers.get("Authorization", "")
        if self.auth == "basic":
            if header == self.basic():
                return None
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="fake"'})
        if self.auth != "bearer":
            return None
        scope = f"repository:{repo}:pull"
        challenge = f'Bearer realm="http://{request.host}/token",service="fake.test"'
        if repo:
            challenge += f',scope="{scope}"'
        if not header.startswith("Bearer "):
            return unauthorized(challenge)
        scopes = self.tokens.get(header.removeprefix("Bearer "))
        if scopes is None:
            return unauthorized(challenge + ',error="invalid_token"')
        if repo and (scope not in scopes or repo in self.missing):
            return unauthorized(challenge + ',error="insufficient_scope"')
        return None

    async def cdn(self, request: web.Request) -> web.Response:
        self.seen.append(Seen.of(request))
        if "Authorization" in request.headers:
            return web.Response(status=400, text="two auth mechanisms")
        return web.Response(body=BLOB)


def unauthorized(challenge: str) -> web.Response:
    return web.Response(status=401, headers={"WWW-Authenticate": challenge})


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., UpstreamClient]]:
    made: list[UpstreamClient] = []

    def make(url: URL, **overrides: Any) -> UpstreamClient:
        options: dict[str, Any] = {"name": "fake", "url": url.with_path(""), "retries": 2}
        options.update(overrides)
        clock = options.pop("clock", None)
        client = UpstreamClient(UpstreamSettings(**options), **({"clock": clock} if clock else {}))
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


async def serve(aiohttp_server: ServerFactory, fake: FakeRegistry) -> TestServer:
    server = await aiohttp_server(fake.app())
    return server


async def get_body(client: UpstreamClient, repo: str = "library/nginx",
                   suffix: str = "manifests/latest", **kwargs: Any) -> tuple[int, bytes]:
    async with client.request("GET", repo, suffix, **kwargs) as resp:
        return resp.status, await resp.read()


async def test_anonymous_request_sends_identity_user_agent_and_caller_headers(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry()
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    status, body = await get_body(client, headers={"Accept": "application/json"})
    assert (status, body) == (200, MANIFEST)
    seen = fake.seen[0]
    assert seen.raw_path == "/v2/library/nginx/manifests/latest"
    assert seen.headers["Accept-Encoding"] == "identity"
    assert seen.headers["User-Agent"] == "oci-mirror/0.1"
    assert seen.headers["Accept"] == "application/json"
    assert "Authorization" not in seen.headers


async def test_digest_colon_and_params_reach_upstream_unencoded(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry()
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    assert await get_body(client, suffix=f"blobs/{DIGEST}") == (200, BLOB)
    async with client.request("GET", "a/b", "tags/list", params={"n": "10", "last": "v1"}):
        pass
    assert fake.seen[0].raw_path == f"/v2/library/nginx/blobs/{DIGEST}"
    assert fake.seen[1].raw_path == "/v2/a/b/tags/list?n=10&last=v1"


async def test_other_statuses_are_returned(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(missing={"nope/nope"})
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    assert (await get_body(client, "nope/nope"))[0] == 404


async def test_bearer_token_fetched_once_then_sent_up_front(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(auth="bearer")
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), name="bearer-once")
    assert await get_body(client) == (200, MANIFEST)
    assert await get_body(client, suffix=f"blobs/{DIGEST}") == (200, BLOB)
    assert len(fake.token_calls) == 1
    token_url = URL(fake.token_calls[0].raw_path)
    assert token_url.query["service"] == "fake.test"
    assert token_url.query.getall("scope") == ["repository:library/nginx:pull"]
    assert "Authorization" not in fake.token_calls[0].headers
    # anonymous 401, then with token; the second request goes with the token at once
    assert [("Authorization" in s.headers) for s in fake.seen] == [False, True, True]
    assert sample("mirror_upstream_token_fetches_total", registry="bearer-once", result="ok") == 1
    assert sample("mirror_upstream_requests_total", registry="bearer-once", method="GET",
                  status="401") == 1


async def test_twenty_concurrent_requests_fetch_one_token(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(auth="bearer", token_delay=0.05)
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    results = await asyncio.gather(*(get_body(client) for _ in range(20)))
    assert all(r == (200, MANIFEST) for r in results)
    assert len(fake.token_calls) == 1


async def test_each_repository_gets_its_own_scope(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(auth="bearer")
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    await get_body(client, "a/one")
    await get_body(client, "b/two")
    scopes = [URL(c.raw_path).query["scope"] for c in fake.token_calls]
    assert scopes == ["repository:a/one:pull", "repository:b/two:pull"]
    # the challenge was remembered: the second repository had no 401 round trip
    assert len(fake.seen) == 3


async def test_expired_token_is_refetched(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    now = [1000.0]
    fake = FakeRegistry(auth="bearer", expires_in=10)  # raised to 60 s by the client
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), clock=lambda: now[0])
    await get_body(client)
    now[0] += 30
    await get_body(client)
    assert len(fake.token_calls) == 1
    now[0] += 30
    await get_body(client)
    assert len(fake.token_calls) == 2
    assert fake.seen[-1].headers["Authorization"] == "Bearer tok-2"


async def test_revoked_cached_token_is_dropped_and_refetched_once(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    now = [1000.0]
    fake = FakeRegistry(auth="bearer")
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), clock=lambda: now[0])
    await get_body(client)
    fake.tokens.clear()
    now[0] += 1
    assert await get_body(client) == (200, MANIFEST)
    assert len(fake.token_calls) == 2


async def test_credentials_go_to_the_token_endpoint(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(auth="bearer", username="bob", password=PASSWORD)
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), username="bob", password=Secret(PASSWORD))
    assert await get_body(client) == (200, MANIFEST)
    assert fake.token_calls[0].headers["Authorization"] == fake.basic()
    assert PASSWORD not in repr(client)


async def test_wrong_password_is_denied_without_leaking_it(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(auth="bearer", username="bob", password="right")
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), name="wrong-pw", username="bob",
                         password=Secret(PASSWORD))
    with structlog.testing.capture_logs() as logs, pytest.raises(Denied) as info:
        await get_body(client)
    for text in (str(info.value), repr(info.value), info.value.body().decode(), repr(client),
                 str(logs)):
        assert PASSWORD not in text
        assert base64.b64encode(f"bob:{PASSWORD}".encode()).decode() not in text
    assert sample("mirror_upstream_token_fetches_total", registry="wrong-pw", result="error") == 1


async def test_basic_challenge_sends_credentials_and_remembers(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(auth="basic", username="bob", password=PASSWORD)
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), username="bob", password=Secret(PASSWORD))
    assert await get_body(client) == (200, MANIFEST)
    assert await get_body(client, "other/repo") == (200, MANIFEST)
    assert [s.headers.get("Authorization") for s in fake.seen] == [None, fake.basic(),
                                                                   fake.basic()]


async def test_basic_challenge_without_credentials_is_denied(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(auth="basic", username="bob", password=PASSWORD)
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    with pytest.raises(Denied):
        await get_body(client)
    assert len(fake.seen) == 1


async def test_insufficient_scope_with_fresh_token_is_name_unknown(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(auth="bearer", missing={"library/nope"})
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    with pytest.raises(NameUnknown):
        await get_body(client, "library/nope")
    assert len(fake.seen) == 2
    assert len(fake.token_calls) == 1


async def test_token_rejected_after_fetch_is_denied(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(auth="bearer")
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    fake.tokens = _ForgetfulDict()
    with pytest.raises(Denied):
        await get_body(client)
    assert len(fake.seen) == 2


class _ForgetfulDict(dict[str, set[str]]):
    """Token store that forgets every token: the registry rejects all of them."""

    def __setitem__(self, key: str, value: set[str]) -> None:
        pass


async def test_forbidden_is_denied_without_retry(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(forbidden=True)
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), name="forbidden")
    with pytest.raises(Denied):
        await get_body(client)
    assert len(fake.seen) == 1
    assert sample("mirror_upstream_errors_total", registry="forbidden", reason="denied") == 1


@pytest.mark.parametrize(("status", "error"), [(500, UpstreamUnavailable), (401, Denied)])
async def test_token_endpoint_failures(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient],
    status: int, error: type[Exception],
) -> None:
    fake = FakeRegistry(auth="bearer", token_status=status)
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), retries=1)
    with pytest.raises(error):
        await get_body(client)


async def test_ping_authenticates(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(auth="bearer")
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    await client.ping()
    assert [s.raw_path for s in fake.seen] == ["/v2/", "/v2/"]
    assert "scope" not in URL(fake.token_calls[0].raw_path).query


async def test_blob_redirect_to_other_origin_drops_auth_and_keeps_signature(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    cdn = FakeRegistry()
    cdn_server = await serve(aiohttp_server, cdn)
    fake = FakeRegistry(auth="bearer",
                        blob_location=str(cdn_server.make_url("/cdn/data")) + "?" + SIGNED_QUERY)
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), name="redirects")
    assert await get_body(client, suffix=f"blobs/{DIGEST}") == (200, BLOB)
    assert cdn.seen[0].raw_path == f"/cdn/data?{SIGNED_QUERY}"
    assert "Authorization" not in cdn.seen[0].headers
    assert sample("mirror_upstream_requests_total", registry="redirects", method="GET",
                  status="307") == 1


async def test_relative_redirect_stays_on_origin(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(blob_location="/cdn/data?" + SIGNED_QUERY)
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    assert await get_body(client, suffix=f"blobs/{DIGEST}") == (200, BLOB)
    assert fake.seen[-1].raw_path == f"/cdn/data?{SIGNED_QUERY}"


async def test_redirect_host_with_its_own_challenge_gets_its_own_token(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    other = FakeRegistry(auth="bearer")
    other_server = await serve(aiohttp_server, other)
    fake = FakeRegistry(auth="bearer", username="bob", password=PASSWORD,
                        blob_location=str(other_server.make_url(f"/v2/mirror/blobs/{DIGEST}")))
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), username="bob", password=Secret(PASSWORD))
    assert await get_body(client, suffix=f"blobs/{DIGEST}") == (200, BLOB)
    assert [s.headers.get("Authorization") for s in other.seen] == [None, "Bearer tok-1"]
    # our credentials never went to the other host's token endpoint
    assert "Authorization" not in other.token_calls[0].headers
    assert set(other.tokens) == {"tok-1"}


async def test_redirect_loop_gives_up(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(blob_location=f"/v2/library/nginx/blobs/{DIGEST}")
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    with pytest.raises(UpstreamUnavailable):
        await get_body(client, suffix=f"blobs/{DIGEST}")
    assert len(fake.seen) == 11


async def test_server_errors_are_retried(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(failures=[500, 503])
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), name="flaky")
    with structlog.testing.capture_logs() as logs:
        assert await get_body(client) == (200, MANIFEST)
    assert len(fake.seen) == 3
    assert sample("mirror_upstream_retries_total", registry="flaky") == 2
    assert sample("mirror_upstream_errors_total", registry="flaky", reason="status_5xx") == 2
    retries = [e for e in logs if e["event"] == "upstream_retry"]
    assert [e["attempt"] for e in retries] == [1, 2]
    assert all(e["registry"] == "flaky" and e["reason"] == "status_5xx" for e in retries)


async def test_server_errors_exhaust_retries(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(failures=[500] * 10)
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), retries=2)
    with pytest.raises(UpstreamUnavailable) as info:
        await get_body(client)
    assert info.value.status == 502
    assert "fake" in str(info.value)
    assert len(fake.seen) == 3


async def test_no_retry_when_asked(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(failures=[500, 500])
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    with pytest.raises(UpstreamUnavailable):
        await get_body(client, retry=False)
    assert len(fake.seen) == 1


async def test_short_rate_limit_is_waited_out(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(failures=[429], retry_after="0")
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    assert await get_body(client) == (200, MANIFEST)
    assert len(fake.seen) == 2


async def test_long_rate_limit_raises_too_many_requests(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(failures=[429, 429], retry_after="3600")
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), name="limited")
    with pytest.raises(TooManyRequests) as info:
        await get_body(client)
    assert info.value.retry_after == 3600
    assert info.value.headers["Retry-After"] == "3600"
    assert len(fake.seen) == 1
    assert sample("mirror_upstream_errors_total", registry="limited", reason="rate_limited") == 1


async def test_connection_refused_is_unavailable(
    make_client: Callable[..., UpstreamClient],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = make_client(URL(f"http://127.0.0.1:{port}"), name="closed-port", retries=1)
    with pytest.raises(UpstreamUnavailable) as info:
        await get_body(client)
    assert info.value.status == 503
    assert str(info.value) == "closed-port: cannot connect to upstream: Connection refused"
    assert sample("mirror_upstream_errors_total", registry="closed-port", reason="connect") == 2


async def test_stalled_upstream_times_out(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    fake = FakeRegistry(stall=True)
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), name="stalled", read_timeout=0.1, retries=1)
    try:
        with pytest.raises(UpstreamUnavailable) as info:
            await get_body(client)
    finally:
        fake.unstall.set()
    assert info.value.status == 504
    assert len(fake.seen) == 2
    assert sample("mirror_upstream_errors_total", registry="stalled", reason="timeout") == 2


async def test_given_session_is_used_and_not_closed(
    aiohttp_server: ServerFactory,
) -> None:
    fake = FakeRegistry()
    server = await serve(aiohttp_server, fake)
    async with aiohttp.ClientSession() as session:
        client = UpstreamClient(UpstreamSettings(name="s", url=server.make_url("")),
                                session=session)
        assert await get_body(client) == (200, MANIFEST)
        await client.close()
        assert not session.closed


def test_parse_retry_after() -> None:
    assert parse_retry_after("120") == 120
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490) == 0


def test_client_is_built_outside_a_loop_and_hides_credentials() -> None:
    settings = UpstreamSettings(name="plain", url=URL("https://registry.example"),
                                username="bob", password=Secret(PASSWORD))
    client = UpstreamClient(settings)
    assert client.name == "plain"
    assert repr(client) == "UpstreamClient(name='plain', url='https://registry.example')"
    assert PASSWORD not in repr(vars(client))


async def test_no_secret_in_logs_across_retries_and_auth(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeRegistry(auth="bearer", username="bob", password=PASSWORD, failures=[502])
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"), username="bob", password=Secret(PASSWORD))
    with structlog.testing.capture_logs() as logs:
        assert await get_body(client) == (200, MANIFEST)
        fake.failures = [500]
        with pytest.raises(UpstreamUnavailable) as unavailable:
            await get_body(client, retry=False)
        fake.tokens = _ForgetfulDict()
        with pytest.raises(Denied) as denied:
            await get_body(client, "other/repo")
    assert any(e["event"] == "upstream_retry" for e in logs)
    text = str(logs) + "".join(capsys.readouterr()) + str(unavailable.value) + str(denied.value)
    for secret in (PASSWORD, "tok-1", fake.basic().split()[1]):
        assert secret not in text


async def test_head_follows_redirects_as_head(
    aiohttp_server: ServerFactory, make_client: Callable[..., UpstreamClient]
) -> None:
    cdn = FakeRegistry()
    cdn_server = await serve(aiohttp_server, cdn)
    fake = FakeRegistry(blob_location=str(cdn_server.make_url("/cdn/data")))
    server = await serve(aiohttp_server, fake)
    client = make_client(server.make_url("/"))
    async with client.request("HEAD", "library/nginx", f"blobs/{DIGEST}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(BLOB))
    assert [s.method for s in fake.seen + cdn.seen] == ["HEAD", "HEAD"]
