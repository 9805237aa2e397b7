"""The pieces every credential source shares: its protocol, a static source, and a
cached value refreshed under a lock.

A source yields the ``Authorization: Basic`` value that goes to the registry
(Basic challenge) or to its token realm (Bearer challenge). Secrets stay wrapped
in :class:`~mirror.config.Secret`; logs name a credential by its label only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from mirror.config import Secret, StaticCredential
from mirror.upstream.auth import basic_authorization


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


#: Fetches a secret and says until when it may be kept.
Fetch = Callable[[], Awaitable[tuple[Secret | None, float]]]


class CachedSecret:
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

    async def get(self, fetch: Fetch) -> Secret | None:
        """The kept value, or a new one from ``fetch`` (value, kept until), fetched once."""
        value = self.fresh()
        if value is not None:
            return value
        async with self.lock:
            value = self.fresh()
            if value is None:
                value, self.until = await fetch()
                self.value = value
            return value
