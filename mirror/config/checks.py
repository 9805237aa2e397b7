"""Checks of what a valid config points at: the storage folder, the TLS pair, the port.

Validation (:func:`mirror.config.parse`) looks at the file only; these look at the
machine. ``mirror config check`` runs the ones that change nothing; ``mirror
serve`` runs them all before it starts, so that each problem is one line naming
the key, not a traceback from deep inside the server.
"""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

from mirror.config.settings import Settings, TlsSettings
from mirror.errors import ConfigError, ListenError


def check_storage(path: Path, *, create: bool) -> None:
    """The storage folder is a writable directory, or can be created as one.

    Args:
        path: ``storage.path``.
        create: create it (``serve``); else only check that it could be.

    Raises:
        ConfigError: (``storage.path``) it is a file, lies under a file, or cannot
            be created or written.
    """
    key = "storage.path"
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ConfigError(key, f"{path} {what}; it must be a folder")
    if create:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(key, f"cannot create {path}: {exc.strerror}") from None
        existing = path
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(key, f"{existing} is not writable by this user")


def tls_context(tls: TlsSettings) -> ssl.SSLContext:
    """The server's TLS context: the certificate chain and its key, checked as a pair.

    Raises:
        ConfigError: (``tls``) a file is not PEM, or the key does not match the certificate.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert, tls.key)
    except ssl.SSLError as exc:
        why = "the key does not match the certificate" if "KEY_VALUES_MISMATCH" in str(exc) \
            else f"not a PEM certificate and key ({exc.reason or exc})"
        raise ConfigError("tls", f"{tls.cert} / {tls.key}: {why}") from None
    except OSError as exc:
        raise ConfigError("tls", f"cannot read {tls.cert} / {tls.key}: {exc.strerror}") from None
    return context


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, bound before anything says the mirror started.

    Never with ``SO_REUSEPORT``: a second mirror on the port must fail here, not share
    the traffic; worker processes share this one socket (:mod:`mirror.server.workers`).

    Raises:
        ListenError: the address is in use or cannot be bound (not a config error: the
            same file works once the port is free).
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"cannot listen on {host}:{port}: {why}") from None


def check_machine(settings: Settings) -> None:
    """What ``config check`` can tell without changing anything: storage, TLS.

    Raises:
        ConfigError: naming the key.
    """
    check_storage(settings.storage.path, create=False)
    if settings.tls is not None:
        tls_context(settings.tls)


def machine_errors(settings: Settings) -> list[ConfigError]:
    """Every problem :func:`check_machine` finds, not only the first."""
    found = []
    try:
        check_storage(settings.storage.path, create=False)
    except ConfigError as exc:
        found.append(exc)
    if settings.tls is not None:
        try:
            tls_context(settings.tls)
        except ConfigError as exc:
            found.append(exc)
    return found
