"""The mirror's exceptions.

Every error a client can see is an :class:`OciError`: it carries the OCI error
code and HTTP status and renders its own JSON body. Everything else is a bug
and becomes a 500 with no details in the body.

::

    MirrorError
    ├── ConfigError                 a config file or value is wrong (names its key)
    ├── ListenError                 the listen address cannot be bound (in use, no right)
    ├── OciError                    rendered to clients as {"errors": [...]}
    │   ├── RouteNotFound           404 NOT_FOUND (not a registry API path)
    │   ├── PaginationNumberInvalid 400 PAGINATION_NUMBER_INVALID (a bad ?n=)
    │   ├── NameInvalid             400 NAME_INVALID
    │   ├── TagInvalid              400 TAG_INVALID
    │   ├── DigestInvalid           400 DIGEST_INVALID
    │   ├── RangeInvalid            416 RANGE_INVALID (with Content-Range)
    │   ├── NameUnknown             404 NAME_UNKNOWN
    │   ├── ManifestUnknown         404 MANIFEST_UNKNOWN
    │   ├── BlobUnknown             404 BLOB_UNKNOWN
    │   ├── ManifestInvalid         502 MANIFEST_INVALID (upstream sent bad bytes)
    │   ├── Unsupported             405 UNSUPPORTED (push, delete, ...)
    │   ├── Denied                  403 DENIED
    │   │   └── PolicyDenied        403 DENIED: the image fails the signature policy
    │   ├── Unauthorized            401 UNAUTHORIZED (with a challenge)
    │   ├── TooManyRequests         429 TOOMANYREQUESTS (with Retry-After)
    │   ├── UpstreamUnavailable     502/503/504 UNAVAILABLE (upstream down, slow, broken)
    │   │   └── DigestMismatch      502: bytes of the wrong size or hash (never published)
    ├── FillError                   an upstream download failed after bytes went out
    ├── TransientError              an upstream attempt worth retrying (never leaves the client)
    ├── StorageError                a storage backend refused or failed an operation
    ├── CacheCommandError           a `mirror cache` command cannot do what was asked
    └── BundleError                 a bundle cannot be exported or imported (one readable line)
"""

from __future__ import annotations

import json
from typing import Any, ClassVar


class MirrorError(Exception):
    """Base of every exception the mirror raises on purpose."""


class ConfigError(MirrorError):
    """A configuration value is missing or wrong.

    Args:
        key: dotted path of the bad key, e.g. ``upstreams[1].url``.
        message: what is wrong with it.
    """

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


class ListenError(MirrorError):
    """A listen address cannot be bound: the machine's state, not the config's (another
    process holds the port, or binding it needs a right this user lacks)."""


class OciError(MirrorError):
    """An error that clients see as an OCI error body."""

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(
        self,
        message: str,
        *,
        detail: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> bytes:
        """The JSON error body of the OCI distribution spec."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            error["detail"] = self.detail
        return json.dumps({"errors": [error]}).encode()


class RouteNotFound(OciError):
    """Not a registry API path."""

    code = "NOT_FOUND"
    status = 404


class PaginationNumberInvalid(OciError):
    code = "PAGINATION_NUMBER_INVALID"
    status = 400


class NameInvalid(OciError):
    code = "NAME_INVALID"
    status = 400


class TagInvalid(OciError):
    code = "TAG_INVALID"
    status = 400


class DigestInvalid(OciError):
    code = "DIGEST_INVALID"
    status = 400


class RangeInvalid(OciError):
    code = "RANGE_INVALID"
    status = 416

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message, headers={"Content-Range": f"bytes */{size}"})


class NameUnknown(OciError):
    code = "NAME_UNKNOWN"
    status = 404


class ManifestUnknown(OciError):
    code = "MANIFEST_UNKNOWN"
    status = 404


class BlobUnknown(OciError):
    code = "BLOB_UNKNOWN"
    status = 404


class ManifestInvalid(OciError):
    code = "MANIFEST_INVALID"
    status = 502


class Unsupported(OciError):
    code = "UNSUPPORTED"
    status = 405


class Unauthorized(OciError):
    """The client sent no credentials, or wrong ones; ``challenge`` tells it how to log in."""

    code = "UNAUTHORIZED"
    status = 401

    def __init__(self, message: str, challenge: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": challenge})


class Denied(OciError):
    code = "DENIED"
    status = 403


class PolicyDenied(Denied):
    """The image fails an ``enforce`` rule of the signature policy; the message names the
    rule and the reason, and the fields keep them (for the audit line and the status page).
    """

    def __init__(self, rule: int | None, reason: str, repository: str, digest: str) -> None:
        where = f"rule {rule}" if rule is not None else "the default"
        super().__init__(f"policy: {repository}@{digest} refused by {where}: {reason}",
                         detail={"rule": rule, "reason": reason, "digest": digest})
        self.rule = rule
        self.reason = reason
        self.digest = digest


class TooManyRequests(OciError):
    """Upstream rate-limited us (or the mirror's own request budget for it is spent,
    or its breaker opened after 429s) and nothing cached can answer instead."""

    code = "TOOMANYREQUESTS"
    status = 429

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else {}
        super().__init__(message, headers=headers)
        self.retry_after = retry_after


class UpstreamUnavailable(OciError):
    """Upstream refused, timed out, answered 5xx or sent something unusable; or its
    circuit breaker is open (503 with ``Retry-After``)."""

    code = "UNAVAILABLE"
    status = 503

    def __init__(self, message: str, *, status: int = 503,
                 retry_after: float | None = None) -> None:
        headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after else {}
        super().__init__(message, headers=headers)
        self.status = status  # type: ignore[misc]
        self.retry_after = retry_after


class DigestMismatch(UpstreamUnavailable):
    """Bytes from a source, or written to a store, are not the digest (wrong size or hash).

    Nothing is published; a client that already got headers is cut off.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, status=502)


class FillError(MirrorError):
    """An upstream download failed; readers must abort their connections."""


class TransientError(MirrorError):
    """A failure worth retrying: connection trouble, a timeout or a 5xx.

    Args:
        reason: metric reason, ``connect``, ``timeout`` or ``status_5xx``.
        status: the HTTP status to report if retries run out (502, 503 or 504).
        detail: a short description without URLs or credentials.
    """

    def __init__(self, reason: str, status: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status
        self.detail = detail


class StorageError(MirrorError):
    """A storage backend refused or failed an operation."""




class CacheCommandError(MirrorError):
    """A ``mirror cache`` command cannot do what was asked (one readable line)."""


class BundleError(MirrorError):
    """``mirror export`` or ``mirror import`` cannot do what was asked (one readable line)."""
