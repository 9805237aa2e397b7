"""Credentials from a Docker ``config.json``, read the way Docker reads it.

For the registry's server: its ``credHelpers`` entry, else ``credsStore``, runs
``docker-credential-<helper> get`` with the server on stdin and reads
``{"Username", "Secret"}`` back (in a subprocess, never blocking the loop, killed
after a timeout); else the ``auths`` entry (``auth`` = base64 ``user:password``,
or ``username`` and ``password``). Keys match by host, as Docker's
``ConvertToHostname`` does. Podman's ``auth.json`` has the same format.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from mirror.config import DockerConfigCredential, Secret
from mirror.errors import Denied
from mirror.metrics import CREDENTIAL_FETCHES
from mirror.upstream.auth import basic_authorization
from mirror.upstream.sources import CachedSecret

log = structlog.get_logger(__name__)

CREDENTIALS_NOT_FOUND = b"credentials not found in native keychain"
"""What docker-credential-helpers print (exit 1) for a server they hold nothing for."""
HELPER_REFRESH = 300.0
"""A credential helper's answer is reused this long before the helper runs again."""
_HELPER_OUTPUT_MAX = 64 * 1024


class DockerConfigSource:
    """Credentials for ``server`` from a Docker ``config.json``.

    Args:
        settings: the file, the server key and the helper timeout.
        registry: the upstream's name, for metrics and logs.
        clock: when a helper's answer was obtained (tests move it).
    """

    def __init__(self, settings: DockerConfigCredential, registry: str,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label = settings.label
        self._settings = settings
        self._registry = registry
        self._cache = CachedSecret(clock)

    async def authorization(self) -> Secret | None:
        return await self._cache.get(self._lookup_kept)

    async def _lookup_kept(self) -> tuple[Secret | None, float]:
        return await self._lookup(), self._cache.clock() + HELPER_REFRESH

    def invalidate(self) -> bool:
        self._cache.drop()
        return True

    async def _lookup(self) -> Secret | None:
        document = await asyncio.to_thread(_read_json, self._settings.path)
        server = self._settings.server
        helper = _helper_for(document, server)
        result: Secret | None
        try:
            if helper is not None:
                found = await run_helper(helper, server, self._settings.helper_timeout)
                result = basic_authorization(*found) if found is not None else None
            else:
                result = _from_auths(document, server)
        except Denied:
            CREDENTIAL_FETCHES.labels(self._registry, "docker_config", "error").inc()
            raise
        CREDENTIAL_FETCHES.labels(self._registry, "docker_config", "ok").inc()
        log.info("upstream_credential_loaded", registry=self._registry, credential=self.label,
                 source="helper" if helper else "auths", found=result is not None)
        return result


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise Denied(f"cannot read docker config {path}: {type(exc).__name__}") from None
    return document if isinstance(document, dict) else {}


_DOCKER_HUB_HOSTS = frozenset({"index.docker.io", "docker.io", "registry-1.docker.io",
                               "registry.hub.docker.com"})


def _host_of(key: str) -> str:
    """Docker's ``ConvertToHostname``: drop the scheme and any path. Docker Hub's
    names are one host (podman and some tools write ``docker.io``)."""
    for scheme in ("https://", "http://"):
        key = key.removeprefix(scheme)
    host = key.split("/", 1)[0].lower()
    return "index.docker.io" if host in _DOCKER_HUB_HOSTS else host


def _lookup_key(mapping: Any, server: str) -> Any:
    if not isinstance(mapping, dict):
        return None
    if server in mapping:
        return mapping[server]
    host = _host_of(server)
    return next((v for k, v in mapping.items() if _host_of(str(k)) == host), None)


def _helper_for(document: dict[str, Any], server: str) -> str | None:
    helper = _lookup_key(document.get("credHelpers"), server) or document.get("credsStore")
    return helper if isinstance(helper, str) and helper else None


def _from_auths(document: dict[str, Any], server: str) -> Secret | None:
    entry = _lookup_key(document.get("auths"), server)
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            decoded = base64.b64decode(entry["auth"], validate=True).decode()
        except ValueError:
            raise Denied(f"docker config: the auth entry for {server} is not base64") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise Denied(f"docker config: the auth entry for {server} has no ':'")
        return basic_authorization(username, Secret(password))
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return basic_authorization(entry["username"], Secret(entry["password"]))
    return None


async def run_helper(helper: str, server: str, timeout: float) -> tuple[str, Secret] | None:
    """Run ``docker-credential-<helper> get`` with ``server`` on stdin, as Docker does.

    Returns:
        The username and the secret from its ``{"Username", "Secret"}`` answer, or
        ``None`` when it holds nothing for the server ("credentials not found").

    Raises:
        Denied: the helper is missing, fails, times out or answers nonsense.
    """
    program = f"docker-credential-{helper}"
    try:
        # Its own session, so that a timeout kills whatever it started too.
        process = await asyncio.create_subprocess_exec(
            program, "get", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise Denied(f"credential helper {program} cannot run: {exc.strerror}") from None
    try:
        async with asyncio.timeout(timeout):
            stdout, _ = await process.communicate(server.encode())
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise Denied(f"credential helper {program} did not answer within {timeout:g}s") from None
    if process.returncode != 0:
        if stdout.strip() == CREDENTIALS_NOT_FOUND:
            return None  # as Docker does: no credentials for this server, go anonymous
        # Its output may hold a secret, so it is not shown.
        raise Denied(f"credential helper {program} failed (exit {process.returncode})")
    return _parse_helper_output(stdout[:_HELPER_OUTPUT_MAX], program)


def _parse_helper_output(stdout: bytes, program: str) -> tuple[str, Secret]:
    try:
        answer = json.loads(stdout)
    except ValueError:
        raise Denied(f"credential helper {program} did not answer JSON") from None
    username = answer.get("Username") if isinstance(answer, dict) else None
    secret = answer.get("Secret") if isinstance(answer, dict) else None
    if not isinstance(username, str) or not isinstance(secret, str) or not secret:
        raise Denied(f"credential helper {program} answered no Username and Secret")
    if username == "<token>":
        # An identity token is an OAuth2 refresh token, not a password.
        raise Denied(f"credential helper {program} gave an identity token, which this "
                     "mirror does not exchange; configure a username and token instead")
    return username, Secret(secret)
