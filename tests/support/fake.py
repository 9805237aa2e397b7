"""An in-process fake registry that records requests and injects faults.

For what a real registry cannot be made to do: drop a connection mid-blob,
send wrong bytes or an HTML page, drip slowly, answer 500 or 429. Content is
held in dicts; every request is recorded so tests can count upstream calls.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Fault:
    """What to do instead of answering normally, for requests matching ``path``.

    kind: ``status`` (answer ``status`` with ``headers`` and ``body``),
    ``drop`` (announce the full length, send ``after`` bytes, cut the
    connection), ``wrong`` (same length, other bytes), ``drip`` (send in
    ``chunk`` byte pieces every ``delay`` seconds), ``html`` (200 with a web
    page), ``hang`` (never answer), ``chunked`` (like drip, with no
    Content-Length, as some CDNs answer), ``slow`` (wait ``delay`` seconds,
    then answer normally), ``reset`` (close the connection without answering).
    """

    kind: str
    path: str = ""
    method: str | None = None
    times: int = 1_000_000
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    after: int = 0
    chunk: int = 65536
    delay: float = 0.01

    def matches(self, request: web.Request) -> bool:
        return self.times > 0 and self.path in request.path and (
            self.method is None or self.method == request.method)


@dataclass
class HubRateLimit:
    """Docker Hub's pull limit: every manifest GET counts, HEADs are free.

    Every answer carries ``ratelimit-limit`` / ``ratelimit-remaining`` like
    ``100;w=21600``; once ``remaining`` is 0, manifest GETs answer 429
    ``TOOMANYREQUESTS`` with ``Retry-After``.
    """

    limit: int
    remaining: int
    window: int = 21600
    retry_after: str | None = "3600"

    def headers(self) -> dict[str, str]:
        return {"ratelimit-limit": f"{self.limit};w={self.window}",
                "ratelimit-remaining": f"{self.remaining};w={self.window}"}


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class FakeRegistry:
    """A registry API over dicts, with faults."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.tags: dict[str, list[str]] = {}
        self.requests: list[Seen] = []
        self.faults: list[Fault] = []
        self.ratelimit: HubRateLimit | None = None
        self.cut_short = 0  # faulty answers whose client hung up before their end
        self._arrived = asyncio.Event()

    # --- content -------------------------------------------------------------
    def add_blob(self, data: bytes) -> str:
        digest = sha256(data)
        self.blobs[digest] = data
        return digest

    def add_manifest(self, repo: str, data: bytes, media_type: str,
                     tag: str | None = None) -> str:
        digest = sha256(data)
        self.manifests[(repo, digest)] = (data, media_type)
        if tag is not None:
            self.manifests[(repo, tag)] = (data, media_type)
            self.tags.setdefault(repo, []).append(tag)
        return digest

    def add_image(self, repo: str, tag: str | None, layers: list[bytes],
                  media_type: str = OCI_MANIFEST, arch: str = "amd64") -> tuple[str, bytes]:
        """An image manifest over ``layers``; returns (digest, manifest bytes)."""
        config = json.dumps({"architecture": arch, "os": "linux"}).encode()
        descriptors = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": self.add_blob(layer), "size": len(layer)} for layer in layers]
        document = {"schemaVersion": 2, "mediaType": media_type,
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                               "digest": self.add_blob(config), "size": len(config)},
                    "layers": descriptors}
        data = json.dumps(document, indent=2).encode()
        return self.add_manifest(repo, data, media_type, tag), data

    def add_index(self, repo: str, tag: str, children: list[tuple[str, bytes, str]],
                  media_type: str = OCI_INDEX) -> str:
        """An index over (digest, bytes, arch) children already added."""
        child_type = DOCKER_MANIFEST if media_type == DOCKER_LIST else OCI_MANIFEST
        document = {"schemaVersion": 2, "mediaType": media_type, "manifests": [
            {"mediaType": child_type, "digest": d, "size": len(b),
             "platform": {"os": "linux", "architecture": arch}} for d, b, arch in children]}
        return self.add_manifest(repo, json.dumps(document).encode(), media_type, tag)

    # --- observation -----------------------------------------------------------
    def count(self, method: str | None = None, contains: str = "") -> int:
        return sum(1 for r in self.requests
                   if (method is None or r.method == method) and contains in r.path)

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds; it is checked after every request and every
        drip cut short (bound the wait with ``asyncio.timeout``)."""
        while not condition():
            await self._arrived.wait()

    def _notify(self) -> None:
        event, self._arrived = self._arrived, asyncio.Event()
        event.set()

    def fault(self, **kwargs: Any) -> Fault:
        fault = Fault(**kwargs)
        self.faults.append(fault)
        return fault

    # --- the server ------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Seen(request.method, request.path_qs, dict(request.headers)))
        self._notify()
        for fault in self.faults:
            if fault.matches(request):
                fault.times -= 1
                try:
                    return await self._fault(request, fault)
                except (ConnectionError, asyncio.CancelledError):  # cancelled: test servers
                    self.cut_short += 1
                    self._notify()
                    raise
        limited = self._rate_limited(request)
        if limited is not None:
            return limited
        response = await self._answer(request)
        if self.ratelimit is not None:
            response.headers.update(self.ratelimit.headers())
        return response

    def _rate_limited(self, request: web.Request) -> web.Response | None:
        limit = self.ratelimit
        if limit is None or request.method != "GET" or "/manifests/" not in request.path:
            return None
        if limit.remaining > 0:
            limit.remaining -= 1
            return None
        headers = limit.headers()
        if limit.retry_after is not None:
            headers["Retry-After"] = limit.retry_after
        body = {"errors": [{"code": "TOOMANYREQUESTS", "message": "You have reached your pull "
                            "rate limit. You may increase the limit by authenticating."}]}
        return web.json_response(body, status=429, headers=headers)

    async def _answer(self, request: web.Request, path: str | None = None) -> web.StreamResponse:
        """Answer from content; ``path`` replaces the request's (a registry under a prefix)."""
        path = request.path if path is None else path
        if path == "/v2/":
            return web.json_response({})
        body, headers = self._lookup(path)
        if body is None:
            return web.json_response({"errors": [{"code": "NOT_FOUND"}]}, status=404)
        status, body, headers = _apply_range(request, body, headers)
        if request.method == "HEAD":
            response = web.StreamResponse(status=status, headers=headers)
            response.content_length = len(body)
            return response
        return web.Response(status=status, body=body, headers=headers)

    def _lookup(self, path: str) -> tuple[bytes | None, dict[str, str]]:
        rest = path[len("/v2/"):]
        if "/blobs/" in rest:
            digest = rest.rsplit("/blobs/", 1)[1]
            data = self.blobs.get(digest)
            return data, {"Content-Type": "application/octet-stream",
                          "Docker-Content-Digest": digest}
        if "/manifests/" in rest:
            repo, ref = rest.rsplit("/manifests/", 1)
            found = self.manifests.get((repo, ref))
            if found is None:
                return None, {}
            return found[0], {"Content-Type": found[1], "Docker-Content-Digest": sha256(found[0])}
        if rest.endswith("/tags/list"):
            repo = rest[: -len("/tags/list")]
            if repo not in self.tags:
                return None, {}
            return json.dumps({"name": repo, "tags": sorted(self.tags[repo])}).encode(), {
                "Content-Type": "application/json"}
        return None, {}

    async def _fault(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        if fault.kind == "status":
            return web.Response(status=fault.status, body=fault.body, headers=fault.headers)
        if fault.kind == "html":
            return web.Response(body=b"<html><body>Sign in to continue</body></html>",
                                content_type="text/html")
        if fault.kind == "hang":
            await asyncio.sleep(3600)
        if fault.kind == "slow":
            await asyncio.sleep(fault.delay)
            return await self._answer(request)
        if fault.kind == "reset":
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)  # never reaches the client
        body, headers = self._lookup(request.path)
        assert body is not None, f"fault {fault.kind} on unknown content {request.path}"
        status, body, headers = _apply_range(request, body, headers)
        response = web.StreamResponse(status=status, headers=headers)
        if fault.kind == "chunked":
            response.enable_chunked_encoding()
        else:
            response.content_length = len(body)
        await response.prepare(request)
        if fault.kind == "wrong":
            await response.write(bytes(b ^ 0xFF for b in body[:1]) + body[1:])
            await response.write_eof()
        elif fault.kind == "drop":
            await response.write(body[: fault.after])
            await response.drain()
            assert request.transport is not None
            request.transport.abort()
        elif fault.kind in ("drip", "chunked"):
            for start in range(0, len(body), fault.chunk):
                await response.write(body[start:start + fault.chunk])
                await asyncio.sleep(fault.delay)
            await response.write_eof()
        return response


def _apply_range(request: web.Request, body: bytes,
                 headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    header = request.headers.get("Range", "")
    first, _, last = header[6:].partition("-")
    if not header.startswith("bytes=") or not first.isdigit() or "," in header:
        return 200, body, headers
    start = int(first)
    end = min(int(last) + 1, len(body)) if last.isdigit() else len(body)
    headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(body)}"}
    return 206, body[start:end], headers
