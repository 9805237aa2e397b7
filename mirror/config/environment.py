"""The environment a config is read with, when its variables need not be set.

``mirror cache``, ``export``, ``import`` and ``config check --no-env`` never talk to an
upstream with credentials, so they must not fail because ``password_env: QUAY_PASSWORD``
is unset on the machine that runs them. :class:`Lenient` answers every variable: the real
value when set, else a placeholder that passes the checks (16 characters or more, a valid
host name); :func:`without_placeholders` then drops every upstream credential and S3 key
that came from one, so that no placeholder is ever sent anywhere.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator, Mapping

from mirror.config.secret import Secret
from mirror.config.settings import S3Settings, Settings, StaticCredential, UpstreamSettings


class Lenient(Mapping[str, str]):
    """``env``, with a placeholder for every variable it lacks (named in :attr:`unset`)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        self.unset: dict[str, str] = {}  # variable -> its placeholder

    def __getitem__(self, name: str) -> str:
        if name in self._env:
            return self._env[name]
        return self.unset.setdefault(name, f"unset-{secrets.token_hex(16)}")

    def __contains__(self, name: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


def without_placeholders(settings: Settings, env: Lenient) -> Settings:
    """``settings`` with the upstream credentials and S3 keys that came from unset
    variables removed (those upstreams are then asked anonymously)."""
    fake = {Secret(value) for value in env.unset.values()}
    if not fake:
        return settings
    upstreams = tuple(_upstream(u, fake) for u in settings.upstreams)
    storage = settings.storage
    if storage.s3 is not None and (storage.s3.access_key_id in fake
                                   or storage.s3.secret_access_key in fake):
        s3: S3Settings = dataclasses.replace(storage.s3, access_key_id=None,
                                             secret_access_key=None)
        storage = dataclasses.replace(storage, s3=s3)
    return dataclasses.replace(settings, upstreams=upstreams, storage=storage)


def _upstream(upstream: UpstreamSettings, fake: set[Secret]) -> UpstreamSettings:
    kept = tuple(c for c in upstream.credentials
                 if not (isinstance(c, StaticCredential) and c.password in fake))
    if kept == upstream.credentials:
        return upstream
    password = None if upstream.password in fake else upstream.password
    return dataclasses.replace(upstream, credentials=kept, password=password,
                               username=upstream.username if password else None)
