"""Which upstream registry and repository a request means.

The path is parsed once, here, into a :class:`Target`; nothing below sees a
raw string from the request. The registry is chosen, in this order, by:

1. a path prefix before ``/v2`` (``/ghcr/v2/org/app/...``: containerd and
   Docker with a mirror URL that has a path);
2. ``?ns=<registry>`` (containerd, BuildKit, regclient);
3. a configured registry name as the first path component after ``/v2``
   (``/v2/ghcr.io/org/app/...``: podman, skopeo, crane);
4. the default registry (Docker's ``registry-mirrors``).

Only configured registries are ever contacted: a request naming any other
host is refused here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from yarl import URL

from mirror.config import UpstreamSettings
from mirror.errors import NameInvalid, NameUnknown, RouteNotFound, Unsupported
from mirror.oci import Digest, is_digest_reference, validate_name, validate_tag


class Kind(Enum):
    PING = "ping"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    REFERRERS = "referrers"


# (kind, pattern, a substring the path must contain for the pattern to be tried)
_PATTERNS: list[tuple[Kind | None, re.Pattern[str], str]] = [
    (None, re.compile(r"(?P<name>.+)/blobs/uploads(?:/.*)?"), "/blobs/uploads"),
    (Kind.MANIFEST, re.compile(r"(?P<name>.+)/manifests/(?P<ref>[^/]+)"), "/manifests/"),
    (Kind.BLOB, re.compile(r"(?P<name>.+)/blobs/(?P<ref>[^/]+)"), "/blobs/"),
    (Kind.TAGS, re.compile(r"(?P<name>.+)/tags/list"), "/tags/list"),
    (Kind.REFERRERS, re.compile(r"(?P<name>.+)/referrers/(?P<ref>[^/]+)"), "/referrers/"),
]
_V2 = re.compile(r"(?:/(?P<prefix>[^/]+))?/v2(?:/(?P<rest>.*))?")


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed, validated request for one upstream."""

    kind: Kind
    upstream: UpstreamSettings | None
    repository: str = ""  # the upstream repository (``library/`` added for Docker Hub)
    reference: str = ""  # tag, or digest as text
    digest: Digest | None = None
    client_name: str = ""  # the repository part of the path, as the client sent it
    prefix: str | None = None  # path prefix before /v2
    ns: str | None = None

    def client_path(self, suffix: str) -> str:
        """A path in the client's own layout, for ``Link`` headers."""
        base = f"/{self.prefix}/v2" if self.prefix else "/v2"
        return f"{base}/{self.client_name}/{suffix}"


class Router:
    """Maps requests to configured upstreams."""

    def __init__(self, upstreams: tuple[UpstreamSettings, ...]) -> None:
        self._by_name: dict[str, UpstreamSettings] = {}
        for upstream in upstreams:
            for name in upstream.names():
                self._by_name.setdefault(name, upstream)
        self._default = next((u for u in upstreams if u.default), None)

    def lookup(self, name: str) -> UpstreamSettings | None:
        """The upstream a registry name or alias means, if configured."""
        return self._by_name.get(name.lower().rstrip("/"))

    def route(self, path: str, query: dict[str, str] | None = None) -> Target:
        """Parse a request path (and its query) into a :class:`Target`.

        Raises:
            RouteNotFound: not a registry API path.
            Unsupported: a push or other write.
            NameInvalid, NameUnknown, TagInvalid, DigestInvalid: bad input or a
                registry that is not configured.
        """
        match = _V2.fullmatch(path)
        if match is None:
            raise RouteNotFound(f"no such endpoint: {path[:200]}")
        prefix, rest = match.group("prefix"), (match.group("rest") or "").rstrip("/")
        ns = (query or {}).get("ns")
        upstream = self._explicit_upstream(prefix, ns)
        if not rest:
            return Target(Kind.PING, upstream, prefix=prefix, ns=ns)
        kind, client_name, reference = _parse_rest(rest)
        upstream, repository = self._upstream_and_repository(upstream, client_name,
                                                             explicit=prefix or ns)
        digest = None
        if kind in (Kind.BLOB, Kind.REFERRERS) or (
                kind is Kind.MANIFEST and is_digest_reference(reference)):
            digest = Digest.parse(reference)
        elif kind is Kind.MANIFEST:
            validate_tag(reference)
        return Target(kind, upstream, repository, reference, digest, client_name, prefix, ns)

    def _explicit_upstream(self, prefix: str | None, ns: str | None) -> UpstreamSettings | None:
        by_prefix = by_ns = None
        if prefix is not None:
            by_prefix = self.lookup(prefix)
            if by_prefix is None:
                raise NameUnknown(f"no registry named {prefix[:100]!r} is configured on this "
                                  "mirror")
        if ns is not None:
            by_ns = self.lookup(ns)
            if by_ns is None:
                raise NameUnknown(f"registry {ns[:100]!r} (from ns=) is not configured on this "
                                  "mirror")
        if by_prefix and by_ns and by_prefix is not by_ns:
            raise NameInvalid(f"path prefix {prefix!r} and ns={ns!r} name different registries")
        return by_prefix or by_ns

    def _upstream_and_repository(self, upstream: UpstreamSettings | None, name: str,
                                 explicit: str | None) -> tuple[UpstreamSettings, str]:
        first, _, remainder = name.partition("/")
        named = self.lookup(first) if remainder else None
        if named is not None and (upstream is None or named is upstream):
            upstream, name = named, remainder
        elif upstream is None:
            upstream = self._default
            if upstream is None:
                raise NameUnknown("the request names no registry and this mirror has no "
                                  "default registry")
            if upstream.library_prefix and remainder and ("." in first or ":" in first):
                raise NameUnknown(f"registry {first[:100]!r} is not configured on this mirror")
        if upstream.library_prefix and "/" not in name:
            name = f"library/{name}"
        validate_name(name)  # as upstream will see it: 255 characters with library/
        return upstream, name


def _parse_rest(rest: str) -> tuple[Kind, str, str]:
    for kind, pattern, marker in _PATTERNS:
        if marker not in rest:
            continue
        match = pattern.fullmatch(rest)
        if match is None:
            continue
        if kind is None:
            raise Unsupported("this mirror is read-only: pushes are not supported")
        name = match.group("name")
        reference = match.group("ref") if kind in (Kind.MANIFEST, Kind.BLOB,
                                                   Kind.REFERRERS) else ""
        return kind, name, reference
    if rest == "_catalog":
        raise Unsupported("this mirror does not list repositories")
    raise RouteNotFound(f"no such endpoint: /v2/{rest[:200]}")


def tags_link(target: Target, n: int | None, last: str) -> str:
    """The ``Link: <...>; rel="next"`` of a tag list page, in the client's own layout.

    ``ns`` is kept when the client used it.
    """
    query = {"last": last, **({"n": str(n)} if n is not None else {})}
    if target.ns:
        query["ns"] = target.ns
    url = URL(target.client_path("tags/list")).with_query(query)
    return f'<{url}>; rel="next"'
