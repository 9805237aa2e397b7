"""WWW-Authenticate parsing, token responses and the token cache."""

from __future__ import annotations

import asyncio

import pytest

from mirror.config import Secret
from mirror.upstream.auth import (
    BearerToken,
    Challenge,
    TokenCache,
    basic_authorization,
    parse_token_response,
    parse_www_authenticate,
    pick_challenge,
    token_key,
)


def test_docker_hub_bearer_challenge() -> None:
    header = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
              'scope="repository:library/nginx:pull"')
    assert parse_www_authenticate([header]) == [Challenge("bearer", {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/nginx:pull",
    })]


def test_commas_inside_quoted_values() -> None:
    [challenge] = parse_www_authenticate(
        ['Bearer realm="https://r/token", scope="repository:a/b:pull,push", '
         'error="insufficient_scope"']
    )
    assert challenge.params["scope"] == "repository:a/b:pull,push"
    assert challenge.error == "insufficient_scope"


def test_two_challenges_on_one_line() -> None:
    challenges = parse_www_authenticate(['Basic realm="x", Bearer realm="y",service="z"'])
    assert challenges == [
        Challenge("basic", {"realm": "x"}),
        Challenge("bearer", {"realm": "y", "service": "z"}),
    ]
    assert pick_challenge(challenges) == challenges[1]


def test_several_header_lines() -> None:
    challenges = parse_www_authenticate(['Basic realm="x"', 'Bearer realm="y"'])
    assert [c.scheme for c in challenges] == ["basic", "bearer"]


def test_scheme_and_parameter_names_are_case_insensitive() -> None:
    [challenge] = parse_www_authenticate(['BEARER Realm="https://r/t", SERVICE=svc'])
    assert challenge == Challenge("bearer", {"realm": "https://r/t", "service": "svc"})


def test_escapes_empty_values_token68_and_garbage() -> None:
    [challenge] = parse_www_authenticate([r'Bearer realm="a\"b", service=""'])
    assert challenge.params == {"realm": 'a"b', "service": ""}
    assert parse_www_authenticate(["Negotiate abc==, Basic realm=x"]) == [
        Challenge("negotiate"), Challenge("basic", {"realm": "x"})
    ]
    assert parse_www_authenticate(["", "  ,  "]) == []
    assert parse_www_authenticate(['Basic realm="unterminated']) == [Challenge("basic")]


def test_pick_challenge_prefers_bearer_then_basic() -> None:
    assert pick_challenge([Challenge("negotiate")]) is None
    assert pick_challenge([Challenge("basic"), Challenge("negotiate")]) == Challenge("basic")
    assert pick_challenge([]) is None


def test_token_response_fields() -> None:
    token = parse_token_response({"token": "t1", "expires_in": 300}, now=100.0)
    assert token.authorization() == "Bearer t1"
    assert token.expires_at == 400.0
    assert parse_token_response({"access_token": "t2"}, now=0).authorization() == "Bearer t2"


@pytest.mark.parametrize("expires_in", [None, 5, "300"])
def test_token_lifetime_defaults_and_is_raised_to_60s(expires_in: object) -> None:
    body = {"token": "t", "expires_in": expires_in}
    assert parse_token_response(body, now=0).expires_at == 60.0


def test_issued_at_shortens_lifetime_within_reason() -> None:
    wall = 1_700_000_000.0  # 2023-11-14T22:13:20Z
    body = {"token": "t", "expires_in": 300, "issued_at": "2023-11-14T22:12:20Z"}
    assert parse_token_response(body, now=0, wall_now=wall).expires_at == 240.0
    skewed = {"token": "t", "expires_in": 300, "issued_at": "2020-01-01T00:00:00Z"}
    assert parse_token_response(skewed, now=0, wall_now=wall).expires_at == 150.0
    future = {"token": "t", "expires_in": 300, "issued_at": "2030-01-01T00:00:00Z"}
    assert parse_token_response(future, now=0, wall_now=wall).expires_at == 300.0


@pytest.mark.parametrize("body", [{}, {"token": ""}, [], {"token": 3}])
def test_token_response_without_token(body: object) -> None:
    with pytest.raises(ValueError, match="token"):
        parse_token_response(body, now=0)


def test_secrets_do_not_show() -> None:
    token = parse_token_response({"token": "sekrit-token"}, now=0)
    assert "sekrit" not in repr(token)
    header = basic_authorization("bob", Secret("pw"))
    assert "Ym9iOnB3" not in repr(header)
    assert header.reveal() == "Basic Ym9iOnB3"


def test_token_key_sorts_and_dedups_scopes() -> None:
    challenge = Challenge("bearer", {"realm": "r", "service": "s"})
    assert token_key(challenge, ["b", "a", "b"]) == ("r", "s", ("a", "b"))


def _token(value: str, now: float, lifetime: float = 60) -> BearerToken:
    return BearerToken(Secret(value), expires_at=now + lifetime, obtained_at=now)


async def test_cache_fetches_once_for_concurrent_callers() -> None:
    cache = TokenCache(clock=lambda: 0.0)
    calls = 0

    async def fetch() -> BearerToken:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return _token(f"t{calls}", 0)

    key = ("r", "s", ("repository:a:pull",))
    tokens = await asyncio.gather(*(cache.get(key, fetch) for _ in range(20)))
    assert calls == 1
    assert {t.authorization() for t in tokens} == {"Bearer t1"}


async def test_cache_refreshes_shortly_before_expiry() -> None:
    now = [0.0]
    cache = TokenCache(clock=lambda: now[0])
    fetched: list[str] = []

    async def fetch() -> BearerToken:
        fetched.append(f"t{len(fetched) + 1}")
        return _token(fetched[-1], now[0], lifetime=300)

    key = ("r", "s", ())
    await cache.get(key, fetch)
    now[0] = 269.0
    assert (await cache.get(key, fetch)).authorization() == "Bearer t1"
    now[0] = 271.0  # inside the 30 s refresh margin
    assert (await cache.get(key, fetch)).authorization() == "Bearer t2"


async def test_cache_failed_fetch_lets_the_next_caller_try() -> None:
    cache = TokenCache(clock=lambda: 0.0)
    key = ("r", "s", ())

    async def broken() -> BearerToken:
        raise RuntimeError("down")

    async def working() -> BearerToken:
        return _token("ok", 0)

    with pytest.raises(RuntimeError):
        await cache.get(key, broken)
    assert (await cache.get(key, working)).authorization() == "Bearer ok"


async def test_invalidate_keeps_a_newer_token() -> None:
    cache = TokenCache(clock=lambda: 0.0)
    key = ("r", "s", ())
    old, new = _token("old", 0), _token("new", 0)

    async def give_new() -> BearerToken:
        return new

    async def give_old() -> BearerToken:
        return old

    await cache.get(key, give_new)
    cache.invalidate(key, old)
    assert cache.peek(key) is new
    cache.invalidate(key, new)
    assert cache.peek(key) is None
    assert await cache.get(key, give_old) is old
