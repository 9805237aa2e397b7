"""The frozen, typed settings that :func:`mirror.config.parse` produces: one dataclass a
section, whose fields (with their defaults and ``key`` metadata) are the section's keys."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from yarl import URL

from mirror.config import cpus
from mirror.config.secret import Secret
from mirror.config.values import (
    INTERNAL,
    _bool,
    _count,
    _fraction,
    _positive,
    _string,
    _url,
    choice,
    key,
    parse_duration,
    parse_size,
    parse_timeout,
)

if TYPE_CHECKING:  # these sections keep their settings beside their parsers (for now)
    from mirror.config.audit import AuditSettings
    from mirror.config.policy import PolicySettings

CONFIG_VERSION = 1
DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


@dataclass(frozen=True)
class TlsSettings:
    cert: Path
    key: Path


@dataclass(frozen=True)
class StaticCredential:
    """A username and password (or token) from the config, the environment or a file."""

    label: str
    username: str
    password: Secret


@dataclass(frozen=True)
class DockerConfigCredential:
    """Credentials looked up in a Docker ``config.json`` when needed, the way Docker does:
    ``credHelpers``/``credsStore`` helpers, else ``auths``."""

    label: str
    path: Path
    server: str
    helper_timeout: float = 10.0


@dataclass(frozen=True)
class EcrCredential:
    """Basic credentials from ECR ``GetAuthorizationToken`` (the standard AWS chain);
    ``public`` asks ECR Public's API (``ecr-public``, in us-east-1) instead."""

    label: str
    region: str
    registry_id: str | None = None
    endpoint_url: str | None = None
    profile: str | None = None
    refresh_margin: float = 3600.0
    public: bool = False


CredentialSettings = StaticCredential | DockerConfigCredential | EcrCredential


@dataclass(frozen=True)
class BudgetSettings:
    """A token bucket of upstream requests (see mirror/upstream/guard.py)."""

    rate: float
    burst: int  # default: the rate per second, rounded up
    client_overdraft: float = 0.5


@dataclass(frozen=True)
class BreakerSettings:
    """When a circuit breaker opens and how long it stays open; ``failures=0`` disables it."""

    failures: int = field(default=5, metadata=key(_count))
    window: float = field(default=30.0, metadata=key(parse_duration))
    cool_down: float = field(default=30.0, metadata=key(parse_duration))


@dataclass(frozen=True)
class UpstreamSettings:
    """One upstream registry."""

    name: str
    url: URL
    aliases: tuple[str, ...] = ()
    default: bool = False
    library_prefix: bool = False
    username: str | None = None
    password: Secret | None = field(default=None, metadata=key(secret=True))
    connect_timeout: float = field(default=10.0, metadata=key(parse_timeout))
    read_timeout: float = field(default=30.0, metadata=key(parse_timeout))
    # the whole of a manifest, tag list or referrers request
    request_timeout: float = field(default=60.0, metadata=key(parse_timeout))
    retries: int = field(default=3, metadata=key(_count))
    max_connections: int = field(default=32, metadata=key(_positive))
    max_retry_wait: float = field(default=10.0, metadata=key(parse_duration))
    preset: str = "generic"
    credentials: tuple[CredentialSettings, ...] = ()
    blob_probe: str = "head"
    redirect_hosts: tuple[str, ...] = ()  # more hosts that may answer unverifiable requests
    budget: BudgetSettings | None = None
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    max_client_retry_after: float = 3600.0

    @property
    def host(self) -> str:
        """``host[:port]`` of the upstream URL, as containerd sends it in ``ns``."""
        port = "" if self.url.is_default_port() else f":{self.url.port}"
        return f"{self.url.host}{port}"

    def names(self) -> tuple[str, ...]:
        """Every name a client may use for this upstream, lowercase."""
        return tuple(dict.fromkeys(n.lower() for n in (self.name, *self.aliases, self.host)))


@dataclass(frozen=True)
class S3Settings:
    """The shared S3 tier (``storage.s3``)."""

    bucket: str  # required
    prefix: str = ""
    region: str | None = field(default=None, metadata=key(_string))
    endpoint_url: URL | None = field(default=None, metadata=key(_url))
    access_key_id: Secret | None = field(default=None, metadata=key(secret=True))
    secret_access_key: Secret | None = field(default=None, metadata=key(secret=True))
    redirect: bool = field(default=False, metadata=key(_bool))
    redirect_ttl: float = field(default=900.0, metadata=key(parse_duration))
    max_connections: int = field(default=32, metadata=key(_positive))
    connect_timeout: float = field(default=3.0, metadata=key(parse_timeout))
    read_timeout: float = field(default=30.0, metadata=key(parse_timeout))
    failure_backoff: float = field(default=15.0, metadata=key(parse_duration))
    part_size: int = field(default=16 * 2**20, metadata=key(parse_size))
    max_uploads: int = field(default=4, metadata=key(_positive))


@dataclass(frozen=True)
class StorageSettings:
    path: Path = Path("./mirror-data")
    s3: S3Settings | None = None
    max_size: int | None = None  # bytes; None: unbounded (or, with max_size_auto, not resolved yet)
    #: ``max_size: auto`` (the default in a config file): the cap is a share of the
    #: filesystem that holds ``path``, resolved at start by :func:`resolve_max_size`.
    max_size_auto: bool = field(default=False, metadata=INTERNAL)
    # evict when the cache holds more than this share of max_size ...
    high_watermark: float = field(default=0.95, metadata=key(_fraction))
    low_watermark: float = field(default=0.85, metadata=key(_fraction))  # ... down to this
    # bytes a fill relays from memory when the disk is full
    relay_window: int = field(default=64 * 2**20, metadata=key(parse_size))

    @property
    def high_bytes(self) -> int | None:
        """Bytes above which eviction starts, or ``None`` when unbounded."""
        return None if self.max_size is None else int(self.max_size * self.high_watermark)

    @property
    def low_bytes(self) -> int | None:
        """Bytes eviction brings the cache down to, or ``None`` when unbounded."""
        return None if self.max_size is None else int(self.max_size * self.low_watermark)


@dataclass(frozen=True)
class CacheSettings:
    tag_ttl: float = field(default=300.0, metadata=key(parse_duration))
    stale_if_error: float = field(default=7 * 86400.0, metadata=key(parse_duration))
    negative_ttl: float = field(default=15.0, metadata=key(parse_duration))
    memory_max_bytes: int = field(default=256 * 2**20,
                                  metadata=key(parse_size, name="memory_max_size"))
    memory_item_max_bytes: int = field(default=1 * 2**20,
                                       metadata=key(parse_size, name="memory_item_max_size"))


@dataclass(frozen=True)
class LogSettings:
    level: str = field(default="info", metadata=key(choice("debug", "info", "warning",
                                                             "error")))
    format: str = field(default="auto", metadata=key(choice("auto", "json", "console")))


@dataclass(frozen=True)
class ServerSettings:
    event_loop: str = field(default="uvloop", metadata=key(choice("asyncio", "uvloop")))
    chunk_size: int = field(default=1 * 2**20, metadata=key(parse_size))
    # seconds downloads under way get to finish at shutdown
    shutdown_grace: float = field(default=10.0, metadata=key(parse_duration))
    # processes serving one port (one listening socket, shared) and one storage folder;
    # a config file without it gets one per CPU this process may use (mirror.config.cpus)
    workers: int = 1
    # the supervisor's (or lone process's) pid, for ``mirror reload``; None: mirror.pid
    # in the storage folder (mirror.server.pidfile.pid_path)
    pid_file: Path | None = None


@dataclass(frozen=True)
class TagSet:
    """One set of tags of a sync rule: every condition given must hold (AND).

    ``allow``/``deny`` are regular expressions searched in the tag; ``semver`` is an
    npm-style range (``>=1.25 <2``, ``^1.2 || ~2.0``); ``newest`` keeps the N highest
    versions of what is left. A set with only ``tags`` names exact tags (no tag listing).
    """

    tags: tuple[str, ...] = field(default=(), metadata=INTERNAL)  # the rule's plain tags
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    semver: str | None = None
    newest: int | None = None

    @property
    def discovers(self) -> bool:
        """Whether the set needs the repository's tag list (anything but exact tags)."""
        return bool(self.allow or self.deny or self.semver or self.newest)


@dataclass(frozen=True)
class Schedule:
    """Every ``interval`` seconds, or at the times of a ``cron`` expression (UTC)."""

    interval: float | None = None
    cron: str | None = None


@dataclass(frozen=True)
class SyncRule:
    """What to keep warm: repositories of one registry, tag sets (OR), platforms, referrers."""

    name: str
    registry: str
    repositories: tuple[str, ...]
    tag_sets: tuple[TagSet, ...] = field(metadata=key(name="tags"))
    platforms: tuple[str, ...] = ()  # empty: the platforms served for it, else the node's own
    referrers: bool = False
    # from the keys interval or cron (default: sync's)
    schedule: Schedule = field(default_factory=lambda: Schedule(interval=300.0),
                               metadata=INTERNAL)
    protect: float = 86400.0  # default: sync.protect


@dataclass(frozen=True)
class PopularSettings:
    """``sync.popular``: the ``top`` most-pulled tags of the last ``window``, kept warm."""

    top: int = field(default=0, metadata=key(_count))
    window: float = field(default=86400.0, metadata=key(parse_duration))
    max_entries: int = field(default=10_000, metadata=key(_positive))
    # platforms warmed per popular tag, most pulled first
    platforms_max: int = field(default=4, metadata=key(_positive))
    #: Images one client (user or address) counts for per window: a source's share.
    per_client: int = field(default=20, metadata=key(_positive))
    # from the keys interval or cron
    schedule: Schedule = field(default_factory=lambda: Schedule(interval=600.0),
                               metadata=INTERNAL)
    protect: float = 86400.0  # default: sync.protect


_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
         "armv7l": "arm/v7", "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64"}


def own_platform() -> str:
    """``linux/<arch>`` of this machine: the platform warmed when nothing says which."""
    return f"linux/{_ARCH.get(platform.machine().lower(), 'amd64')}"


@dataclass(frozen=True)
class SyncSettings:
    """``sync``: rules, popularity, and the budget warming may use."""

    rules: tuple[SyncRule, ...] = ()
    popular: PopularSettings = field(default_factory=PopularSettings)
    platforms: tuple[str, ...] = field(default_factory=lambda: (own_platform(),))
    # what `mirror warm` pins for (rules have their own)
    protect: float = field(default=86400.0, metadata=key(parse_duration))
    concurrency: int = field(default=2, metadata=key(_positive))  # images warmed at once
    # blobs fetched at once, over every image
    blob_concurrency: int = field(default=4, metadata=key(_positive))
    bandwidth: int | None = 10 * 2**20  # bytes per second over warming downloads; None: no cap
    # stop while upstream's ratelimit-remaining is below this
    ratelimit_floor: int = field(default=10, metadata=key(_count))
    # a tag checked this recently is not asked upstream again
    recheck: float = field(default=60.0, metadata=key(parse_duration))
    off_peak: tuple[tuple[int, int], ...] = ()  # (start, end) minutes of the day, UTC
    # pause after a 429 that carried no Retry-After
    retry_after: float = field(default=60.0, metadata=key(parse_duration))


@dataclass(frozen=True)
class PeersDns:
    """Peers from DNS: every address the name resolves to is a peer (a headless Service)."""

    name: str
    port: int
    scheme: str = "http"
    nameserver: str | None = None  # host:port; default: the system's resolver config
    interval: float = 5.0  # seconds between look-ups


@dataclass(frozen=True)
class ClusterSettings:
    """A node of a regional fleet: its peers, its parent regions, the peer credential."""

    node_id: str
    region: str
    secret: Secret = field(metadata=key(secret=True))
    self_url: str | None = None  # how peers reach this node (to skip itself in the list)
    peers: tuple[str, ...] = ()  # static peer base URLs (this node may be among them)
    peers_dns: PeersDns | None = None
    parents: tuple[str, ...] = ()  # mirror URLs of other regions, nearest first
    # base URLs peer tokens may be made for besides self_url (the region's load balancer)
    audiences: tuple[str, ...] = ()
    header_timeout: float = 0.3  # a peer that has not sent headers by then is skipped
    read_timeout: float = 30.0
    health_interval: float = 2.0
    health_failures: int = 2  # failed checks in a row that take a peer out of the hash
    quarantine: float = 300.0  # a peer that served wrong bytes is not asked for this long
    token_ttl: float = 60.0


@dataclass(frozen=True)
class ImportSettings:
    """``import``: the keys every imported bundle must be signed by (none: any bundle)."""

    trusted_keys: tuple[Path, ...] = ()


@dataclass(frozen=True)
class TokenSettings:
    """A static bearer token and the user name it stands for."""

    name: str
    token: Secret = field(metadata=key(secret=True))


@dataclass(frozen=True)
class AccessRule:
    """One allow rule: ``who`` may pull ``repositories`` (globs) of ``registries``.

    ``who`` holds ``user:NAME``, ``group:NAME``, ``anonymous``, ``authenticated``
    (any client with valid credentials) or ``*`` (everyone, anonymous too).
    ``registries`` holds configured registry names or ``*``.
    """

    who: tuple[str, ...]
    registries: tuple[str, ...] = ("*",)
    repositories: tuple[str, ...] = ("*",)


@dataclass(frozen=True)
class LoginLimits:
    """How many failed password checks a source address or a user name may cause.

    Failures are counted over ``window`` seconds; a source or user past its limit gets
    429 with ``Retry-After`` until its oldest counted failure leaves the window. At most
    ``queue`` password checks wait for the two bcrypt threads; more get 503 at once.
    Answers given without a check (429, a wrong password remembered) come ``delay``
    seconds late, so a client that floods in a loop slows itself down.
    """

    per_address: int = field(default=10, metadata=key(_positive))
    per_user: int = field(default=20, metadata=key(_positive))
    window: float = field(default=300.0, metadata=key(parse_duration))
    queue: int = field(default=16, metadata=key(_positive))
    delay: float = field(default=2.0, metadata=key(parse_duration))


@dataclass(frozen=True)
class AuthSettings:
    """Client authentication and the access rules that apply once it is on."""

    realm: str = field(default="mirror", metadata=key(_string))
    htpasswd: Path | None = None
    tokens: tuple[TokenSettings, ...] = ()
    anonymous: bool = field(default=False, metadata=key(_bool))
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    access: tuple[AccessRule, ...] = ()  # from the top-level access section (refused here)
    # how long a verified password is remembered (bcrypt is slow)
    cache_ttl: float = field(default=60.0, metadata=key(parse_duration))
    admin_groups: tuple[str, ...] = ()  # members see the status page, /metrics, /admin/...
    limits: LoginLimits = field(default_factory=LoginLimits)

    def groups_of(self, user: str) -> frozenset[str]:
        """The groups ``user`` is a member of."""
        return frozenset(g for g, members in self.groups.items() if user in members)


@dataclass(frozen=True)
class AdminSettings:
    """Where ``/metrics``, the status page ``/`` and ``/admin/...`` answer, and the token
    they want."""

    listen: tuple[str, int] | None = None  # None: on the main address
    token: Secret | None = field(default=None, metadata=key(secret=True))

    @property
    def guarded(self) -> bool:
        """Whether the admin paths are kept from clients (a token or their own address)."""
        return self.listen is not None or self.token is not None


@dataclass(frozen=True)
class Settings:
    """Everything the mirror needs to run, validated."""

    listen_host: str = "0.0.0.0"
    listen_port: int = 5000
    tls: TlsSettings | None = None
    storage: StorageSettings = field(default_factory=StorageSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    upstreams: tuple[UpstreamSettings, ...] = ()
    log: LogSettings = field(default_factory=LogSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    cluster: ClusterSettings | None = None
    auth: AuthSettings | None = None  # None: anyone who reaches the port may pull
    admin: AdminSettings | None = None  # None: /metrics and / on the main address, open
    sync: SyncSettings | None = None
    policy: PolicySettings | None = None  # signatures and policy
    audit: AuditSettings | None = None  # the audit trail (None: none written)
    imports: ImportSettings = field(default_factory=ImportSettings)

    @property
    def default_upstream(self) -> UpstreamSettings | None:
        """The upstream for requests that name no registry."""
        return next((u for u in self.upstreams if u.default), None)


def docker_hub() -> UpstreamSettings:
    """Docker Hub as the default upstream, as with no configuration at all."""
    return UpstreamSettings(
        name="docker.io",
        url=URL("https://registry-1.docker.io"),
        aliases=DOCKER_HUB_ALIASES,
        default=True,
        library_prefix=True,
        preset="dockerhub",
    )


def default_settings() -> Settings:
    """Settings for ``mirror serve`` with no config file (one worker per core)."""
    return Settings(upstreams=(docker_hub(),),
                    server=ServerSettings(workers=min(cpus.available(), 256)),
                    storage=StorageSettings(max_size_auto=True))
