"""The frozen, typed settings that :func:`mirror.config.parse` produces, and ``Secret``."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from yarl import URL

from mirror.config import cpus

if TYPE_CHECKING:  # auth.py imports Secret from here
    from mirror.config.audit import AuditSettings
    from mirror.config.auth import AdminSettings, AuthSettings
    from mirror.config.policy import PolicySettings

CONFIG_VERSION = 1
DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


class Secret:
    """A credential value that never shows in a repr, a log or an error."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself, for the one place that sends it upstream."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


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
    burst: int
    client_overdraft: float = 0.5


@dataclass(frozen=True)
class BreakerSettings:
    """When a circuit breaker opens and how long it stays open; ``failures=0`` disables it."""

    failures: int = 5
    window: float = 30.0
    cool_down: float = 30.0


@dataclass(frozen=True)
class UpstreamSettings:
    """One upstream registry."""

    name: str
    url: URL
    aliases: tuple[str, ...] = ()
    default: bool = False
    library_prefix: bool = False
    username: str | None = None
    password: Secret | None = None
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    request_timeout: float = 60.0  # the whole of a manifest, tag list or referrers request
    retries: int = 3
    max_connections: int = 32
    max_retry_wait: float = 10.0
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

    bucket: str
    prefix: str = ""
    region: str | None = None
    endpoint_url: URL | None = None
    access_key_id: Secret | None = None
    secret_access_key: Secret | None = None
    redirect: bool = False
    redirect_ttl: float = 900.0
    max_connections: int = 32
    connect_timeout: float = 3.0
    read_timeout: float = 30.0
    failure_backoff: float = 15.0
    part_size: int = 16 * 2**20
    max_uploads: int = 4


@dataclass(frozen=True)
class StorageSettings:
    path: Path = Path("./mirror-data")
    s3: S3Settings | None = None
    max_size: int | None = None  # bytes; None: unbounded (or, with max_size_auto, not resolved yet)
    #: ``max_size: auto`` (the default in a config file): the cap is a share of the
    #: filesystem that holds ``path``, resolved at start by :func:`resolve_max_size`.
    max_size_auto: bool = False
    high_watermark: float = 0.95  # evict when the cache holds more than this share of max_size
    low_watermark: float = 0.85  # ... down to this share
    relay_window: int = 64 * 2**20  # bytes a fill relays from memory when the disk is full

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
    tag_ttl: float = 300.0
    stale_if_error: float = 7 * 86400.0
    negative_ttl: float = 15.0
    memory_max_bytes: int = 256 * 2**20
    memory_item_max_bytes: int = 1 * 2**20


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "auto"


@dataclass(frozen=True)
class ServerSettings:
    event_loop: str = "uvloop"
    chunk_size: int = 1 * 2**20
    shutdown_grace: float = 10.0  # seconds downloads under way get to finish at shutdown
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

    tags: tuple[str, ...] = ()
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
    tag_sets: tuple[TagSet, ...]
    platforms: tuple[str, ...] = ()  # empty: the platforms served for it, else the node's own
    referrers: bool = False
    schedule: Schedule = field(default_factory=lambda: Schedule(interval=300.0))
    protect: float = 86400.0


@dataclass(frozen=True)
class PopularSettings:
    """``sync.popular``: the ``top`` most-pulled tags of the last ``window``, kept warm."""

    top: int = 0
    window: float = 86400.0
    max_entries: int = 10_000
    platforms_max: int = 4  # platforms warmed per popular tag, most pulled first
    #: Images one client (user or address) counts for per window: a source's share.
    per_client: int = 20
    schedule: Schedule = field(default_factory=lambda: Schedule(interval=600.0))
    protect: float = 86400.0


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
    protect: float = 86400.0  # what `mirror warm` pins for (rules have their own)
    concurrency: int = 2  # images warmed at once
    blob_concurrency: int = 4  # blobs fetched at once, over every image
    bandwidth: int | None = 10 * 2**20  # bytes per second over warming downloads; None: no cap
    ratelimit_floor: int = 10  # stop while upstream's ratelimit-remaining is below this
    recheck: float = 60.0  # a tag checked this recently is not asked upstream again
    off_peak: tuple[tuple[int, int], ...] = ()  # (start, end) minutes of the day, UTC
    retry_after: float = 60.0  # pause after a 429 that carried no Retry-After


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
    secret: Secret
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
