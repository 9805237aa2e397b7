"""Credentials from ECR's ``GetAuthorizationToken``, through aiobotocore and the
standard AWS credential chain (environment, profile, SSO, instance or task role).

The token decodes to ``AWS:<password>`` and lasts 12 hours; it is fetched again
``refresh_margin`` before it expires. ECR Public has its own API (``ecr-public``,
answering in us-east-1 only) with the same shape of answer.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import structlog

from mirror.config import EcrCredential, Secret
from mirror.errors import Denied, UpstreamUnavailable
from mirror.metrics import CREDENTIAL_FETCHES
from mirror.upstream.auth import basic_authorization
from mirror.upstream.sources import CachedSecret

log = structlog.get_logger(__name__)


def wall_time() -> float:
    """Seconds since the epoch; ECR expiry times are wall-clock times (tests replace this)."""
    return time.time()


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
        self._cache = CachedSecret(self._now)

    async def authorization(self) -> Secret | None:
        return await self._cache.get(self._fetch_kept)

    async def _fetch_kept(self) -> tuple[Secret | None, float]:
        value, expires_at = await self._fetch()
        return value, expires_at - self._settings.refresh_margin

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
