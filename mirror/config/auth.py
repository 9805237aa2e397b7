"""Who may use the mirror: the ``auth``, ``access`` and ``admin`` sections.

``auth`` names the clients (an htpasswd file of bcrypt entries, static tokens,
anonymous on or off, groups, the groups with the admin role, the limits on
failed logins); ``access`` lists what they may pull (allow rules: who,
registries, repository globs; anything no rule allows is denied once ``auth``
is set); ``admin`` keeps ``/metrics``, the status page and the admin API on
their own address or behind a token. The checks live in
:mod:`mirror.server.auth`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from mirror.config.settings import (
    AccessRule,
    AdminSettings,
    AuthSettings,
    LoginLimits,
    TokenSettings,
)
from mirror.config.values import (
    _bool,
    _existing_file,
    _mapping,
    _one_or_more,
    _only_keys,
    _opt,
    _rule_scope,
    _secret,
    _string,
    field_default,
    parse_listen,
    read_section,
    section_keys,
)
from mirror.errors import ConfigError

#: The identity of a request that carries no credentials (when ``auth.anonymous``).
ANONYMOUS = "anonymous"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_WHO_KINDS = ("user", "group")


def _auth(value: Any, env: Mapping[str, str], base: Path) -> AuthSettings | None:
    """The ``auth`` section with its ``access`` rules (given at the top level)."""
    if value is None:
        return None
    auth = _mapping(value, "auth")
    _only_keys(auth, "auth", section_keys(AuthSettings))
    if "access" in auth:
        raise ConfigError("auth.access", "access rules go in the top-level access: section")
    htpasswd = None
    if "htpasswd" in auth:
        htpasswd = _existing_file(auth["htpasswd"], "auth.htpasswd", base)
        _check_htpasswd(htpasswd, "auth.htpasswd")
    tokens = _tokens(auth.get("tokens"), env, base)
    anonymous = _opt(auth, "anonymous", "auth", _bool, field_default(AuthSettings, "anonymous"))
    if htpasswd is None and not tokens and not anonymous:
        raise ConfigError("auth", "no way in: give htpasswd, tokens or anonymous: true")
    realm = _opt(auth, "realm", "auth", _string, field_default(AuthSettings, "realm"))
    if '"' in realm or "\\" in realm:
        raise ConfigError("auth.realm", "must not contain quotes or backslashes")
    groups = _groups(auth.get("groups"))
    return read_section(AuthSettings, auth, "auth", realm=realm, htpasswd=htpasswd,
                        tokens=tokens, anonymous=anonymous, groups=groups,
                        admin_groups=_admin_groups(auth.get("admin_groups"), groups),
                        limits=_limits(auth.get("limits")))


def _admin_groups(value: Any, groups: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """``auth.admin_groups``: groups (of ``auth.groups``) whose members are operators."""
    if value is None:
        return ()
    found = []
    for i, raw in enumerate(_one_or_more(value, "auth.admin_groups")):
        name = _user_name(raw, f"auth.admin_groups[{i}]")
        if name not in groups:
            raise ConfigError(f"auth.admin_groups[{i}]", f"no group {name!r} under auth.groups")
        found.append(name)
    return tuple(found)


def _limits(value: Any) -> LoginLimits:
    """``auth.limits``: failed logins per address and per user, and the bcrypt queue."""
    limits = read_section(LoginLimits, _mapping(value, "auth.limits"), "auth.limits")
    if limits.window <= 0:
        raise ConfigError("auth.limits.window", "must be longer than 0s")
    return limits


def _tokens(value: Any, env: Mapping[str, str], base: Path) -> tuple[TokenSettings, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("auth.tokens", "expected a list of {name, token_env | token_file}")
    found: list[TokenSettings] = []
    for i, raw in enumerate(value):
        key = f"auth.tokens[{i}]"
        item = _mapping(raw, key)
        # token itself: refused by _secret with a hint
        _only_keys(item, key, section_keys(TokenSettings) | {"token"})
        name = _user_name(item.get("name"), f"{key}.name")
        if name == ANONYMOUS:
            raise ConfigError(f"{key}.name", "anonymous means a client without credentials")
        token = _secret(item, key, "token", env, base)
        if token is None:
            raise ConfigError(key, "give token_env or token_file")
        if len(token.reveal()) < 16:
            raise ConfigError(key, "the token is shorter than 16 characters: too easy to guess")
        found.append(TokenSettings(name, token))
    names = [t.name for t in found]
    if len(set(names)) != len(names):
        raise ConfigError("auth.tokens", f"names must be unique, got {names}")
    return tuple(found)


def _groups(value: Any) -> dict[str, tuple[str, ...]]:
    groups = _mapping(value, "auth.groups")
    found: dict[str, tuple[str, ...]] = {}
    for name, members in groups.items():
        key = f"auth.groups.{name}"
        _user_name(name, key)
        if not isinstance(members, list) or not members:
            raise ConfigError(key, "expected a non-empty list of user names")
        found[str(name)] = tuple(_user_name(m, f"{key}[{i}]") for i, m in enumerate(members))
    return found


def _access(value: Any, auth: AuthSettings | None,
            registries: tuple[str, ...]) -> AuthSettings | None:
    """The top-level ``access`` rules, attached to the auth settings they need."""
    if value is None:
        if auth is not None:
            raise ConfigError("access", "auth: is set but no access: rule allows anything; "
                              "to let every client pull everything: access: [{who: ['*']}]")
        return None
    if auth is None:
        raise ConfigError("access", "access rules need an auth: section (who is the client?)")
    if not isinstance(value, list) or not value:
        raise ConfigError("access", "expected a non-empty list of rules")
    rules = tuple(_rule(raw, f"access[{i}]", auth, registries) for i, raw in enumerate(value))
    return replace(auth, access=rules)


def _rule(raw: Any, key: str, auth: AuthSettings, registries: tuple[str, ...]) -> AccessRule:
    item = _mapping(raw, key)
    _only_keys(item, key, section_keys(AccessRule))
    if "who" not in item:
        raise ConfigError(f"{key}.who", "required: user:NAME, group:NAME, anonymous, "
                          "authenticated or *")
    who = tuple(_who(w, f"{key}.who[{i}]", auth)
                for i, w in enumerate(_one_or_more(item["who"], f"{key}.who")))
    regs, repos = _rule_scope(item, key, registries)
    return AccessRule(who=who, registries=regs, repositories=repos)


def _who(value: Any, key: str, auth: AuthSettings) -> str:
    text = _string(value, key)
    if text in ("*", ANONYMOUS, "authenticated"):
        return text
    kind, sep, name = text.partition(":")
    if not sep or kind not in _WHO_KINDS:
        raise ConfigError(key, f"expected user:NAME, group:NAME, anonymous, authenticated or *, "
                          f"got {text!r}")
    _user_name(name, key)
    if kind == "group" and name not in auth.groups:
        raise ConfigError(key, f"no group {name!r} under auth.groups")
    return text


def _user_name(value: Any, key: str) -> str:
    text = _string(value, key)
    if _NAME_RE.fullmatch(text) is None:
        raise ConfigError(key, f"not a user or group name (letters, digits, . _ @ -): {text!r}")
    return text


def _check_htpasswd(path: Path, key: str) -> None:
    """Every entry must be bcrypt (``htpasswd -B``): the others are weak or unsupported."""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, hashed = line.strip().partition(":")
        if not sep or not user:
            raise ConfigError(key, f"{path} line {number}: expected user:hash")
        if not hashed.startswith(("$2y$", "$2b$", "$2a$")):
            raise ConfigError(key, f"{path} line {number} ({user}): not a bcrypt entry; "
                              "write it with htpasswd -B")


def _admin(value: Any, env: Mapping[str, str], base: Path, main_port: int) -> AdminSettings:
    admin = _mapping(value, "admin")
    _only_keys(admin, "admin", section_keys(AdminSettings))
    listen = None
    if "listen" in admin:
        try:
            listen = parse_listen(admin["listen"])
        except ConfigError as exc:
            raise ConfigError("admin.listen", exc.message) from None
        if listen[1] == main_port:
            raise ConfigError("admin.listen", "must be another port than listen")
    token = _secret(admin, "admin", "token", env, base)
    if token is not None and len(token.reveal()) < 16:
        raise ConfigError("admin", "the token is shorter than 16 characters: too easy to guess")
    return AdminSettings(listen=listen, token=token)
