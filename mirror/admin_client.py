"""The one client of a running mirror's admin API, for the commands (``warm``, ``sync``).

A running server owns the cache: a command that finds one (``--server URL``, or the
config's ``admin.listen`` or else ``listen`` address, on loopback) asks it rather than
working on the storage folder itself. Every request carries the node's local admin
token (``<storage>/admin.token``, :mod:`mirror.server.localtoken`), or else the
config's ``admin.token``. Errors are :class:`~mirror.errors.CacheCommandError`: one
readable line for the CLI.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from mirror.config import Settings
from mirror.errors import CacheCommandError
from mirror.server.localtoken import read_local_token

PROBE_TIMEOUT = 1.0
REQUEST_TIMEOUT = 3600.0  # a warm or a sync pass may take long; the server streams progress


class AdminClient:
    """The admin API of the mirror at ``url``, with the token ``settings`` give."""

    def __init__(self, url: str, settings: Settings) -> None:
        self.url = url.rstrip("/")
        self._token = admin_token(settings)

    @classmethod
    def find(cls, settings: Settings, server: str | None) -> AdminClient | None:
        """The running mirror to ask: ``server`` (which must answer), else the config's
        address if a mirror is ready there, else ``None`` (work locally).

        Raises:
            CacheCommandError: ``server`` was given and nothing answers there.
        """
        if server:
            url = str(server).rstrip("/")
            if probe(url) is None:
                raise CacheCommandError(f"no mirror answers at {url}")
            return cls(url, settings)
        url = local_url(settings)
        return cls(url, settings) if probe(url) == 200 else None

    def get(self, path: str) -> dict[str, Any]:
        """``GET path``: its JSON object."""
        return self._document(path, None)

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """``POST path`` with a JSON body: the JSON object answered."""
        return self._document(path, body)

    def post_lines(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """``POST path``: the JSON lines the server streams, as they come."""
        with self._open(path, body) as resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)

    def _document(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        with self._open(path, body) as resp:
            document = json.loads(resp.read())
        if not isinstance(document, dict):
            raise CacheCommandError(f"{self.url}{path} did not answer a JSON object")
        return document

    def _open(self, path: str, body: dict[str, Any] | None) -> Any:
        url = f"{self.url}{path}"
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                         headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT,
                                          context=_context(url))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300]
            raise CacheCommandError(f"{url}: {exc.code} {detail}") from None
        except OSError as exc:
            raise CacheCommandError(f"{url}: {exc}") from None


def local_url(settings: Settings) -> str:
    """Where this config's mirror answers admin requests, seen from this machine."""
    host, port = settings.listen_host, settings.listen_port
    if settings.admin is not None and settings.admin.listen is not None:
        host, port = settings.admin.listen  # the admin API answers only there
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    scheme = "https" if settings.tls is not None else "http"
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def admin_token(settings: Settings) -> str | None:
    """The admin token the admin API wants: the node's local one (in the storage folder,
    readable by who may run the node), else the config's ``admin.token``."""
    local = read_local_token(settings.storage.path)
    if local is not None:
        return local
    admin = settings.admin
    return admin.token.reveal() if admin is not None and admin.token is not None else None


def probe(url: str) -> int | None:
    """The status ``GET /readyz`` answers at ``url``, or ``None`` if nothing answers."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=PROBE_TIMEOUT,
                                    context=_context(url)) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def _context(url: str) -> ssl.SSLContext | None:
    if not url.startswith("https"):
        return None
    context = ssl.create_default_context()
    # Our own server on this machine, possibly with a self-signed certificate.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context
