"""Where upstream credentials come from, and which one is in use.

Three sources, each yielding the ``Authorization: Basic`` value that goes to
the registry (Basic challenge) or to its token realm (Bearer challenge):

- :class:`StaticSource`: a username and password from the config.
- :class:`DockerConfigSource`: a Docker ``config.json``, read the way Docker
  reads it: the registry's ``credHelpers`` entry, else ``credsStore``, runs
  ``docker-credential-<helper> get`` with the server on stdin and reads
  ``{"Username", "Secret"}`` back; else ``auths`` (``auth`` = base64
  ``user:password``, or ``username`` and ``password``).
- :class:`EcrSource`: ``ecr:GetAuthorizationToken`` through aiobotocore and the
  standard AWS credential chain; the token (user ``AWS``) lasts 12 hours and
  is fetched again ``refresh_margin`` before it expires.

A :class:`CredentialPool` holds an upstream's sources in order and answers
with the active one; when that one is rate-limited (a 429, or
``ratelimit-remaining: 0``) it moves on to the next. Secrets stay wrapped in
:class:`~mirror.config.Secret`; logs name a credential by its label only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import structlog

from mirror.config import (
    CredentialSettings,
    DockerConfigCredential,
    EcrCredential,
    Secret,
    StaticCredential,
)
from mirror.errors import Denied, UpstreamUnavailable
from mirror.metrics import CREDENTIAL_FETCHES, CREDENTIAL_ROTATIONS
from mirror.upstream.auth import basic_authorization

log = structlog.get_logger(__name__)

HELPER_REFRESH = 300.0
"""A credential helper's answer is reused this long before the helper runs again."""
_HELPER_OUTPUT_MAX = 64 * 1024


def wall_time() -> float:
    """Seconds since the epoch; ECR expiry times are wall-clock times (tests replace this)."""
    return time.time()


class CredentialSource(Protocol):
    """One credential of an upstream."""

    @property
    def label(self) -> str: ...

    async def authorization(self) -> Secret | None:
        """The ``Basic`` Authorization value, or ``None`` when there is none to give.

        Raises:
            Denied: the source cannot produce a credential (helper failed...).
            UpstreamUnavailable: the source's service is unreachable (ECR API).
        """
        ...

    def invalidate(self) -> bool:
        """Forget a cached value the registry rejected; True if a new one may differ."""
        ...


class StaticSource:
    """A username and password from the config."""

    def __init__(self, settings: StaticCredential) -> None:
        self.label = settings.label
        self._value = basic_authorization(settings.username, settings.password)

    async def authorization(self) -> Secret | None:
        return self._value

    def invalidate(self) -> bool:
        """Nothing to refetch: the config is what it is."""
        return False


class _Cached:
    """A value fetched under a lock and kept until ``until``, re-checked after locking."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.value: Secret | None = None
        self.until = 0.0
        self.lock = asyncio.Lock()

    def fresh(self) -> Secret | None:
        return self.value if self.value is not None and self.clock() < self.until else None

    def drop(self) -> None:
        self.value = None
        self.until = 0.0


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
        self._cache = _Cached(clock)

    async def authorization(self) -> Secret | None:
        value = self._cache.fresh()
        if value is not None:
            return value
        async with self._cache.lock:
            value = self._cache.fresh()
            if value is None:
                value = await self._lookup()
                self._cache.value = value
                self._cache.until = self._cache.clock() + HELPER_REFRESH
            return value

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
                username, secret = await run_helper(helper, server, self._settings.helper_timeout)
                result = basic_authorization(username, secret)
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


async def run_helper(helper: str, server: str, timeout: float) -> tuple[str, Secret]:
    """Run ``docker-credential-<helper> get`` with ``server`` on stdin, as Docker does.

    Returns:
        The username and the secret from its ``{"Username", "Secret"}`` answer.

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
        # Its output may hold a secret or nothing useful ("credentials not found").
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


class EcrSource:
    """Basic credentials from ``ecr:GetAuthorizationToken``.

    Args:
        settings: region, optional endpoint, profile and refresh margin.
        registry: the upstream's name, for metrics and logs.
        wall_clock: seconds since the epoch; by default :func:`wall_time`.
    """

    def __init__(self, settings: EcrCredential, registry: str,
                 wall_clock: Callable[[], float] | None = None) -> None:
        self.label = settings.label
        self._settings = settings
        self._registry = registry
        self._wall_clock = wall_clock
        self._cache = _Cached(self._now)

    async def authorization(self) -> Secret | None:
        value = self._cache.fresh()
        if value is not None:
            return value
        async with self._cache.lock:
            value = self._cache.fresh()
            if value is None:
                value, expires_at = await self._fetch()
                self._cache.value = value
                self._cache.until = expires_at - self._settings.refresh_margin
            return value

    def invalidate(self) -> bool:
        self._cache.drop()
        return True

    def _now(self) -> float:
        return self._wall_clock() if self._wall_clock is not None else wall_time()

    async def _fetch(self) -> tuple[Secret, float]:
        try:
            data = await self._call()
            username, password, expires_at = parse_ecr_authorization(data)
        except Exception:
            CREDENTIAL_FETCHES.labels(self._registry, "ecr", "error").inc()
            raise
        CREDENTIAL_FETCHES.labels(self._registry, "ecr", "ok").inc()
        log.info("upstream_credential_loaded", registry=self._registry, credential=self.label,
                 source="ecr", expires_in=round(expires_at - self._cache.clock()))
        return basic_authorization(username, password), expires_at

    async def _call(self) -> dict[str, Any]:
        # Imported here: botocore is slow to import and only ECR users need it.
        from aiobotocore.session import AioSession  # noqa: PLC0415
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        s = self._settings
        session = AioSession(profile=s.profile)
        service = "ecr-public" if s.public else "ecr"
        kwargs: dict[str, Any] = {}
        if s.registry_id and not s.public:
            kwargs["registryIds"] = [s.registry_id]
        try:
            async with session.create_client(service, region_name=s.region,
                                             endpoint_url=s.endpoint_url) as ecr:
                answer: dict[str, Any] = await ecr.get_authorization_token(**kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise Denied(f"{self._registry}: ECR GetAuthorizationToken refused ({code})") from None
        except (BotoCoreError, OSError) as exc:
            raise UpstreamUnavailable(f"{self._registry}: ECR GetAuthorizationToken failed "
                                      f"({type(exc).__name__})", status=503) from None
        return answer


def parse_ecr_authorization(answer: dict[str, Any]) -> tuple[str, Secret, float]:
    """``(username, password, expires_at)`` from a ``GetAuthorizationToken`` answer
    (ECR's has a list of ``authorizationData``, ECR Public's one object).

    Raises:
        UpstreamUnavailable: the answer carries no usable token.
    """
    try:
        data = answer["authorizationData"]
        data = data[0] if isinstance(data, list) else data
        decoded = base64.b64decode(data["authorizationToken"]).decode()
        expires = data["expiresAt"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise UpstreamUnavailable("ECR answered no authorization token", status=502) from None
    username, sep, password = decoded.partition(":")
    if not sep:
        raise UpstreamUnavailable("ECR authorization token has no ':'", status=502)
    expires_at = expires.timestamp() if isinstance(expires, datetime) else float(expires)
    return username, Secret(password), expires_at


def make_source(settings: CredentialSettings, registry: str) -> CredentialSource:
    """The runtime source for one configured credential."""
    if isinstance(settings, StaticCredential):
        return StaticSource(settings)
    if isinstance(settings, DockerConfigCredential):
        return DockerConfigSource(settings, registry)
    return EcrSource(settings, registry)


class CredentialPool:
    """An upstream's credentials in order; one is active at a time.

    Args:
        registry: the upstream's name, for metrics and logs.
        sources: the credentials, first preferred.
    """

    def __init__(self, registry: str, sources: Sequence[CredentialSource]) -> None:
        self._registry = registry
        self._sources = list(sources)
        self._active = 0

    def __repr__(self) -> str:
        return f"CredentialPool({self._registry!r}, {[s.label for s in self._sources]})"

    def __len__(self) -> int:
        return len(self._sources)

    @property
    def active(self) -> str | None:
        """The label of the credential in use, or ``None`` when there are none."""
        return self._sources[self._active].label if self._sources else None

    async def authorization(self) -> Secret | None:
        """The active credential's ``Basic`` value (``None`` if there is none)."""
        if not self._sources:
            return None
        return await self._sources[self._active].authorization()

    def invalidate(self) -> bool:
        """The registry rejected the active credential: fetch it afresh next time.

        Returns:
            Whether the next value may differ (False for a static credential).
        """
        return bool(self._sources) and self._sources[self._active].invalidate()

    def rate_limited(self, label: str | None, reason: str) -> bool:
        """Move on from credential ``label`` because it is rate-limited.

        Args:
            label: the credential the limited request went out with; if another
                request already moved on, nothing changes.
            reason: ``429`` or ``remaining``, for the metric.

        Returns:
            Whether the active credential is now a different one than ``label``.
        """
        if len(self._sources) < 2 or label is None:
            return False
        if self.active != label:
            return True
        self._active = (self._active + 1) % len(self._sources)
        CREDENTIAL_ROTATIONS.labels(self._registry, reason).inc()
        log.warning("upstream_credential_rotated", registry=self._registry, reason=reason,
                    previous=label, active=self.active)
        return True
