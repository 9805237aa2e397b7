"""Configuration: one YAML schema, validated once into frozen, typed settings.

The CLI loads the file (or uses :func:`default_settings`) and passes the result
down; nothing else reads files or the environment for configuration. Every
error names the key path that is wrong, e.g. ``upstreams[1].url: not a URL``.
The full reference is ``docs/configuration.md``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from yarl import URL

from mirror.errors import ConfigError

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

    @property
    def host(self) -> str:
        """``host[:port]`` of the upstream URL, as containerd sends it in ``ns``."""
        port = "" if self.url.is_default_port() else f":{self.url.port}"
        return f"{self.url.host}{port}"

    def names(self) -> tuple[str, ...]:
        """Every name a client may use for this upstream, lowercase."""
        return tuple(dict.fromkeys(n.lower() for n in (self.name, *self.aliases, self.host)))


@dataclass(frozen=True)
class StorageSettings:
    path: Path = Path("./mirror-data")
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
        storage=_storage(root.get("storage", {}), base),
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


def _storage(value: Any, base: Path) -> StorageSettings:
    storage = _mapping(value, "storage")
    _only_keys(storage, "storage", {"path", "max_size", "high_watermark", "low_watermark"})
    path = Path(_string(storage.get("path", "./mirror-data"), "storage.path"))
    max_size = _opt(storage, "max_size", "storage", parse_size, None)
    if max_size == 0:
        raise ConfigError("storage.max_size", "must be more than 0 (leave it out for no limit)")
    d = StorageSettings
    high = _opt(storage, "high_watermark", "storage", _fraction, d.high_watermark)
    low = _opt(storage, "low_watermark", "storage", _fraction, d.low_watermark)
    if low >= high:
        raise ConfigError("storage.low_watermark",
                          f"must be below storage.high_watermark ({low} >= {high})")
    return StorageSettings(path=path if path.is_absolute() else base / path, max_size=max_size,
                           high_watermark=high, low_watermark=low)


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(key, f"expected a fraction of max_size above 0 and at most 1, "
                          f"got {value!r}")
    return float(value)


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
    "max_retry_wait",
}


def _upstream(value: Any, key: str, env: Mapping[str, str], base: Path) -> UpstreamSettings:
    item = _mapping(value, key)
    _only_keys(item, key, _UPSTREAM_KEYS)
    name = _registry_name(item.get("name"), f"{key}.name")
    url = _url(item.get("url"), f"{key}.url")
    aliases_raw = item.get("aliases", [])
    if not isinstance(aliases_raw, list):
        raise ConfigError(f"{key}.aliases", "expected a list of names")
    aliases = tuple(_registry_name(a, f"{key}.aliases[{i}]") for i, a in enumerate(aliases_raw))
    is_hub = name == "docker.io" or url.host in ("registry-1.docker.io", "index.docker.io")
    d = UpstreamSettings
    return UpstreamSettings(
        name=name,
        url=url,
        aliases=aliases,
        default=_opt(item, "default", key, _bool, False),
        library_prefix=_opt(item, "library_prefix", key, _bool, is_hub),
        username=_opt(item, "username", key, _string, None),
        password=_password(item, key, env, base),
        connect_timeout=_opt(item, "connect_timeout", key, parse_duration, d.connect_timeout),
        read_timeout=_opt(item, "read_timeout", key, parse_duration, d.read_timeout),
        retries=_opt(item, "retries", key, _count, d.retries),
        max_connections=_opt(item, "max_connections", key, _positive, d.max_connections),
        max_retry_wait=_opt(item, "max_retry_wait", key, parse_duration, d.max_retry_wait),
    )


def _password(item: dict[str, Any], key: str, env: Mapping[str, str], base: Path) -> Secret | None:
    if "password" in item:
        raise ConfigError(f"{key}.password", "never put a password in the file: "
                          "use password_env or password_file")
    if "password_env" in item and "password_file" in item:
        raise ConfigError(key, "give password_env or password_file, not both")
    if "password_env" in item:
        var = _string(item["password_env"], f"{key}.password_env")
        if var not in env:
            raise ConfigError(f"{key}.password_env", f"environment variable {var} is not set")
        return Secret(env[var])
    if "password_file" in item:
        path = _existing_file(item["password_file"], f"{key}.password_file", base)
        return Secret(path.read_text().strip())
    if "username" in item:
        raise ConfigError(f"{key}.username", "a username needs password_env or password_file")
    return None


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
