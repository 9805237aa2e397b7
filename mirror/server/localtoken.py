"""The node's local admin token: what ``mirror warm`` and ``mirror sync`` show the server.

Admin actions (``POST /admin/warm``, ``POST /admin/sync``) want a credential even when
the config names none (no ``auth``, no ``admin.token``, no ``admin.listen``). The
server keeps a random token in ``<storage.path>/admin.token`` (mode 0600, created
once, shared by every worker process of the node); the commands read it there with
the same config. Whoever may read the storage folder owns the cache already, so the
file gives nobody more than they have.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

FILE_NAME = "admin.token"


def token_path(storage: Path) -> Path:
    """Where the local admin token of the node on ``storage`` lives."""
    return storage / FILE_NAME


def ensure_local_token(storage: Path) -> str:
    """The node's local admin token, created on first use (blocking: call at start).

    Several worker processes may start at once: the token is written to a temp file and
    hard-linked into place, which fails if another process got there first; then that
    one's token is read. The file is never seen half-written.
    """
    path = token_path(storage)
    storage.mkdir(parents=True, exist_ok=True)
    existing = read_local_token(storage)
    if existing is not None:
        return existing
    temp = path.with_name(f".{FILE_NAME}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_urlsafe(32))
    try:
        os.link(temp, path)
    except FileExistsError:
        pass
    finally:
        temp.unlink(missing_ok=True)
    found = read_local_token(storage)
    if found is None:
        raise OSError(f"cannot read the local admin token {path}")
    return found


def read_local_token(storage: Path) -> str | None:
    """The token in ``<storage>/admin.token``, or ``None`` if there is none to read."""
    try:
        fd = os.open(token_path(storage), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as source:
        text = source.read(256).strip()
    return text or None


def matches(token: str | None, header: str | None) -> bool:
    """Whether ``header`` is ``Bearer <token>``."""
    if token is None or not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(),
                                                              token.encode())
