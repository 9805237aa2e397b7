"""Configuration: one YAML schema, validated once into frozen, typed settings.

The CLI loads the file (or uses :func:`default_settings`) and passes the result
down; nothing else reads files or the environment for configuration. Every
error names the key path that is wrong, e.g. ``upstreams[1].url: not a URL``.
The full reference is ``docs/configuration.md``.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from yarl import URL

from mirror.errors import ConfigError

if TYPE_CHECKING:
    from mirror.upstream.presets import Preset

T = TypeVar("T")

CONFIG_VERSION = 1
DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/\s*(s|m|h))?")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?")


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
    retries: int = 3
    max_connections: int = 32
    max_retry_wait: float = 10.0
    preset: str = "generic"
    credentials: tuple[CredentialSettings, ...] = ()
    blob_probe: str = "head"
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
    max_size: int | None = None  # bytes; None: unbounded
    high_watermark: float = 0.95  # evict when the cache holds more than this share of max_size
    low_watermark: float = 0.85  # ... down to this share

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
    """Settings for ``mirror serve`` with no config file."""
    return Settings(upstreams=(docker_hub(),))


def load(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate a YAML config file.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or is invalid.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{path} is not valid YAML: {exc}") from None
    return parse(document or {}, env=os.environ if env is None else env, base=path.parent)


def parse(document: Any, *, env: Mapping[str, str], base: Path = Path(".")) -> Settings:
    """Validate a parsed YAML document into :class:`Settings`.

    Raises:
        ConfigError: naming the first bad key.
    """
    root = _mapping(document, "")
    _only_keys(root, "", {"version", "listen", "tls", "storage", "cache", "upstreams",
                          "log", "server"})
    version = root.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError("version", f"unsupported version {version!r} (this mirror reads 1)")
    host, port = parse_listen(root.get("listen", "0.0.0.0:5000"))
    upstreams = _upstreams(root.get("upstreams"), env, base)
    return Settings(
        listen_host=host,
        listen_port=port,
        tls=_tls(root.get("tls"), base),
        storage=_storage(root.get("storage", {}), env, base),
        cache=_cache(root.get("cache", {})),
        upstreams=upstreams,
        log=_log(root.get("log", {})),
        server=_server(root.get("server", {})),
    )


def parse_listen(value: Any) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT``.

    Raises:
        ConfigError: not HOST:PORT.
    """
    text = _string(value, "listen")
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError("listen", f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port_text)


def _tls(value: Any, base: Path) -> TlsSettings | None:
    if value is None:
        return None
    tls = _mapping(value, "tls")
    _only_keys(tls, "tls", {"cert", "key"})
    cert = _existing_file(tls.get("cert"), "tls.cert", base)
    key = _existing_file(tls.get("key"), "tls.key", base)
    return TlsSettings(cert=cert, key=key)


def _storage(value: Any, env: Mapping[str, str], base: Path) -> StorageSettings:
    storage = _mapping(value, "storage")
    _only_keys(storage, "storage", {"path", "s3", "max_size", "high_watermark", "low_watermark"})
    path = Path(_string(storage.get("path", "./mirror-data"), "storage.path"))
    s3 = _s3(storage["s3"], env, base) if storage.get("s3") is not None else None
    max_size = _opt(storage, "max_size", "storage", parse_size, None)
    if max_size == 0:
        raise ConfigError("storage.max_size", "must be more than 0 (leave it out for no limit)")
    d = StorageSettings
    high = _opt(storage, "high_watermark", "storage", _fraction, d.high_watermark)
    low = _opt(storage, "low_watermark", "storage", _fraction, d.low_watermark)
    if low >= high:
        raise ConfigError("storage.low_watermark",
                          f"must be below storage.high_watermark ({low} >= {high})")
    return StorageSettings(path=path if path.is_absolute() else base / path, s3=s3,
                           max_size=max_size, high_watermark=high, low_watermark=low)


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(key, f"expected a fraction of max_size above 0 and at most 1, "
                          f"got {value!r}")
    return float(value)


_S3_KEYS = {
    "bucket", "prefix", "region", "endpoint_url", "access_key_id_env", "access_key_id_file",
    "secret_access_key_env", "secret_access_key_file", "redirect", "redirect_ttl",
    "max_connections", "connect_timeout", "read_timeout", "failure_backoff", "part_size",
    "max_uploads",
}
_BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_RE = re.compile(r"[A-Za-z0-9!_.*'()/-]*")


def _s3(value: Any, env: Mapping[str, str], base: Path) -> S3Settings:
    key = "storage.s3"
    item = _mapping(value, key)
    for plain in ("access_key_id", "secret_access_key"):
        if plain in item:
            raise ConfigError(f"{key}.{plain}", f"never put credentials in the file: use "
                              f"{plain}_env or {plain}_file")
    _only_keys(item, key, _S3_KEYS)
    if "bucket" not in item:
        raise ConfigError(f"{key}.bucket", "required: the bucket that holds the shared tier")
    bucket = _string(item["bucket"], f"{key}.bucket")
    if _BUCKET_RE.fullmatch(bucket) is None:
        raise ConfigError(f"{key}.bucket", f"not an S3 bucket name (3-63 of a-z, 0-9, '.', "
                          f"'-'): {bucket!r}")
    prefix = _opt(item, "prefix", key, _string, "").strip("/")
    if _PREFIX_RE.fullmatch(prefix) is None or ".." in prefix.split("/"):
        raise ConfigError(f"{key}.prefix", f"not a plain key prefix: {prefix!r}")
    key_id = _secret(item, key, "access_key_id", env, base)
    secret = _secret(item, key, "secret_access_key", env, base)
    if (key_id is None) != (secret is None):
        raise ConfigError(key, "give both access_key_id_* and secret_access_key_*, or neither "
                          "(the standard AWS chain)")
    d = S3Settings
    part_size = _opt(item, "part_size", key, parse_size, d.part_size)
    if not 5 * 2**20 <= part_size <= 5 * 2**30:
        raise ConfigError(f"{key}.part_size", "must be between 5MiB and 5GiB (S3's limits)")
    redirect_ttl = _opt(item, "redirect_ttl", key, parse_duration, d.redirect_ttl)
    if not 1 <= redirect_ttl <= 7 * 86400:
        raise ConfigError(f"{key}.redirect_ttl", "must be between 1s and 7d (S3's limit)")
    return S3Settings(
        bucket=bucket,
        prefix=prefix,
        region=_opt(item, "region", key, _string, None),
        endpoint_url=_url(item["endpoint_url"], f"{key}.endpoint_url")
        if "endpoint_url" in item else None,
        access_key_id=key_id,
        secret_access_key=secret,
        redirect=_opt(item, "redirect", key, _bool, d.redirect),
        redirect_ttl=redirect_ttl,
        max_connections=_opt(item, "max_connections", key, _positive, d.max_connections),
        connect_timeout=_opt(item, "connect_timeout", key, parse_duration, d.connect_timeout),
        read_timeout=_opt(item, "read_timeout", key, parse_duration, d.read_timeout),
        failure_backoff=_opt(item, "failure_backoff", key, parse_duration, d.failure_backoff),
        part_size=part_size,
        max_uploads=_opt(item, "max_uploads", key, _positive, d.max_uploads),
    )


def _secret(item: dict[str, Any], key: str, name: str, env: Mapping[str, str],
            base: Path) -> Secret | None:
    """``<name>_env`` or ``<name>_file``; never ``<name>`` itself in the file."""
    if name in item:
        raise ConfigError(f"{key}.{name}", f"never put a {name} in the file: "
                          f"use {name}_env or {name}_file")
    if f"{name}_env" in item and f"{name}_file" in item:
        raise ConfigError(key, f"give {name}_env or {name}_file, not both")
    if f"{name}_env" in item:
        var = _string(item[f"{name}_env"], f"{key}.{name}_env")
        if var not in env:
            raise ConfigError(f"{key}.{name}_env", f"environment variable {var} is not set")
        return Secret(env[var])
    if f"{name}_file" in item:
        path = _existing_file(item[f"{name}_file"], f"{key}.{name}_file", base)
        return Secret(path.read_text().strip())
    return None


def _cache(value: Any) -> CacheSettings:
    cache = _mapping(value, "cache")
    keys = {"tag_ttl", "stale_if_error", "negative_ttl", "memory_max_size", "memory_item_max_size"}
    _only_keys(cache, "cache", keys)
    defaults = CacheSettings()
    return CacheSettings(
        tag_ttl=_opt(cache, "tag_ttl", "cache", parse_duration, defaults.tag_ttl),
        stale_if_error=_opt(cache, "stale_if_error", "cache", parse_duration,
                            defaults.stale_if_error),
        negative_ttl=_opt(cache, "negative_ttl", "cache", parse_duration, defaults.negative_ttl),
        memory_max_bytes=_opt(cache, "memory_max_size", "cache", parse_size,
                              defaults.memory_max_bytes),
        memory_item_max_bytes=_opt(cache, "memory_item_max_size", "cache", parse_size,
                                   defaults.memory_item_max_bytes),
    )


def _log(value: Any) -> LogSettings:
    log = _mapping(value, "log")
    _only_keys(log, "log", {"level", "format"})
    level = _string(log.get("level", "info"), "log.level").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError("log.level", f"expected debug, info, warning or error, got {level!r}")
    fmt = _string(log.get("format", "auto"), "log.format").lower()
    if fmt not in ("auto", "json", "console"):
        raise ConfigError("log.format", f"expected auto, json or console, got {fmt!r}")
    return LogSettings(level=level, format=fmt)


def _server(value: Any) -> ServerSettings:
    server = _mapping(value, "server")
    _only_keys(server, "server", {"event_loop", "chunk_size"})
    loop = _string(server.get("event_loop", "uvloop"), "server.event_loop").lower()
    if loop not in ("asyncio", "uvloop"):
        raise ConfigError("server.event_loop", f"expected asyncio or uvloop, got {loop!r}")
    chunk = _opt(server, "chunk_size", "server", parse_size, ServerSettings.chunk_size)
    if not 4096 <= chunk <= 16 * 2**20:
        raise ConfigError("server.chunk_size", "must be between 4KiB and 16MiB")
    return ServerSettings(event_loop=loop, chunk_size=chunk)


def _upstreams(value: Any, env: Mapping[str, str], base: Path) -> tuple[UpstreamSettings, ...]:
    if value is None:
        return (docker_hub(),)
    if not isinstance(value, list) or not value:
        raise ConfigError("upstreams", "expected a non-empty list of registries")
    upstreams = tuple(_upstream(item, f"upstreams[{i}]", env, base) for i, item in enumerate(value))
    _check_unique_names(upstreams)
    defaults = [u.name for u in upstreams if u.default]
    if len(defaults) > 1:
        raise ConfigError("upstreams", f"only one registry may be default, got {defaults}")
    return upstreams


_UPSTREAM_KEYS = {
    "name", "url", "aliases", "default", "library_prefix", "username", "password_env",
    "password_file", "connect_timeout", "read_timeout", "retries", "max_connections",
    "max_retry_wait", "preset", "blob_probe", "credentials", "docker_config", "ecr",
    "json_key_file",
} | {"budget", "breaker", "max_client_retry_after"}
_CREDENTIAL_KINDS = ("username", "docker_config", "ecr", "json_key_file")


def _upstream(value: Any, key: str, env: Mapping[str, str], base: Path) -> UpstreamSettings:
    item = _mapping(value, key)
    _only_keys(item, key, _UPSTREAM_KEYS)
    name = _registry_name(item.get("name"), f"{key}.name")
    url = _url(item["url"], f"{key}.url") if "url" in item else None
    preset = _preset(item, key, name, url)
    if url is None:
        url = _preset_url(preset, name, key)
    aliases_raw = item.get("aliases", [a for a in preset.aliases if a != name])
    if not isinstance(aliases_raw, list):
        raise ConfigError(f"{key}.aliases", "expected a list of names")
    aliases = tuple(_registry_name(a, f"{key}.aliases[{i}]") for i, a in enumerate(aliases_raw))
    blob_probe = _opt(item, "blob_probe", key, _string, preset.blob_probe).lower()
    if blob_probe not in ("head", "get"):
        raise ConfigError(f"{key}.blob_probe", f"expected head or get, got {blob_probe!r}")
    host = _credential_host(name, url)
    credentials = _upstream_credentials(item, key, env=env, base=base, preset=preset, host=host)
    # The top-level username/password stay visible as such for older callers.
    legacy = credentials[0] if credentials and "username" in item else None
    if not isinstance(legacy, StaticCredential):
        legacy = None
    d = UpstreamSettings
    return UpstreamSettings(
        name=name,
        url=url,
        aliases=aliases,
        default=_opt(item, "default", key, _bool, False),
        library_prefix=_opt(item, "library_prefix", key, _bool, preset.library_prefix),
        username=legacy.username if legacy else None,
        password=legacy.password if legacy else None,
        connect_timeout=_opt(item, "connect_timeout", key, parse_duration, d.connect_timeout),
        read_timeout=_opt(item, "read_timeout", key, parse_duration, d.read_timeout),
        retries=_opt(item, "retries", key, _count, d.retries),
        max_connections=_opt(item, "max_connections", key, _positive, d.max_connections),
        max_retry_wait=_opt(item, "max_retry_wait", key, parse_duration, d.max_retry_wait),
        preset=preset.key,
        credentials=_with_default_ecr(credentials, preset, host),
        blob_probe=blob_probe,
        **_guard(item, key),
    )


def _guard(item: dict[str, Any], key: str) -> dict[str, Any]:
    """The budget, breaker and Retry-After bound of one upstream, as keyword arguments."""
    cap = _opt(item, "max_client_retry_after", key, parse_duration,
               UpstreamSettings.max_client_retry_after)
    if cap < 1:
        raise ConfigError(f"{key}.max_client_retry_after", "must be at least 1s")
    return {
        "budget": _budget(item["budget"], f"{key}.budget") if "budget" in item else None,
        "breaker": _breaker(item.get("breaker"), f"{key}.breaker"),
        "max_client_retry_after": cap,
    }


def _budget(value: Any, key: str) -> BudgetSettings:
    budget = _mapping(value, key)
    _only_keys(budget, key, {"rate", "burst", "client_overdraft"})
    if "rate" not in budget:
        raise ConfigError(f"{key}.rate", "required: requests per second, e.g. 20/s or 600/m")
    rate = parse_rate(budget["rate"], f"{key}.rate")
    burst = _opt(budget, "burst", key, _positive, max(1, math.ceil(rate)))
    overdraft = budget.get("client_overdraft", BudgetSettings.client_overdraft)
    if isinstance(overdraft, bool) or not isinstance(overdraft, int | float) \
            or not 0 <= overdraft <= 10:
        raise ConfigError(f"{key}.client_overdraft",
                          f"expected a number from 0 to 10, got {overdraft!r}")
    return BudgetSettings(rate=rate, burst=burst, client_overdraft=float(overdraft))


def _breaker(value: Any, key: str) -> BreakerSettings:
    breaker = _mapping(value, key)
    _only_keys(breaker, key, {"failures", "window", "cool_down"})
    d = BreakerSettings
    window = _opt(breaker, "window", key, parse_duration, d.window)
    cool_down = _opt(breaker, "cool_down", key, parse_duration, d.cool_down)
    for name, seconds in (("window", window), ("cool_down", cool_down)):
        if seconds <= 0:
            raise ConfigError(f"{key}.{name}", "must be longer than 0s")
    return BreakerSettings(failures=_opt(breaker, "failures", key, _count, d.failures),
                           window=window, cool_down=cool_down)


def parse_rate(value: Any, key: str = "") -> float:
    """Requests per second from ``20``, ``"20/s"``, ``"600/m"`` or ``"1000/h"``.

    Raises:
        ConfigError: not a rate, or not above zero.
    """
    match = None if isinstance(value, bool) else _RATE_RE.fullmatch(str(value).strip())
    if match is None or float(match.group(1)) <= 0:
        raise ConfigError(key, f"expected a rate above 0 like 20/s, 600/m or 1000/h, "
                          f"got {value!r}")
    return float(match.group(1)) / _RATE_UNITS[match.group(2)]


def _credential_host(name: str, url: URL) -> str:
    """The host credentials are kept under (config.json key, ECR host): the name when it
    is one (``url`` may point elsewhere, e.g. at a proxy), else the ``url``'s host."""
    from mirror.upstream import presets  # noqa: PLC0415  (mirror.upstream imports config)

    if presets.looks_like_host(name):
        return name
    port = "" if url.is_default_port() else f":{url.port}"
    return f"{url.host}{port}"


def _preset(item: dict[str, Any], key: str, name: str, url: URL | None) -> Preset:
    from mirror.upstream import presets  # noqa: PLC0415  (mirror.upstream imports config)
    explicit = _opt(item, "preset", key, _string, None)
    try:
        return presets.find(name, url.host if url else None, explicit and explicit.lower())
    except KeyError:
        known = ", ".join(p.key for p in presets.PRESETS)
        raise ConfigError(f"{key}.preset",
                          f"unknown preset {explicit!r} (known: {known})") from None


def _preset_url(preset: Preset, name: str, key: str) -> URL:
    from mirror.upstream import presets  # noqa: PLC0415  (mirror.upstream imports config)
    if preset.url is not None:
        return URL(preset.url)
    if presets.looks_like_host(name):
        return URL(f"https://{name}")
    raise ConfigError(f"{key}.url", f"required: {name!r} is not a host name and the "
                      f"{preset.title} preset has no well-known address")


def _upstream_credentials(item: dict[str, Any], key: str, *, env: Mapping[str, str], base: Path,
                          preset: Preset, host: str) -> tuple[CredentialSettings, ...]:
    """The top-level credential (at most one kind), then the ``credentials`` list."""
    given = [k for k in _CREDENTIAL_KINDS if k in item]
    if len(given) > 1:
        raise ConfigError(key, f"give one of {', '.join(given)}; list several under credentials:")
    found: list[CredentialSettings] = []
    if given or "password_env" in item or "password_file" in item:
        found.append(_credential(item, key, 0, env=env, base=base, preset=preset, host=host))
    raw = item.get("credentials")
    if raw is None:
        return tuple(found)
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{key}.credentials", "expected a non-empty list of credentials")
    for i, entry in enumerate(raw):
        path = f"{key}.credentials[{i}]"
        entry_map = _mapping(entry, path)
        _only_keys(entry_map, path, {"username", "password_env", "password_file", "docker_config",
                                     "server", "helper_timeout", "ecr", "json_key_file", "label"})
        if len([k for k in _CREDENTIAL_KINDS if k in entry_map]) != 1:
            raise ConfigError(path, "expected exactly one of username, docker_config, ecr, "
                              "json_key_file")
        found.append(_credential(entry_map, path, len(found), env=env, base=base, preset=preset,
                                 host=host))
    labels = [c.label for c in found]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{key}.credentials", f"labels must be unique, got {labels}")
    return tuple(found)


def _credential(item: dict[str, Any], key: str, index: int, *, env: Mapping[str, str],
                base: Path, preset: Preset, host: str) -> CredentialSettings:
    def label_of(kind: str) -> str:
        return _opt(item, "label", key, _string, f"{kind}-{index}")

    if "docker_config" in item:
        path = _existing_file(str(Path(_string(item["docker_config"], f"{key}.docker_config"))
                                  .expanduser()), f"{key}.docker_config", base)
        _json_file(path, f"{key}.docker_config")
        server = _opt(item, "server", key, _string, preset.docker_config_server or host)
        timeout = _opt(item, "helper_timeout", key, parse_duration, 10.0)
        return DockerConfigCredential(label_of("docker_config"), path, server, timeout)
    if "ecr" in item:
        return _ecr(item["ecr"], f"{key}.ecr", label_of("ecr"), host)
    if "json_key_file" in item:
        path = _existing_file(item["json_key_file"], f"{key}.json_key_file", base)
        text = _json_file(path, f"{key}.json_key_file")
        # As `docker login --password-stdin` does: the trailing newline is not part of it.
        return StaticCredential(label_of("json_key"), "_json_key", Secret(text.strip()))
    for extra in ("server", "helper_timeout"):
        if extra in item:
            raise ConfigError(f"{key}.{extra}", "only for a docker_config credential")
    password = _password(item, key, env, base)
    if password is None or "username" not in item:
        raise ConfigError(f"{key}.username", "a password needs a username")
    return StaticCredential(label_of("static"), _string(item["username"], f"{key}.username"),
                            password)


_ECR_KEYS = {"region", "registry_id", "endpoint_url", "profile", "refresh_margin"}


def _ecr(value: Any, key: str, label: str, host: str) -> EcrCredential:
    from mirror.upstream import presets  # noqa: PLC0415  (mirror.upstream imports config)
    ecr = _mapping(value, key)
    _only_keys(ecr, key, _ECR_KEYS)
    public = host == presets.ECR_PUBLIC_HOST
    region = _opt(ecr, "region", key, _string,
                  presets.ECR_PUBLIC_REGION if public else presets.ecr_region(host))
    if region is None:
        raise ConfigError(f"{key}.region", f"required: {host!r} is not an ECR registry host")
    endpoint = _opt(ecr, "endpoint_url", key, _url, None)
    margin = _opt(ecr, "refresh_margin", key, parse_duration, 3600.0)
    return EcrCredential(
        label=label, region=region,
        registry_id=_opt(ecr, "registry_id", key, _string, None),
        endpoint_url=str(endpoint) if endpoint is not None else None,
        profile=_opt(ecr, "profile", key, _string, None),
        refresh_margin=margin,
        public=public,
    )


def _with_default_ecr(credentials: tuple[CredentialSettings, ...], preset: Preset,
                      host: str) -> tuple[CredentialSettings, ...]:
    from mirror.upstream import presets  # noqa: PLC0415  (mirror.upstream imports config)
    """An ECR registry with no credentials configured gets them from the AWS chain."""
    if credentials or preset.key != "ecr":
        return credentials
    region = presets.ecr_region(host)
    if region is None:  # preset: ecr on a url that is not an ECR host, without ecr:
        return credentials
    return (EcrCredential("ecr-0", region),)


def _password(item: dict[str, Any], key: str, env: Mapping[str, str], base: Path) -> Secret | None:
    password = _secret(item, key, "password", env, base)
    if password is None and "username" in item:
        raise ConfigError(f"{key}.username", "a username needs password_env or password_file")
    return password


def _json_file(path: Path, key: str) -> str:
    text = path.read_text()
    try:
        json.loads(text)
    except ValueError:
        raise ConfigError(key, f"{path} is not JSON") from None
    return text


def _check_unique_names(upstreams: tuple[UpstreamSettings, ...]) -> None:
    seen: dict[str, str] = {}
    for i, upstream in enumerate(upstreams):
        for name in (upstream.name.lower(), *(a.lower() for a in upstream.aliases)):
            if name in seen and seen[name] != upstream.name:
                raise ConfigError(f"upstreams[{i}]", f"name {name!r} is already used by "
                                  f"{seen[name]!r}")
            seen[name] = upstream.name


def parse_duration(value: Any, key: str = "") -> float:
    """Seconds from ``90``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"`` or ``"250ms"``.

    Raises:
        ConfigError: not a duration.
    """
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration like 30s or 5m, got {value!r}")
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    match = _DURATION_RE.fullmatch(str(value).strip())
    if match is None:
        raise ConfigError(key, f"expected a duration like 30s or 5m, got {value!r}")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any, key: str = "") -> int:
    """Bytes from ``1048576``, ``"512MiB"``, ``"50GiB"`` or ``"10GB"``.

    Raises:
        ConfigError: not a size.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    match = _SIZE_RE.fullmatch(str(value).strip())
    if match is None:
        raise ConfigError(key, f"expected a size like 512MiB or 50GiB, got {value!r}")
    unit = (match.group(2) or "b").lower()
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _opt(item: dict[str, Any], name: str, key: str, convert: Callable[[Any, str], T],
         default: T) -> T:
    path = f"{key}.{name}" if key else name
    return convert(item[name], path) if name in item else default


def _mapping(value: Any, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
    return value


def _only_keys(item: dict[str, Any], key: str, allowed: set[str]) -> None:
    for name in item:
        if name not in allowed:
            path = f"{key}.{name}" if key else str(name)
            raise ConfigError(path, f"unknown key (expected one of {', '.join(sorted(allowed))})")


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


def _count(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(key, f"expected a whole number >= 0, got {value!r}")
    return value


def _positive(value: Any, key: str) -> int:
    if _count(value, key) == 0:
        raise ConfigError(key, "must be at least 1")
    return int(value)


def _url(value: Any, key: str) -> URL:
    text = _string(value, key)
    url = URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(key, f"not an http(s) URL: {text!r}")
    if url.query_string or url.fragment or url.user:
        raise ConfigError(key, "must not carry a query, fragment or credentials")
    return url.with_path(url.path.rstrip("/"))


def _registry_name(value: Any, key: str) -> str:
    name = _string(value, key).lower()
    if _HOST_RE.fullmatch(name) is None:
        raise ConfigError(key, f"not a registry name (letters, digits, '.', '-', optional :port): "
                          f"{name!r}")
    return name


def _existing_file(value: Any, key: str, base: Path) -> Path:
    path = Path(_string(value, key))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(key, f"no such file: {path}")
    return path
