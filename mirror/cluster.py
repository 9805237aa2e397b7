"""Peers of a region: who they are, which are healthy, who owns a digest, and their tokens.

No consensus, no leader, no gossip. PeerSet is the static peer list plus
every address a DNS name resolves to (a Kubernetes headless Service),
re-resolved every few seconds. A member joins the hash only after it answered
a health check, and leaves it after ``health_failures`` failed checks or
failed requests in a row (Spegel dialled dead peers for minutes; we stop in
seconds). Rendezvous hashing (highest random weight) over the healthy members
and this node names a digest's owner: a membership change moves about 1/N of
the digests.

Peers authenticate with short-lived tokens signed with the shared secret
(HMAC-SHA256): ``mirror-peer.v2.<node>.<expires>.<signature>``. The signature also
covers the node the token is sent to (its base URL: the audience), the method and
the path with its query, so a token seen once opens nothing else: not another node,
not another digest, not a HEAD turned into a GET. Tokens carry no upstream
credential and open nothing but the peer API.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import structlog
from yarl import URL

from mirror import metrics
from mirror.clock import SYSTEM, Clock
from mirror.config import ClusterSettings

log = structlog.get_logger(__name__)

TOKEN_PREFIX = "mirror-peer.v2"
#: Seconds a token may outlive its TTL (clocks of two nodes differ a little).
CLOCK_SKEW = 5
HOP_HEADER = "X-Mirror-Hop"
HEALTH_PATH = "/_peer/health"
#: Where a node says what its clients pull most (read by child regions' sync loops).
POPULAR_PATH = "/_peer/popular"


def sign_token(secret: str, node_id: str, expires_at: float, *, audience: str,
               method: str, path: str) -> str:
    """A peer token for ``node_id`` valid until ``expires_at`` (wall clock), for one
    request: ``method`` on ``path`` (with its query, as sent) of the node at ``audience``
    (a base URL, ``scheme://host:port``)."""
    expires = int(expires_at)
    signature = _signature(secret, node_id, expires, audience=audience, method=method,
                           path=path)
    return f"{TOKEN_PREFIX}.{node_id}.{expires}.{signature}"


def verify_token(secret: str, token: str, now: float, max_ttl: float, *,
                 audiences: Sequence[str], method: str, path: str) -> str | None:
    """The node id a valid, unexpired token names, if it was made for ``method`` on
    ``path`` of one of ``audiences`` (this node's base URLs); else ``None``."""
    if not token.startswith(TOKEN_PREFIX + ".") or len(token) > 300:
        return None
    parts = token[len(TOKEN_PREFIX) + 1:].rsplit(".", 2)
    if len(parts) != 3 or not parts[1].isascii() or not parts[1].isdigit():
        return None
    node_id, expires, signature = parts
    if not now <= int(expires) <= now + max_ttl + CLOCK_SKEW:
        return None
    for audience in audiences:
        expected = _signature(secret, node_id, int(expires), audience=audience,
                              method=method, path=path)
        if hmac.compare_digest(expected, signature):
            return node_id
    return None


def _signature(secret: str, node_id: str, expires: int, *, audience: str, method: str,
               path: str) -> str:
    message = "\n".join((f"{node_id}.{expires}", audience.rstrip("/"), method.upper(), path))
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def token_scope(url: str | URL) -> tuple[str, str]:
    """The audience (base URL) and path with query of a request URL, as a token binds them."""
    parsed = url if isinstance(url, URL) else URL(url)
    return str(parsed.origin()), parsed.raw_path_qs


def rendezvous(key: str, members: Sequence[str]) -> list[str]:
    """``members`` ranked for ``key``, owner first (highest random weight)."""
    def weight(member: str) -> int:
        digest = hashlib.blake2b(f"{member}\0{key}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")
    return sorted(members, key=weight, reverse=True)


@dataclass
class _Member:
    url: str
    healthy: bool = False
    failures: int = 0
    quarantined_until: float = 0.0


class PeerSet:
    """The members of this node's region and their health."""

    def __init__(self, settings: ClusterSettings, self_url: str, clock: Clock = SYSTEM) -> None:
        self.settings = settings
        self.self_url = self_url
        self._clock = clock
        self._members: dict[str, _Member] = {}
        self._dns: list[str] = []
        self._update(list(settings.peers))

    def _update(self, urls: list[str]) -> None:
        wanted = {u for u in urls if u != self.self_url}
        for url in wanted - self._members.keys():
            self._members[url] = _Member(url)
            log.info("peer_joined", peer=url)
        for url in set(self._members) - wanted:
            del self._members[url]
            log.info("peer_left", peer=url)
        self._publish()

    def _publish(self) -> None:
        metrics.PEER_MEMBERS.labels("known").set(len(self._members))
        metrics.PEER_MEMBERS.labels("healthy").set(len(self.healthy()))

    @property
    def members(self) -> list[str]:
        """Every known peer (not this node)."""
        return sorted(self._members)

    def healthy(self) -> list[str]:
        """The peers in the hash now: healthy and not quarantined."""
        now = self._clock.monotonic()
        return sorted(m.url for m in self._members.values()
                      if m.healthy and m.quarantined_until <= now)

    def ranked(self, key: str) -> list[str]:
        """This node and the healthy peers, ranked for ``key`` (the owner first)."""
        return rendezvous(key, [*self.healthy(), self.self_url])

    def succeeded(self, url: str) -> None:
        """A check or request to ``url`` worked."""
        member = self._members.get(url)
        if member is None:
            return
        member.failures = 0
        if not member.healthy:
            member.healthy = True
            log.info("peer_healthy", peer=url)
            self._publish()

    def failed(self, url: str, reason: str) -> None:
        """A check or request to ``url`` failed; enough in a row take it out of the hash."""
        member = self._members.get(url)
        if member is None:
            return
        member.failures += 1
        if member.healthy and member.failures >= self.settings.health_failures:
            member.healthy = False
            log.warning("peer_unhealthy", peer=url, reason=reason, failures=member.failures)
            self._publish()

    def quarantine(self, url: str) -> None:
        """``url`` served bytes that are not their digest: not asked for a while."""
        member = self._members.get(url)
        if member is None:
            return
        member.quarantined_until = self._clock.monotonic() + self.settings.quarantine
        metrics.PEER_QUARANTINES.inc()
        log.error("peer_quarantined", peer=url, seconds=self.settings.quarantine)
        self._publish()

    # --- the loop the node runs ------------------------------------------------------------
    async def run(self, session: aiohttp.ClientSession, token: TokenSource) -> None:
        """Re-resolve DNS and check every member's health, forever."""
        next_dns = 0.0
        while True:
            dns = self.settings.peers_dns
            if dns is not None and self._clock.monotonic() >= next_dns:
                await self.refresh_dns()
                next_dns = self._clock.monotonic() + dns.interval
            await self.check(session, token)
            await asyncio.sleep(self.settings.health_interval)

    async def refresh_dns(self) -> None:
        """Every address the peers' DNS name resolves to is a member."""
        dns = self.settings.peers_dns
        if dns is None:
            return
        try:
            addresses = await resolve(dns.name, dns.nameserver)
        except Exception as exc:  # keep the last answer: DNS hiccups must not empty the hash
            metrics.PEER_DNS_FAILURES.inc()
            log.warning("peer_dns_failed", name=dns.name, error=f"{type(exc).__name__}: {exc}")
            return
        urls = [f"{dns.scheme}://{_host(a)}:{dns.port}" for a in addresses]
        self._update([*self.settings.peers, *urls])

    async def check(self, session: aiohttp.ClientSession, token: TokenSource) -> None:
        """One health check of every member, side by side."""
        await asyncio.gather(*(self._check_one(session, token, url) for url in self.members))
        self._publish()

    async def _check_one(self, session: aiohttp.ClientSession, token: TokenSource,
                         url: str) -> None:
        timeout = aiohttp.ClientTimeout(total=max(1.0, self.settings.header_timeout * 4))
        try:
            async with session.get(url + HEALTH_PATH, timeout=timeout,
                                   headers=token.headers(url + HEALTH_PATH)) as resp:
                ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.failed(url, type(exc).__name__)
            return
        if ok:
            self.succeeded(url)
        else:
            self.failed(url, f"status {resp.status}")


class TokenSource:
    """Mints this node's peer tokens: one per request, bound to its node, method and path."""

    def __init__(self, settings: ClusterSettings, clock: Clock = SYSTEM) -> None:
        self._settings = settings
        self._clock = clock

    def headers(self, url: str | URL, method: str = "GET") -> dict[str, str]:
        """The Authorization header of a peer request: ``method`` on ``url``."""
        audience, path = token_scope(url)
        token = sign_token(self._settings.secret.reveal(), self._settings.node_id,
                           self._clock.time() + self._settings.token_ttl,
                           audience=audience, method=method, path=path)
        return {"Authorization": f"Bearer {token}"}


async def resolve(name: str, nameserver: str | None = None) -> list[str]:
    """The A and AAAA addresses of ``name`` (sorted), from the system's resolver or
    ``nameserver`` (``host:port``)."""
    import dns.asyncresolver  # noqa: PLC0415  (only nodes with peers_dns need it)
    import dns.resolver  # noqa: PLC0415

    resolver = dns.asyncresolver.Resolver(configure=nameserver is None)
    if nameserver is not None:
        host, _, port = nameserver.rpartition(":")
        resolver.nameservers = [host or nameserver]
        resolver.port = int(port) if host and port.isdigit() else 53
    resolver.lifetime = 2.0
    found: set[str] = set()
    for kind in ("A", "AAAA"):
        try:
            answer = await resolver.resolve(name, kind, search=True)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue
        found.update(r.to_text() for r in answer)
    return sorted(found)


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
