"""The upstream guard on its own, on a fake clock: token bucket, budget, breaker,
rate-limit headers, and the config keys that set them."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client import REGISTRY
from yarl import URL

from mirror import config
from mirror.config import BreakerSettings, BudgetSettings, UpstreamSettings
from mirror.errors import ConfigError, TooManyRequests, UpstreamUnavailable
from mirror.upstream.guard import (
    Breaker,
    TokenBucket,
    UpstreamGuard,
    parse_ratelimit,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def upstream(name: str, **overrides: Any) -> UpstreamSettings:
    return UpstreamSettings(name=name, url=URL("http://127.0.0.1:1"), **overrides)


# --- token bucket and budget ------------------------------------------------------


def test_bucket_refills_at_rate_up_to_capacity() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2.0, capacity=3.0, clock=clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait() == 0.5
    clock.now += 0.5
    assert bucket.take() and not bucket.take()
    clock.now += 100
    assert bucket.level() == 3.0


async def test_client_requests_overdraw_up_to_their_share_then_fail_fast() -> None:
    clock = Clock()
    guard = UpstreamGuard(upstream("budget-unit", budget=BudgetSettings(
        rate=2.0, burst=4, client_overdraft=0.5)), clock=clock)
    for _ in range(6):  # the 4 of the budget, then the 2 (= 0.5 * 4) of the overdraft
        await guard.admit(background=False)
    with pytest.raises(TooManyRequests) as info:
        await guard.admit(background=False)
    assert info.value.headers["Retry-After"] == "1"  # the overdraft refills at 1/s
    assert sample("mirror_upstream_budget_overdrafts_total", registry="budget-unit") == 2
    assert sample("mirror_upstream_budget_refusals_total", registry="budget-unit") == 1
    # Sustained, clients get the budget's rate and the overdraft's: 2/s + 1/s.
    clock.now += 10
    admitted = 0
    for _ in range(1000):  # 10 s of requests every 10 ms
        clock.now += 0.01
        try:
            await guard.admit(background=False)
            admitted += 1
        except TooManyRequests:
            pass
    assert admitted == pytest.approx(4 + 2 + 10 * 3, abs=2)


async def test_background_work_never_uses_the_overdraft() -> None:
    guard = UpstreamGuard(upstream("budget-bg", budget=BudgetSettings(
        rate=50.0, burst=1, client_overdraft=5.0)))
    await guard.admit(background=True)
    waited = asyncio.get_running_loop().time()
    await guard.admit(background=True)  # the overdraft is full; it waits for the budget
    assert asyncio.get_running_loop().time() - waited >= 0.015
    assert sample("mirror_upstream_budget_waits_total", registry="budget-bg") == 1


async def test_no_overdraft_holds_clients_to_the_budget() -> None:
    clock = Clock()
    guard = UpstreamGuard(upstream("strict", budget=BudgetSettings(
        rate=0.5, burst=1, client_overdraft=0.0)), clock=clock)
    await guard.admit(background=False)
    with pytest.raises(TooManyRequests) as info:
        await guard.admit(background=False)
    assert info.value.retry_after == 2


def test_client_retry_after_is_bounded() -> None:
    guard = UpstreamGuard(upstream("bounded", max_client_retry_after=600.0))
    assert guard.client_retry_after(None) == 60
    assert guard.client_retry_after(0.2) == 1
    assert guard.client_retry_after(86400) == 600


# --- breaker ----------------------------------------------------------------------


def breaker(name: str, clock: Clock, failures: int = 3, max_wait: float = 600.0) -> Breaker:
    return Breaker(name, BreakerSettings(failures=failures, window=10.0, cool_down=5.0), clock,
                   max_wait)


def test_breaker_opens_after_n_failures_in_a_row_and_fails_fast() -> None:
    clock = Clock()
    b = breaker("brk-open", clock)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            b.settle(b.enter(), ok=False)
    assert b.state == "open"
    with pytest.raises(UpstreamUnavailable) as info:
        b.enter()
    assert info.value.status == 503 and info.value.headers["Retry-After"] == "5"
    assert sample("mirror_upstream_breaker_state", registry="brk-open") == 1
    assert sample("mirror_upstream_breaker_transitions_total", registry="brk-open",
                  state="open") == 1
    opened = [e for e in logs if e["event"] == "upstream_breaker_open"]
    assert opened and opened[0]["registry"] == "brk-open" and opened[0]["log_level"] == "warning"


def test_a_success_resets_the_count_and_old_failures_fall_out_of_the_window() -> None:
    clock = Clock()
    b = breaker("brk-window", clock)
    b.settle(b.enter(), ok=False)
    b.settle(b.enter(), ok=False)
    b.settle(b.enter(), ok=True)
    b.settle(b.enter(), ok=False)
    b.settle(b.enter(), ok=False)
    clock.now += 11  # the two failures are now older than the window
    b.settle(b.enter(), ok=False)
    assert b.state == "closed"
    b.settle(b.enter(), ok=None)  # no verdict changes nothing
    b.settle(b.enter(), ok=False)
    b.settle(b.enter(), ok=False)
    assert b.state == "open"


def test_half_open_lets_one_probe_through_and_its_success_closes() -> None:
    clock = Clock()
    b = breaker("brk-probe", clock, failures=1)
    b.settle(b.enter(), ok=False)
    clock.now += 5
    probe = b.enter()
    assert probe.probe and b.state == "half_open"
    assert sample("mirror_upstream_breaker_state", registry="brk-probe") == 2
    with pytest.raises(UpstreamUnavailable):
        b.enter()  # only one probe at a time
    b.settle(probe, ok=True)
    assert b.state == "closed"
    assert not b.enter().probe
    assert sample("mirror_upstream_breaker_state", registry="brk-probe") == 0
    for state in ("open", "half_open", "closed"):
        assert sample("mirror_upstream_breaker_transitions_total", registry="brk-probe",
                      state=state) == 1


def test_failed_probe_reopens_and_a_cancelled_probe_frees_the_slot() -> None:
    clock = Clock()
    b = breaker("brk-reopen", clock, failures=1)
    b.settle(b.enter(), ok=False)
    clock.now += 5
    b.settle(b.enter(), ok=False)
    assert b.state == "open"
    with pytest.raises(UpstreamUnavailable):
        b.enter()
    clock.now += 5
    b.settle(b.enter(), ok=None)  # the probe's caller went away
    assert b.enter().probe


def test_breaker_opened_by_429s_answers_toomanyrequests_and_waits_out_retry_after() -> None:
    clock = Clock()
    b = breaker("brk-429", clock, failures=2)
    for _ in range(2):
        b.settle(b.enter(), ok=False, rate_limited=True, retry_after=120.0)
    with pytest.raises(TooManyRequests) as info:
        b.enter()
    assert info.value.headers["Retry-After"] == "120"
    clock.now += 60  # past the cool-down, not past upstream's Retry-After
    with pytest.raises(TooManyRequests):
        b.enter()
    clock.now += 60
    assert b.enter().probe


def test_an_enormous_retry_after_stretches_the_cool_down_only_to_the_bound() -> None:
    clock = Clock()
    b = breaker("brk-bound", clock, failures=1, max_wait=300.0)
    b.settle(b.enter(), ok=False, rate_limited=True, retry_after=86400.0)
    with pytest.raises(TooManyRequests) as info:
        b.enter()
    assert info.value.headers["Retry-After"] == "300"
    clock.now += 300
    assert b.enter().probe


def test_zero_failures_disables_the_breaker() -> None:
    clock = Clock()
    b = breaker("brk-off", clock, failures=0)
    for _ in range(50):
        b.settle(b.enter(), ok=False)
    assert b.state == "closed"


# --- rate-limit headers -----------------------------------------------------------


def test_parse_ratelimit() -> None:
    assert parse_ratelimit("100;w=21600") == (100, 21600)
    assert parse_ratelimit(" 76 ; w=21600") == (76, 21600)
    assert parse_ratelimit("42") == (42, None)
    assert parse_ratelimit("lots") is None
    assert parse_ratelimit(None) is None


def test_ratelimit_headers_become_gauges_per_credential() -> None:
    guard = UpstreamGuard(upstream("hub-gauges"))
    guard.observe({"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "76;w=21600"},
                  "anonymous")
    guard.observe({"ratelimit-limit": "200;w=21600", "ratelimit-remaining": "199;w=21600"},
                  "ci-bot")
    guard.observe({"content-type": "application/json"}, "ci-bot")
    labels = {"registry": "hub-gauges", "credential": "anonymous"}
    assert sample("mirror_upstream_ratelimit_limit", **labels) == 100
    assert sample("mirror_upstream_ratelimit_remaining", **labels) == 76
    assert sample("mirror_upstream_ratelimit_window_seconds", **labels) == 21600
    assert sample("mirror_upstream_ratelimit_remaining", registry="hub-gauges",
                  credential="ci-bot") == 199
    assert guard.ratelimit_remaining("ci-bot") == 199
    assert guard.ratelimit_remaining("nobody") is None


# --- config -----------------------------------------------------------------------


def _upstream_doc(**keys: Any) -> dict[str, Any]:
    return {"upstreams": [{"name": "a", "url": "http://a", **keys}]}


def test_budget_and_breaker_config() -> None:
    a, = config.parse(_upstream_doc(
        budget={"rate": "600/m", "burst": 50, "client_overdraft": 0.25},
        breaker={"failures": 3, "window": "1m", "cool_down": "250ms"},
        max_client_retry_after="10m"), env={}).upstreams
    assert a.budget == BudgetSettings(rate=10.0, burst=50, client_overdraft=0.25)
    assert a.breaker == BreakerSettings(failures=3, window=60.0, cool_down=0.25)
    assert a.max_client_retry_after == 600
    b, = config.parse(_upstream_doc(budget={"rate": 2.5}), env={}).upstreams
    assert b.budget == BudgetSettings(rate=2.5, burst=3, client_overdraft=0.5)
    assert b.breaker == BreakerSettings()
    c, = config.parse(_upstream_doc(), env={}).upstreams
    assert c.budget is None and c.breaker.failures == 5
    assert config.parse_rate("1000/h") == pytest.approx(1000 / 3600)


@pytest.mark.parametrize(("keys", "key"), [
    ({"budget": {"burst": 5}}, "upstreams[0].budget.rate"),
    ({"budget": {"rate": "fast"}}, "upstreams[0].budget.rate"),
    ({"budget": {"rate": "0/s"}}, "upstreams[0].budget.rate"),
    ({"budget": {"rate": 5, "burst": 0}}, "upstreams[0].budget.burst"),
    ({"budget": {"rate": 5, "client_overdraft": -1}}, "upstreams[0].budget.client_overdraft"),
    ({"budget": {"rate": 5, "client_overdraft": "half"}}, "upstreams[0].budget.client_overdraft"),
    ({"budget": {"rate": 5, "share": 1}}, "upstreams[0].budget.share"),
    ({"budget": "20/s"}, "upstreams[0].budget"),
    ({"breaker": {"failures": -1}}, "upstreams[0].breaker.failures"),
    ({"breaker": {"window": "0s"}}, "upstreams[0].breaker.window"),
    ({"breaker": {"cool_down": "later"}}, "upstreams[0].breaker.cool_down"),
    ({"breaker": {"threshold": 3}}, "upstreams[0].breaker.threshold"),
    ({"max_client_retry_after": "0s"}, "upstreams[0].max_client_retry_after"),
])
def test_guard_config_errors_name_their_key(keys: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as error:
        config.parse(_upstream_doc(**keys), env={})
    assert error.value.key == key


def test_example_config_sets_a_budget_and_the_default_breaker() -> None:
    example = Path(__file__).parents[2] / "config" / "mirror.example.yaml"
    hub = config.load(example).upstreams[0]
    assert hub.budget == BudgetSettings(rate=20.0, burst=100, client_overdraft=0.5)
    assert hub.breaker == BreakerSettings()
    assert hub.max_client_retry_after == 3600
