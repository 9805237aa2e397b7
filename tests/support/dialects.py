"""Fake registries that speak each real registry's auth dialect and redirects.

A :class:`Dialect` says what the wire looks like for one registry: the
challenge (``Basic`` or ``Bearer``, realm, service, scope, GHCR's placeholder
scope on ``/v2/``, Quay's two challenges on one line), the token endpoint
(where it lives, which fields it answers, ``expires_in``, ``issued_at``,
whether it grants anonymous pulls and which Basic users it accepts), how a
missing repository is reported (404, or Docker Hub's 401
``insufficient_scope``), blob redirects (to a CDN on another origin with a
signed query, or a relative ``Location``), ECR Public's 401 to a blob ``HEAD``,
and registry.k8s.io's redirect of every request to another registry.

The values come from PROTOCOL.md section 3 and the registries' own docs; each
preset's test in ``tests/unit/test_presets.py`` names its dialect.

:class:`Cdn` records every request and never accepts an ``Authorization``
header: it answers 400 (as S3 does with two auth mechanisms) and notes the
violation, which the tests assert is empty.
"""

from __future__ import annotations

import base64
import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mirror import config
from mirror.server.app import create_app
from tests.support.fake import DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, FakeRegistry, Seen, sha256

Client = TestClient[Any, Any]
ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_MANIFEST}"

_TOKEN_IDS = itertools.count(1)
_RATELIMIT = web.RequestKey("ratelimit", str)


@dataclass
class Dialect:
    """One registry's auth and redirect behaviour."""

    scheme: str = "none"  # none | basic | bearer
    service: str = ""
    realm_path: str = "/token"
    separate_token_host: bool = False  # Docker Hub: auth.docker.io; GitLab: gitlab.com
    basic_realm: str = "registry"
    token_fields: tuple[str, ...] = ("token",)
    expires_in: int | None = 300
    issued_at: bool = False
    ping_scope: str | None = None  # GHCR names a placeholder scope on /v2/
    both_schemes: bool = False  # Quay: "Basic realm=..., Bearer realm=..." on one line
    users: dict[str, str] = field(default_factory=dict)  # accepted Basic credentials
    anonymous: bool = True  # the token endpoint grants pulls without credentials
    missing: str = "404"  # 404 | insufficient_scope
    blob_redirect: str = ""  # "" | cdn | relative
    redirect_all_to: str = ""  # registry.k8s.io: base URL of the registry it redirects to
    redirect_repo_prefix: str = ""  # ... and the repository prefix it adds there
    head_blob_401: bool = False  # ECR Public
    challenge_on_ping_only: bool = False  # GCR: other 401s carry no WWW-Authenticate
    invalid_token_400: bool = False  # ECR Public: an expired token gets 400, no challenge
    api_prefix: str = ""  # Artifactory: /artifactory/api/docker/<repo>


def basic_header(username: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()


class TokenService:
    """A token endpoint issuing opaque tokens with the scopes asked for."""

    def __init__(self, dialect: Dialect) -> None:
        self.dialect = dialect
        self.calls: list[Seen] = []
        self.granted: dict[str, set[str]] = {}
        self.owner: dict[str, str | None] = {}  # token -> the Basic user it was issued to

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get(self.dialect.realm_path, self.token)

    def app(self) -> web.Application:
        app = web.Application()
        self.add_routes(app)
        return app

    def accepted(self, header: str | None) -> bool:
        return self.user_of(header) is not None

    def user_of(self, header: str | None) -> str | None:
        return next((u for u, p in self.dialect.users.items() if header == basic_header(u, p)),
                    None)

    async def token(self, request: web.Request) -> web.Response:
        self.calls.append(Seen(request.method, request.path_qs, dict(request.headers)))
        d = self.dialect
        header = request.headers.get("Authorization")
        if header is not None and not self.accepted(header):
            return web.json_response({"details": "incorrect username or password"}, status=401)
        if header is None and not d.anonymous:
            return web.json_response({"details": "authentication required"}, status=401)
        if d.service and request.query.get("service") != d.service:
            return web.json_response({"details": "wrong service"}, status=400)
        value = f"tok-{next(_TOKEN_IDS)}"
        self.granted[value] = set(request.query.getall("scope", []))
        self.owner[value] = self.user_of(header)
        body: dict[str, object] = {name: value for name in d.token_fields}
        if d.expires_in is not None:
            body["expires_in"] = d.expires_in
        if d.issued_at:
            body["issued_at"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return web.json_response(body)


class Cdn:
    """A blob store on another origin, reached by signed redirects only."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.requests: list[Seen] = []
        self.violations: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/blobs/{digest}", self.blob)
        return app

    async def blob(self, request: web.Request) -> web.Response:
        self.requests.append(Seen(request.method, request.path_qs, dict(request.headers)))
        if "Authorization" in request.headers:
            self.violations.append(request.path_qs)
            return web.Response(status=400, text="Only one auth mechanism allowed")
        if "X-Amz-Signature" not in request.query:
            return web.Response(status=403, text="unsigned")
        data = self.blobs.get(request.match_info["digest"])
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="application/octet-stream")


class DialectRegistry(FakeRegistry):
    """:class:`FakeRegistry` content behind one registry's auth dialect and redirects.

    Args:
        dialect: the wire behaviour.
        tokens: the token service whose tokens this registry accepts.
    """

    def __init__(self, dialect: Dialect, tokens: TokenService | None = None) -> None:
        super().__init__()
        self.dialect = dialect
        self.tokens = tokens or TokenService(dialect)
        self.realm = ""  # the token realm URL, set once the token server listens
        self.cdn_url = ""  # base URL of the CDN, set once it listens
        self.limited: set[str | None] = set()  # users whose manifest GETs answer 429
        self.remaining: dict[str | None, int] = {}  # ratelimit-remaining per user

    def app(self) -> web.Application:
        app = web.Application()
        if not self.dialect.separate_token_host and self.dialect.scheme == "bearer":
            self.tokens.add_routes(app)
        app.router.add_route("*", "/{path:.*}", self._handle)
        return app

    def repositories(self) -> set[str]:
        return {repo for repo, _ in self.manifests}

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Seen(request.method, request.path_qs, dict(request.headers)))
        for fault in self.faults:
            if fault.matches(request):
                fault.times -= 1
                return await self._fault(request, fault)
        d = self.dialect
        path = request.path
        if path.startswith("/storage/blobs/"):  # target of a relative redirect
            data = self.blobs.get(path.rsplit("/", 1)[1])
            return web.Response(body=data) if data is not None else web.Response(status=404)
        if not path.startswith(d.api_prefix + "/v2/"):
            return web.Response(status=404)
        path = path[len(d.api_prefix):]
        repo = _repository(path)
        refused = self._check_auth(request, repo, path)
        if refused is not None:
            return refused
        if d.redirect_all_to and repo:
            target = f"{d.redirect_all_to}/v2/{d.redirect_repo_prefix}{path[len('/v2/'):]}"
            return web.Response(status=307, headers={"Location": target})
        if repo and repo not in self.repositories():
            return _error(404, "NAME_UNKNOWN", "repository name not known to registry")
        if "/manifests/" in path and request.method == "GET":
            limited = self._rate_limit(request)
            if limited is not None:
                return limited
        if "/blobs/" in path and d.blob_redirect and request.method == "GET":
            digest = path.rsplit("/", 1)[1]
            if digest in self.blobs:
                return web.Response(status=307, headers={"Location": self._blob_location(digest)})
        return await self._answer(request, path)

    def user(self, request: web.Request) -> str | None:
        """The account a request is made as: its Basic user or its token's owner."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return self.tokens.owner.get(header.removeprefix("Bearer "))
        return self.tokens.user_of(header)

    def _rate_limit(self, request: web.Request) -> web.StreamResponse | None:
        """Docker Hub's pull limit: 429 TOOMANYREQUESTS, or the remaining count."""
        user = self.user(request)
        if user in self.limited:
            return _error(429, "TOOMANYREQUESTS", "You have reached your pull rate limit.",
                          {"Retry-After": "3600", "ratelimit-remaining": "0;w=21600"})
        if user in self.remaining:
            self.remaining[user] = max(0, self.remaining[user] - 1)
            request[_RATELIMIT] = f"{self.remaining[user]};w=21600"
        return None

    async def _answer(self, request: web.Request, path: str | None = None) -> web.StreamResponse:
        response = await super()._answer(request, path)
        if _RATELIMIT in request:
            response.headers["ratelimit-limit"] = "100;w=21600"
            response.headers["ratelimit-remaining"] = request[_RATELIMIT]
        return response

    def _blob_location(self, digest: str) -> str:
        if self.dialect.blob_redirect == "relative":
            return f"/storage/blobs/{digest}"
        # A signed query that must arrive byte for byte (%2F stays encoded).
        return f"{self.cdn_url}/blobs/{digest}?X-Amz-Signature=ab%2Fcd&X-Amz-Expires=600"

    def _challenge(self, repo: str, path: str, error: str | None = None) -> str | None:
        d = self.dialect
        if d.challenge_on_ping_only and path != "/v2/":
            return None
        if d.scheme == "basic":
            return f'Basic realm="{d.basic_realm}"'
        text = f'Bearer realm="{self.realm}",service="{d.service}"'
        scope = f"repository:{repo}:pull" if repo else d.ping_scope
        if scope:
            text += f',scope="{scope}"'
        if error:
            text += f',error="{error}"'
        return f'Basic realm="{d.basic_realm}", {text}' if d.both_schemes else text

    def _check_auth(self, request: web.Request, repo: str, path: str) -> web.Response | None:
        d = self.dialect
        header = request.headers.get("Authorization", "")
        if d.scheme == "none":
            return None
        if d.scheme == "basic":
            if self.tokens.accepted(header):
                return None
            return _unauthorized(self._challenge(repo, path))
        if not header.startswith("Bearer "):
            return _unauthorized(self._challenge(repo, path))
        scopes = self.tokens.granted.get(header.removeprefix("Bearer "))
        if scopes is None and d.invalid_token_400:
            return _error(400, "DENIED", "Your Authorization Token is invalid.")
        if scopes is None:
            return _unauthorized(self._challenge(repo, path, "invalid_token"))
        if d.head_blob_401 and request.method == "HEAD" and "/blobs/" in path:
            return _unauthorized(self._challenge(repo, path))
        missing = repo and repo not in self.repositories() and not d.redirect_all_to
        if repo and (f"repository:{repo}:pull" not in scopes
                     or (missing and d.missing == "insufficient_scope")):
            return _unauthorized(self._challenge(repo, path, "insufficient_scope"))
        return None


def _repository(path: str) -> str:
    rest = path[len("/v2/"):]
    for marker in ("/manifests/", "/blobs/", "/tags/list", "/referrers/"):
        if marker in rest:
            return rest.rsplit(marker, 1)[0]
    return ""


def _unauthorized(challenge: str | None) -> web.Response:
    if challenge is None:
        return web.json_response({"errors": [{"code": "UNAUTHORIZED"}]}, status=401)
    return web.json_response(
        {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
        status=401, headers={"WWW-Authenticate": challenge})


def _error(status: int, code: str, message: str,
           headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"errors": [{"code": code, "message": message}]}, status=status,
                             headers=headers)


DOCKER_HUB = Dialect(
    scheme="bearer", service="registry.docker.io", separate_token_host=True,
    token_fields=("token", "access_token"), expires_in=300, issued_at=True,
    missing="insufficient_scope", blob_redirect="cdn",
    users={"hub-bot": "dckr_pat_secret"},
)


@dataclass
class Rig:
    """A dialect registry with its token server and CDN, listening on loopback."""

    registry: DialectRegistry
    server: TestServer
    cdn: Cdn
    token_server: TestServer | None

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/") + self.registry.dialect.api_prefix

    @property
    def tokens(self) -> TokenService:
        return self.registry.tokens


async def start_rig(aiohttp_server: Any, dialect: Dialect) -> Rig:
    """Start a dialect registry, its CDN and (when separate) its token server."""
    registry = DialectRegistry(dialect)
    cdn = Cdn(registry.blobs)
    cdn_server: TestServer = await aiohttp_server(cdn.app())
    registry.cdn_url = str(cdn_server.make_url("")).rstrip("/")
    token_server: TestServer | None = None
    server: TestServer = await aiohttp_server(registry.app())
    if dialect.separate_token_host:
        token_server = await aiohttp_server(registry.tokens.app())
        registry.realm = str(token_server.make_url(dialect.realm_path))
    else:
        registry.realm = str(server.make_url(dialect.realm_path))
    return Rig(registry, server, cdn, token_server)


async def start_mirror(aiohttp_client: Any, tmp_path: Path, upstream: dict[str, Any],
                       env: dict[str, str] | None = None) -> Client:
    """A mirror app in front of one upstream configured as a user would."""
    document = {"version": 1, "storage": {"path": str(tmp_path / "cache")},
                "upstreams": [{"retries": 1, "connect_timeout": "2s", "read_timeout": "2s",
                               **upstream}]}
    settings = config.parse(document, env=env or {}, base=tmp_path)
    client: Client = await aiohttp_client(create_app(settings))
    return client


def seed(registry: DialectRegistry, repo: str, tag: str = "v1") -> tuple[str, list[str]]:
    """An image with two layers; returns the manifest digest and the blob digests."""
    digest, data = registry.add_image(repo, tag, [b"layer-a " + repo.encode(), b"layer-b"])
    document = json.loads(data)
    return digest, [document["config"]["digest"], *(layer["digest"] for layer in
                                                    document["layers"])]


async def pull(mirror: Client, ns: str, repo: str, tag: str = "v1") -> str:
    """Pull ``repo:tag`` through the mirror, checking every digest; returns the manifest's."""
    response = await mirror.get(f"/v2/{repo}/manifests/{tag}?ns={ns}", headers={"Accept": ACCEPT})
    body = await response.read()
    assert response.status == 200, body
    digest = response.headers["Docker-Content-Digest"]
    assert sha256(body) == digest
    document = json.loads(body)
    for blob in [document["config"]["digest"], *(x["digest"] for x in document["layers"])]:
        blob_response = await mirror.get(f"/v2/{repo}/blobs/{blob}?ns={ns}")
        assert blob_response.status == 200, await blob_response.text()
        assert sha256(await blob_response.read()) == blob
    return digest


def no_cdn_auth(rig: Rig) -> None:
    assert rig.cdn.violations == []
