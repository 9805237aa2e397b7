"""Which of an upstream's credentials is in use, and where each comes from.

Three kinds of source (:mod:`mirror.upstream.sources`): a username and password
from the config, a Docker ``config.json`` (:mod:`mirror.upstream.dockerconfig`)
and ECR (:mod:`mirror.upstream.ecr`). A :class:`CredentialPool` holds an
upstream's sources in order and answers with the active one; when that one is
rate-limited (a 429, or ``ratelimit-remaining: 0``) it moves on to the next.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from mirror.config import CredentialSettings, DockerConfigCredential, Secret, StaticCredential
from mirror.metrics import CREDENTIAL_ROTATIONS
from mirror.upstream.dockerconfig import DockerConfigSource
from mirror.upstream.ecr import EcrSource
from mirror.upstream.sources import CredentialSource, StaticSource

log = structlog.get_logger(__name__)


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
