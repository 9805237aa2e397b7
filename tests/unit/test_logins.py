"""Issue 19 item 4 and the anonymous part of item 7, in process: failed logins are limited
per address and per user (429 with Retry-After), the bcrypt queue is bounded (503), a
recent wrong password costs no bcrypt, ``/v2/`` challenges and ``:`` is anonymous."""

from __future__ import annotations

import asyncio
import base64
import threading
from pathlib import Path
from typing import Any

import bcrypt
import pytest

from mirror import config
from mirror.config import LoginLimits
from mirror.errors import ConfigError, TooManyRequests, Unauthorized
from mirror.server.auth import Authenticator
from mirror.server.logins import BcryptQueue, FailureLimits, LoginsBusy


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _authenticator(tmp_path: Path, **auth: Any) -> Authenticator:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text("".join(f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(4)).decode()}\n"
                                for u, p in {"alice": "alice-pw", "bob": "bob-pw"}.items()))
    settings = config.parse({
        "version": 1, "upstreams": [{"name": "reg.test", "url": "http://127.0.0.1:1"}],
        "auth": {"htpasswd": str(htpasswd), **auth}, "access": [{"who": ["*"]}]},
        env={}, base=tmp_path)
    assert settings.auth is not None
    return Authenticator(settings.auth)


def test_failures_are_limited_per_address_with_retry_after() -> None:
    clock = Clock()
    limits = FailureLimits(LoginLimits(per_address=3, per_user=100, window=60), clock)
    for i in range(3):
        limits.admit("127.0.0.2", f"user{i}")
        limits.done("127.0.0.2", f"user{i}", failed=True)
        clock.now += 1
    with pytest.raises(TooManyRequests) as caught:
        limits.admit("127.0.0.2", "someone")
    assert caught.value.status == 429
    assert caught.value.headers["Retry-After"] == "57"  # the oldest leaves the window then
    limits.admit("127.0.0.3", "someone")  # another address is not held back
    limits.done("127.0.0.3", "someone", failed=False)
    clock.now += 58
    limits.admit("127.0.0.2", "someone")  # the oldest failure left the window


def test_failures_are_limited_per_user_from_any_address() -> None:
    limits = FailureLimits(LoginLimits(per_address=100, per_user=2, window=60), Clock())
    for address in ("10.0.0.1", "10.0.0.2"):
        limits.admit(address, "alice")
        limits.done(address, "alice", failed=True)
    with pytest.raises(TooManyRequests, match="user"):
        limits.admit("10.0.0.3", "alice")
    limits.admit("10.0.0.3", "bob")


def test_checks_under_way_count_so_a_burst_cannot_all_get_in() -> None:
    limits = FailureLimits(LoginLimits(per_address=3, per_user=100, window=60), Clock())
    for i in range(3):
        limits.admit("127.0.0.2", f"u{i}")  # none has failed yet: all three are pending
    with pytest.raises(TooManyRequests):
        limits.admit("127.0.0.2", "u3")
    limits.done("127.0.0.2", "u0", failed=False)  # a success frees its place
    limits.admit("127.0.0.2", "u3")


async def test_the_bcrypt_queue_is_bounded_and_answers_503_at_once() -> None:
    queue = BcryptQueue(slots=1, queue=1)
    release = threading.Event()
    holding = asyncio.ensure_future(queue.run(lambda: release.wait(10)))
    await asyncio.sleep(0.05)  # it holds the only slot
    waiting = asyncio.ensure_future(queue.run(lambda: True))
    await asyncio.sleep(0)
    with pytest.raises(LoginsBusy) as caught:
        await queue.run(lambda: True)
    assert caught.value.status == 503 and caught.value.headers["Retry-After"] == "1"
    release.set()
    assert await holding is True and await waiting is True


async def test_a_recent_wrong_password_costs_no_bcrypt_and_no_count(tmp_path: Path,
                                                                     monkeypatch: Any) -> None:
    auth = _authenticator(tmp_path, limits={"per_address": 2, "delay": "0s"})
    checks: list[str] = []
    real = auth._check_password

    def counted(user: str, password: bytes) -> bool:
        checks.append(user)
        return real(user, password)

    monkeypatch.setattr(auth, "_check_password", counted)
    for _ in range(5):
        with pytest.raises(Unauthorized):
            await auth.authenticate(_basic("alice", "wrong"), address="127.0.0.2")
    assert checks == ["alice"]  # once; then from memory, and never 429
    assert (await auth.authenticate(_basic("alice", "alice-pw"), address="127.0.0.2")
            ).user == "alice"
    with pytest.raises(Unauthorized):
        await auth.authenticate(_basic("nobody", "x"), address="127.0.0.2")
    with pytest.raises(TooManyRequests):  # two distinct failures from this address now
        await auth.authenticate(_basic("bob", "other-wrong"), address="127.0.0.2")
    assert (await auth.authenticate(_basic("alice", "alice-pw"), address="127.0.0.2")
            ).user == "alice"  # remembered good: no check, no limit
    assert (await auth.authenticate(_basic("bob", "bob-pw"), address="127.0.0.3")).user == "bob"


async def test_v2_challenges_even_with_anonymous_and_empty_basic_is_anonymous(
        tmp_path: Path) -> None:
    auth = _authenticator(tmp_path, anonymous=True)
    with pytest.raises(Unauthorized) as caught:
        await auth.authenticate(None, ping=True)
    assert caught.value.headers["WWW-Authenticate"] == 'Basic realm="mirror"'
    assert not (await auth.authenticate(None)).authenticated
    assert not (await auth.authenticate(_basic("", ""), ping=True)).authenticated
    assert not (await auth.authenticate(_basic("", ""))).authenticated
    closed = _authenticator(tmp_path)  # anonymous off: ":" is no way in
    with pytest.raises(Unauthorized):
        await closed.authenticate(_basic("", ""))


@pytest.mark.parametrize(("auth", "key"), [
    ({"admin_groups": ["nope"]}, "auth.admin_groups[0]"),
    ({"limits": {"per_address": 0}}, "auth.limits.per_address"),
    ({"limits": {"window": "0s"}}, "auth.limits.window"),
    ({"limits": {"burst": 1}}, "auth.limits.burst"),
])
def test_bad_admin_groups_and_limits_name_their_key(tmp_path: Path, auth: dict[str, Any],
                                                    key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _authenticator(tmp_path, **auth)
    assert caught.value.key == key
