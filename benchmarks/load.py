"""The verifying Python pull client (aiohttp), the client of the correctness runs.

:class:`PullClient` pulls like a real client: manifest by tag with the Accept
types of Docker and OCI, the linux/amd64 child of an index, then config and
layers (three at a time) that it does not have yet, logging in to a Bearer
realm when it gets a 401. It hashes every byte and raises
:class:`VerifyError` on a mismatch. Throughput figures come from the lean
clients of :mod:`benchmarks.lean` instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.support.images import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class VerifyError(RuntimeError):
    """A target answered bytes that do not match the digest asked for."""


@dataclass
class PullStats:
    """What one client received."""

    bytes: int = 0
    requests: int = 0
    blobs: int = 0
    ttfb: list[float] = field(default_factory=list)


def sha256(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class PullClient:
    """One client with its own connections and tokens, like one machine pulling.

    Args:
        base_url: the target, ``http://127.0.0.1:PORT``.
        parallel: layers downloaded at once (Docker's default is 3).
    """

    def __init__(self, base_url: str, parallel: int = 3) -> None:
        self.base_url = base_url
        self.parallel = parallel
        self.stats = PullStats()
        self._tokens: dict[str, str] = {}
        self.have: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PullClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.parallel + 1),
            auto_decompress=False, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=300))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _login(self, repo: str, challenge: str) -> None:
        assert self._session is not None
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm")
        params.setdefault("scope", f"repository:{repo}:pull")
        async with self._session.get(realm, params=params) as resp:
            resp.raise_for_status()
            body = await resp.json()
        self._tokens[repo] = body.get("token") or body["access_token"]

    async def _fetch(self, repo: str, path: str, digest: str | None,
                     accept: str | None = None) -> tuple[bytes, str]:
        """GET ``/v2/<repo>/<path>``; hash and count it; return small bodies."""
        assert self._session is not None
        url = f"{self.base_url}/v2/{repo}/{path}"
        for _ in range(2):
            headers = {"Accept": accept} if accept else {}
            if repo in self._tokens:
                headers["Authorization"] = f"Bearer {self._tokens[repo]}"
            started = time.perf_counter()
            async with self._session.get(url, headers=headers) as resp:
                self.stats.requests += 1
                if resp.status == 401 and repo not in self._tokens:
                    await resp.read()
                    await self._login(repo, resp.headers.get("WWW-Authenticate", ""))
                    continue
                if resp.status != 200:
                    raise VerifyError(f"GET {url}: {resp.status}")
                return await self._body(resp, url, digest, started)
        raise VerifyError(f"GET {url}: still 401 after login")

    async def _body(self, resp: aiohttp.ClientResponse, url: str, digest: str | None,
                    started: float) -> tuple[bytes, str]:
        hasher, kept, size = hashlib.sha256(), bytearray(), 0
        first = True
        async for chunk in resp.content.iter_chunked(1 << 20):
            if first:
                self.stats.ttfb.append(time.perf_counter() - started)
                first = False
            hasher.update(chunk)
            size += len(chunk)
            if size <= 4 << 20:  # manifests and configs are parsed; layers are not kept
                kept += chunk
        got = "sha256:" + hasher.hexdigest()
        if digest is not None and got != digest:
            raise VerifyError(f"GET {url}: content is {got}, expected {digest}")
        self.stats.bytes += size
        return bytes(kept), resp.headers.get("Content-Type", "")

    async def manifest(self, repo: str, reference: str, digest: str) -> bytes:
        """GET a manifest with the Accept types of a real client and verify it."""
        body, _ = await self._fetch(repo, f"manifests/{reference}", digest, ACCEPT)
        return body

    async def blob(self, repo: str, digest: str) -> None:
        """Download and verify one blob, unless this client has it already."""
        if digest in self.have:
            return  # a real client keeps layers it has (shared base layers)
        await self._fetch(repo, f"blobs/{digest}", digest)
        self.have.add(digest)
        self.stats.blobs += 1

    async def pull(self, repo: str, tag: str, expected: str, arch: str = "amd64") -> None:
        """Pull ``repo:tag`` for linux/``arch`` and verify every digest.

        Args:
            repo: repository.
            tag: tag to resolve.
            expected: digest the tag must resolve to.
            arch: the platform picked from an index.

        Raises:
            VerifyError: wrong content or an unexpected status.
        """
        body, media_type = await self._fetch(repo, f"manifests/{tag}", expected, ACCEPT)
        doc: dict[str, Any] = json.loads(body)
        if media_type in (OCI_INDEX, DOCKER_LIST) or "manifests" in doc:
            child = next(m for m in doc["manifests"]
                         if m.get("platform", {}).get("architecture") == arch)
            body, _ = await self._fetch(repo, f"manifests/{child['digest']}", child["digest"],
                                        ACCEPT)
            doc = json.loads(body)
        await self.blob(repo, doc["config"]["digest"])
        limit = asyncio.Semaphore(self.parallel)

        async def layer(digest: str) -> None:
            async with limit:
                await self.blob(repo, digest)

        await asyncio.gather(*(layer(d["digest"]) for d in doc["layers"]))
