"""The value grammars of the config (durations, sizes, rates, listen addresses) and the
small validators every section uses; each error names the key path it is about."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from yarl import URL

from mirror.config.secret import Secret
from mirror.errors import ConfigError

T = TypeVar("T")

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?", re.IGNORECASE)
#: KB, MB, GB, TB, PB are powers of ten (as disks are sold); KiB ... PiB, Ki ... Pi
#: (Kubernetes) and the bare letters K, M, G, T, P (as docker and du write them) are
#: powers of two. Case does not matter: 5G, 5g, 5GiB and 5Gi are all 5 * 2**30.
_SIZE_UNITS = {"b": 1} | {
    f"{letter}{suffix}": base ** (power + 1)
    for power, letter in enumerate("kmgtp")
    for suffix, base in (("b", 1000), ("", 1024), ("i", 1024), ("ib", 1024))}
_RATE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/\s*(s|m|h))?")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?")

DURATION_MAX = 10 * 365 * 86400.0
"""The longest duration any key accepts (ten years): beyond it is a typo or ``.inf``."""
SIZE_MAX = 2**60
"""The largest size any key accepts (1 EiB): beyond it is a typo."""
TIMEOUT_MAX = 3600.0
"""The longest network timeout: a longer one only hides a hung peer."""


def parse_listen(value: Any) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT``.

    Raises:
        ConfigError: not HOST:PORT.
    """
    text = _string(value, "listen")
    host, sep, port_text = text.rpartition(":")
    if not sep or not (port_text.isascii() and port_text.isdigit()) \
            or not 0 < int(port_text) < 65536:
        raise ConfigError("listen", f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port_text)


def parse_duration(value: Any, key: str = "") -> float:
    """Seconds from ``90``, ``"30s"``, ``"5m"``, ``"2h"``, ``"7d"`` or ``"250ms"``.

    Raises:
        ConfigError: not a duration, or over :data:`DURATION_MAX` (``.inf``, ``.nan``).
    """
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a duration like 30s or 5m, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.fullmatch(str(value).strip())
        if match is None:
            raise ConfigError(key, f"expected a duration like 30s or 5m, got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds) or not 0 <= seconds <= DURATION_MAX:
        raise ConfigError(key, f"expected a duration from 0s to 3650d, got {value!r}")
    return seconds


def parse_timeout(value: Any, key: str = "") -> float:
    """A network timeout: a duration above 0 and at most an hour (0 would mean none).

    Raises:
        ConfigError: not a duration, 0, or over an hour.
    """
    seconds = parse_duration(value, key)
    if not 0 < seconds <= TIMEOUT_MAX:
        raise ConfigError(key, f"expected a timeout above 0s and at most 1h, got {value!r}")
    return seconds


def parse_size(value: Any, key: str = "") -> int:
    """Bytes from ``1048576``, ``"512MiB"``, ``"50GiB"``, ``"50Gi"``, ``"50G"`` (these three
    are powers of two) or ``"10GB"`` (powers of ten); any case.

    Raises:
        ConfigError: not a size, or over :data:`SIZE_MAX`.
    """
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SIZE_MAX:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value > SIZE_MAX:
        size = math.inf
    else:
        match = _SIZE_RE.fullmatch(str(value).strip())
        if match is None:
            raise ConfigError(key, f"expected a size like 512MiB, 50GiB, 50G or 10GB, "
                              f"got {value!r}")
        unit = (match.group(2) or "b").lower()
        size = float(match.group(1)) * _SIZE_UNITS[unit]
    if not size <= SIZE_MAX:  # also inf, from a number too long for a float
        raise ConfigError(key, f"expected a size up to 1EiB, got {str(value)[:40]!r}")
    return int(size)


def parse_rate(value: Any, key: str = "") -> float:
    """Requests per second from ``20``, ``"20/s"``, ``"600/m"`` or ``"1000/h"``.

    Raises:
        ConfigError: not a rate, or not above zero.
    """
    match = None if isinstance(value, bool) else _RATE_RE.fullmatch(str(value).strip())
    if match is None or not 0 < float(match.group(1)) < math.inf:
        raise ConfigError(key, f"expected a rate above 0 like 20/s, 600/m or 1000/h, "
                          f"got {value!r}")
    return float(match.group(1)) / _RATE_UNITS[match.group(2)]


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


#: Turns a value of the file into a setting; the second argument is the key path, for
#: the error.
Grammar = Callable[[Any, str], Any]


def key(grammar: Grammar | None = None, *, name: str | None = None,
        secret: bool = False) -> dict[str, Any]:
    """The metadata of a settings field that is a key of the file: the ``grammar`` that
    reads its value (none: the section's parser reads it itself), its ``name`` in the
    file when that is not the field's, and whether it is a ``secret`` (given as
    ``<name>_env`` or ``<name>_file``, never in the file). Use as
    ``field(default=..., metadata=key(...))``. A field without metadata is a key of its
    own name that the section's parser reads; one with :data:`INTERNAL` is no key."""
    return {"grammar": grammar, "name": name, "secret": secret}


INTERNAL: dict[str, Any] = {"internal": True}
"""The metadata of a settings field that is not a key of the file (worked out)."""


def file_key(item: dataclasses.Field[Any]) -> str:
    """The name a settings field has in the file."""
    return str(item.metadata.get("name") or item.name)


def section_keys(cls: type[Any]) -> set[str]:
    """The keys a section (a settings dataclass) accepts in the file."""
    found = set()
    for item in dataclasses.fields(cls):
        if item.metadata.get("secret"):
            found |= {f"{file_key(item)}_env", f"{file_key(item)}_file"}
        elif not item.metadata.get("internal"):
            found.add(file_key(item))
    return found


def field_default(cls: type[Any], name: str) -> Any:
    """The default of a settings field (the one place it is written)."""
    for item in dataclasses.fields(cls):
        if item.name == name:
            if item.default_factory is not dataclasses.MISSING:
                return item.default_factory()
            return item.default
    raise KeyError(name)


def read_section(cls: type[T], item: dict[str, Any], section: str, /, *,
                 extra_keys: set[str] | frozenset[str] = frozenset(), **given: Any) -> T:
    """A section from its mapping in the file: only the keys of ``cls`` (and
    ``extra_keys``), each field with a grammar read by it (or its default when absent),
    the other fields ``given`` by the section's parser.

    Raises:
        ConfigError: an unknown key, or a value its grammar refuses (naming its path).
    """
    _only_keys(item, section, section_keys(cls) | set(extra_keys))
    values = dict(given)
    for spec in dataclasses.fields(cls):  # type: ignore[arg-type]
        grammar = spec.metadata.get("grammar")
        if grammar is not None and spec.name not in given:
            values[spec.name] = _opt(item, file_key(spec), section, grammar,
                                     field_default(cls, spec.name))
    return cls(**values)


def choice(*options: str) -> Grammar:
    """A grammar for one of ``options`` (any case)."""
    expected = f"{', '.join(options[:-1])} or {options[-1]}" if len(options) > 1 else options[0]

    def read(value: Any, path: str) -> str:
        text = _string(value, path).lower()
        if text not in options:
            raise ConfigError(path, f"expected {expected}, got {text!r}")
        return text

    return read


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


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ConfigError(key, f"expected a fraction of max_size above 0 and at most 1, "
                          f"got {value!r}")
    return float(value)


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


def _list(value: Any, key: str) -> list[Any]:
    """A YAML list (maybe empty): the sections' lists of mappings and URLs."""
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list, got {type(value).__name__}")
    return value


def _one_or_more(value: Any, key: str) -> list[Any]:
    """One string or a non-empty list: the ``who:``, ``registries:`` ... of a rule."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(key, "expected a non-empty list")
    return value


def _rule_scope(item: dict[str, Any], key: str,
                registries: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A rule's ``registries:`` and ``repositories:`` (each ``*`` when left out), as the
    access rules and the policy rules both scope themselves."""
    regs = tuple(_rule_registry(r, f"{key}.registries[{i}]", registries) for i, r
                 in enumerate(_one_or_more(item.get("registries", ["*"]), f"{key}.registries")))
    repos = tuple(_glob(r, f"{key}.repositories[{i}]") for i, r
                  in enumerate(_one_or_more(item.get("repositories", ["*"]),
                                            f"{key}.repositories")))
    return regs, repos


def _rule_registry(value: Any, key: str, registries: tuple[str, ...]) -> str:
    """A rule's registry: ``*`` or one of the configured upstreams, lower-cased."""
    name = _string(value, key).lower()
    if name != "*" and name not in registries:
        raise ConfigError(key, f"{name!r} is not a configured registry (expected one of "
                          f"{', '.join(registries) or 'none'}, or *)")
    return name


def _glob(value: Any, key: str) -> str:
    """A rule's repository glob such as ``library/*``: no leading slash, no space."""
    text = _string(value, key)
    if text.startswith("/") or " " in text:
        raise ConfigError(key, f"expected a repository glob like library/* or org/app, "
                          f"got {text!r}")
    return text


def _existing_file(value: Any, key: str, base: Path) -> Path:
    path = Path(_string(value, key))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ConfigError(key, f"no such file: {path}")
    return path
