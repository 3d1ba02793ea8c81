"""Rate limits and budgets (keel.gateway.limits), in memory and on a real Redis shared by processes.

Every behavioural test runs on both backends. The Redis leg is required: when Redis is
unreachable those tests FAIL (the ``redis_url`` fixture of conftest), they are never skipped.
The cross-replica tests run two OS processes (spawn), each with its own limiter or ledger and
many asyncio tasks. (The workers import this module, so it must not import tests.conftest.)
"""

from __future__ import annotations

import asyncio
import bisect
import math
import multiprocessing
import os
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis.asyncio as aioredis

from keel.errors import RateLimited
from keel.gateway.limits import (
    Budget,
    Limit,
    MemoryBudgetLedger,
    MemoryRateLimiter,
    RedisBudgetLedger,
    RedisRateLimiter,
    _Script,
    period_bounds,
)

BACKENDS = ["memory", "redis"]
REDIS_ONLY = ["redis"]

T0 = 1_700_000_000.0  # a multiple of every slice length used below, so slice boundaries are exact


def ts(iso: str) -> float:
    return datetime.fromisoformat(iso).replace(tzinfo=UTC).timestamp()


class Env:
    """Builds limiters and ledgers on one backend; closes them and deletes their Redis keys after."""

    def __init__(self, backend: str, redis_url: str | None) -> None:
        self.backend = backend
        self.redis_url = redis_url
        self.prefix = f"keel:test:limits:{uuid.uuid4().hex[:12]}:"
        self._closers: list[Callable[[], Any]] = []

    def limiter(self, **kw: Any) -> MemoryRateLimiter | RedisRateLimiter:
        lim: MemoryRateLimiter | RedisRateLimiter
        if self.backend == "memory":
            lim = MemoryRateLimiter(**kw)
        else:
            assert self.redis_url is not None
            lim = RedisRateLimiter(self.redis_url, prefix=self.prefix + "rl:", **kw)
        self._closers.append(lim.close)
        return lim

    def ledger(self, **kw: Any) -> MemoryBudgetLedger | RedisBudgetLedger:
        led: MemoryBudgetLedger | RedisBudgetLedger
        if self.backend == "memory":
            led = MemoryBudgetLedger(**kw)
        else:
            assert self.redis_url is not None
            led = RedisBudgetLedger(self.redis_url, prefix=self.prefix + "budget:", **kw)
        self._closers.append(led.close)
        return led

    async def aclose(self) -> None:
        for close in self._closers:
            await close()
        if self.redis_url is not None:
            await _delete_prefix(self.redis_url, self.prefix)


async def _delete_prefix(url: str, prefix: str) -> None:
    r = aioredis.Redis.from_url(url)
    try:
        keys = [k async for k in r.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await r.delete(*keys)
    finally:
        await r.aclose()


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    e = Env(request.param, url)
    try:
        yield e
    finally:
        await e.aclose()


# --------------------------------------------------------------------------- rate limits


async def test_rpm_admits_up_to_the_limit_then_refuses_until_the_oldest_request_leaves(env: Env) -> None:
    lim = env.limiter()  # 60 s window in 120 slices of 0.5 s
    key = Limit("key:k1", rpm=3)
    for i in range(3):
        assert (await lim.check([key], 0, now=T0 + 10 * i)).allowed
    d = await lim.check([key], 0, now=T0 + 25)
    assert not d.allowed and d.limit == key and d.kind == "rpm" and not d.too_large
    # the request at T0 is counted until its slice [T0, T0 + 0.5) has fully left the window
    assert d.retry_after_s == pytest.approx(60.5 - 25)
    with pytest.raises(RateLimited) as exc:
        d.raise_if_denied()
    assert exc.value.status == 429
    assert exc.value.code == "rate_limit_exceeded:key:rpm"
    assert exc.value.headers == {"retry-after": "36"}
    assert "3 requests per minute" in exc.value.message

    assert not (await lim.check([key], 0, now=T0 + 60.49)).allowed
    assert (await lim.check([key], 0, now=T0 + 60.5)).allowed  # exactly when promised
    d = await lim.check([key], 0, now=T0 + 61)
    assert not d.allowed and d.retry_after_s == pytest.approx(70.5 - 61)  # next: the one at T0 + 10
    assert (await lim.check([Limit("key:other", rpm=3)], 0, now=T0 + 61)).allowed  # scopes are separate


async def test_tpm_admits_and_refuses_by_tokens(env: Env) -> None:
    lim = env.limiter()
    user = Limit("user:u9", tpm=1000)
    assert (await lim.check([user], 600, now=T0)).allowed
    d = await lim.check([user], 500, now=T0 + 5)
    assert not d.allowed and d.kind == "tpm" and d.limit == user
    assert d.retry_after_s == pytest.approx(60.5 - 5)
    with pytest.raises(RateLimited) as exc:
        d.raise_if_denied()
    assert exc.value.code == "rate_limit_exceeded:user:tpm" and exc.value.headers == {"retry-after": "56"}
    assert (await lim.check([user], 400, now=T0 + 6)).allowed  # exactly fills it
    assert not (await lim.check([user], 1, now=T0 + 7)).allowed
    assert (await lim.check([user], 0, now=T0 + 7)).allowed  # a full (not over-full) window admits 0 tokens

    # one request larger than the whole limit can never pass: say so instead of a pointless retry-after
    big = await lim.check([Limit("user:u10", tpm=1000)], 1001, now=T0)
    assert not big.allowed and big.too_large and big.kind == "tpm"
    with pytest.raises(RateLimited) as exc:
        big.raise_if_denied()
    assert exc.value.code == "rate_limit_exceeded:user:tpm" and "retry-after" not in exc.value.headers
    assert "too large" in exc.value.message


async def test_several_limits_are_checked_and_counted_all_or_nothing(env: Env) -> None:
    lim = env.limiter()
    key = Limit("key:k", rpm=10, tpm=10_000)
    team = Limit("team:t1", rpm=2, tpm=500)
    deployment = Limit("deployment:xyz", tpm=100_000)
    assert (await lim.check([key, team, deployment], 100, now=T0)).allowed
    assert (await lim.check([key, team, deployment], 100, now=T0 + 1)).allowed
    d = await lim.check([key, team, deployment], 100, now=T0 + 2)
    assert not d.allowed and d.limit == team and d.kind == "rpm"
    # the refused check counted nothing anywhere: the key still has exactly 8 requests and 9800 tokens
    for i in range(8):
        assert (await lim.check([key], 0, now=T0 + 3 + i)).allowed
    assert not (await lim.check([key], 0, now=T0 + 12)).allowed
    key2 = Limit("key:k2", tpm=10_000)
    assert not (await lim.check([key2, Limit("team:t2", tpm=500)], 600, now=T0)).allowed
    assert (await lim.check([key2], 10_000, now=T0 + 1)).allowed

    # with several limits full, the refusal names the one that frees up last: retrying sooner is useless
    a, b = Limit("key:a", rpm=1), Limit("team:b", rpm=1)
    assert (await lim.check([b], 0, now=T0)).allowed
    assert (await lim.check([a], 0, now=T0 + 20)).allowed
    d = await lim.check([a, b], 0, now=T0 + 30)
    assert d.limit == a and d.retry_after_s == pytest.approx(80.5 - 30)
    # a limit listed twice is one counter, counted once with the stricter value
    c1, c2 = Limit("key:c", rpm=5), Limit("key:c", rpm=2)
    assert (await lim.check([c1, c2], 0, now=T0)).allowed
    assert (await lim.check([c1, c2], 0, now=T0)).allowed
    assert not (await lim.check([c1, c2], 0, now=T0)).allowed
    assert (await lim.check([c1], 0, now=T0)).allowed  # the counter holds 2, not 4


async def test_settle_tokens_corrects_the_estimate_both_ways(env: Env) -> None:
    lim = env.limiter()
    user = Limit("user:s", tpm=1000)
    d = await lim.check([user], 800, now=T0)
    assert d.allowed and d.at == T0
    assert not (await lim.check([user], 300, now=T0 + 1)).allowed
    await lim.settle_tokens([user], 800, 200, now=T0 + 2, admitted_at=d.at)  # used fewer: give back 600
    assert (await lim.check([user], 800, now=T0 + 3)).allowed  # 200 + 800
    assert not (await lim.check([user], 1, now=T0 + 3)).allowed
    # the refund came out of the slice at T0, so it expires with it: at T0 + 60.5 only the 800 is left
    assert (await lim.check([user], 200, now=T0 + 60.5)).allowed
    assert not (await lim.check([user], 1, now=T0 + 60.5)).allowed

    more = Limit("user:m", tpm=1000, rpm=100)
    assert (await lim.check([more], 100, now=T0)).allowed
    await lim.settle_tokens([more], 100, 700, now=T0 + 1)  # used more than estimated: count the extra
    assert not (await lim.check([more], 301, now=T0 + 2)).allowed
    assert (await lim.check([more], 300, now=T0 + 2)).allowed

    # without admitted_at the refund comes from the newest slices; it never drives a count below zero
    neg = Limit("user:n", tpm=1000)
    assert (await lim.check([neg], 100, now=T0)).allowed
    await lim.settle_tokens([neg], 1000, 0, now=T0 + 1)
    assert (await lim.check([neg], 1000, now=T0 + 2)).allowed
    assert not (await lim.check([neg], 1, now=T0 + 2)).allowed
    # limits without a tpm, and a zero difference, are left alone
    await lim.settle_tokens([Limit("key:rpm-only", rpm=1)], 10, 5, now=T0)
    await lim.settle_tokens([neg], 5, 5, now=T0)


async def test_window_slides_and_never_admits_more_than_the_limit_in_any_window(env: Env) -> None:
    # 4 s window in 64 slices of 1/16 s; a request every 1/256 s (exact binary fractions) for 3 windows
    window, rpm = 4.0, 200
    lim = env.limiter(window_s=window, slices=64)
    limit = Limit("key:slide", rpm=rpm)
    admitted = []
    for i in range(3 * 4 * 256):
        now = T0 + i / 256
        if (await lim.check([limit], 0, now=now)).allowed:
            admitted.append(now)
    assert sum(1 for t in admitted if t < T0 + window) == rpm  # from idle: exactly the limit
    assert _max_in_any_window(admitted, window) == rpm  # and never more, in any 4 s window
    # saturated without a break it still gets at least slices/(slices+1) of the limit per window
    assert len(admitted) >= math.floor(3 * rpm * 64 / 65)


def _max_in_any_window(times: list[float], window: float) -> int:
    """The most admissions in any half-open interval (t - window, t]."""
    times = sorted(times)
    return max((j + 1 - bisect.bisect_right(times, t - window) for j, t in enumerate(times)), default=0)


async def test_concurrent_tasks_in_one_process_get_exactly_the_limit(env: Env) -> None:
    window, rpm = 1.5, 300
    lim = env.limiter(window_s=window)
    limit = Limit("key:busy", rpm=rpm)
    admitted: list[float] = []
    start = time.time()

    async def client() -> None:
        while time.time() < start + window:
            d = await lim.check([limit], 0)
            if d.allowed:
                assert d.at is not None
                admitted.append(d.at)
            await asyncio.sleep(0)

    await asyncio.gather(*(client() for _ in range(50)))
    # counted by the limiter's own clock (Redis: the server's), which decides the window
    assert sum(1 for t in admitted if t < start + window) == rpm
    assert _max_in_any_window(admitted, window) <= rpm


@pytest.mark.parametrize("backend", REDIS_ONLY)
async def test_memory_and_redis_decide_identically(backend: str, redis_url: str) -> None:
    env = Env(backend, redis_url)
    try:
        mem, red = MemoryRateLimiter(window_s=4.0, slices=64), env.limiter(window_s=4.0, slices=64)
        rng = random.Random(7)
        limits = [Limit("key:p", rpm=40, tpm=4000), Limit("team:p", rpm=60, tpm=5000)]
        now = T0
        for _ in range(600):
            now += rng.choice([0.0, 1 / 64, 1 / 16, 0.25])
            tokens = rng.randrange(0, 400)
            dm, dr = await mem.check(limits, tokens, now=now), await red.check(limits, tokens, now=now)
            assert dm == dr
            if dm.allowed and rng.random() < 0.3:
                actual = rng.randrange(0, 600)
                for lim in (mem, red):
                    await lim.settle_tokens(limits, tokens, actual, now=now, admitted_at=dm.at)
    finally:
        await env.aclose()


@pytest.mark.parametrize("backend", REDIS_ONLY)
async def test_redis_keys_expire_and_the_server_clock_decides(backend: str, redis_url: str) -> None:
    env = Env(backend, redis_url)
    r = aioredis.Redis.from_url(redis_url)
    try:
        lim = env.limiter(window_s=6.0, slices=120)
        d = await lim.check([Limit("key:ttl", rpm=5, tpm=100)], 10)
        assert d.allowed and d.at is not None and abs(d.at - time.time()) < 1.0  # Redis TIME
        keys = [k async for k in r.scan_iter(match=env.prefix + "*")]
        assert len(keys) == 2
        for k in keys:
            assert 0 < await r.pttl(k) <= 6000 + 2 * 50  # a window and two slices after the last write

        led = env.ledger(reservation_ttl_s=30)
        now = time.time()
        assert (await led.reserve([Budget("key:ttl", 5.0, "daily")], "req-ttl", 0.5)).ok
        _, end = period_bounds("daily", now)
        assert end is not None
        budget_keys = [k async for k in r.scan_iter(match=env.prefix + "budget:[bz]:*")]
        assert len(budget_keys) == 2
        for k in budget_keys:  # kept until the period ends, plus the retention (7 days)
            assert await r.pttl(k) == pytest.approx((end.timestamp() - now + 7 * 86400) * 1000, abs=5000)
        assert 0 < await r.pttl(env.prefix + "budget:res:req-ttl") <= 30_000
        await led.settle("req-ttl", 0.1)
        assert 0 < await r.pttl(env.prefix + "budget:res:req-ttl") <= 3_600_000  # the tombstone
    finally:
        await r.aclose()
        await env.aclose()


@pytest.mark.parametrize("backend", REDIS_ONLY)
async def test_script_not_cached_on_the_server_falls_back_to_eval(backend: str, redis_url: str) -> None:
    r = aioredis.Redis.from_url(redis_url)
    try:
        script = _Script(f"-- {uuid.uuid4().hex}\nreturn tonumber(ARGV[1]) + #KEYS")
        assert await r.script_exists(script.sha) == [False]
        assert await script(r, ["a", "b"], [40]) == 42  # NOSCRIPT → EVAL, which caches it
        assert await r.script_exists(script.sha) == [True]
        assert await script(r, ["a"], [1]) == 2  # EVALSHA
    finally:
        await r.aclose()


# ------------------------------------------------------- cross-replica: two OS processes, one Redis


def _process_main(target: str, kwargs: dict[str, Any], ready: Any, go: Any, start_at: Any, out: Any) -> None:
    out.put(asyncio.run(globals()[target](ready=ready, go=go, start_at=start_at, **kwargs)))


async def _start_together(ready: Any, go: Any, start_at: Any) -> float:
    ready.put(os.getpid())
    assert await asyncio.to_thread(go.wait, 60)
    t0 = float(start_at.value)
    await asyncio.sleep(max(0.0, t0 - time.time()))
    return t0


def _run_processes(target: str, kwargs: list[dict[str, Any]]) -> list[Any]:
    """Run ``target`` in one spawned process per kwargs; all start at the same instant."""
    ctx = multiprocessing.get_context("spawn")
    ready, out, go, start_at = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    procs = [
        ctx.Process(target=_process_main, args=(target, kw, ready, go, start_at, out), daemon=True)
        for kw in kwargs
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        start_at.value = time.time() + 0.2
        go.set()
        return [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


async def _hammer(
    *, url: str, prefix: str, window_s: float, rpm: int, tasks: int, duration: float, **sync: Any
) -> dict[str, Any]:
    limiter = RedisRateLimiter(url, prefix=prefix, window_s=window_s)
    limit = Limit("key:hammered", rpm=rpm)
    await asyncio.gather(*(limiter.redis.ping() for _ in range(tasks)))  # connect before the start
    t0 = await _start_together(**sync)
    admitted: list[float] = []
    attempts = 0

    async def client() -> None:
        nonlocal attempts
        while time.time() < t0 + duration:
            d = await limiter.check([limit], 0)
            attempts += 1
            if d.allowed:
                assert d.at is not None
                admitted.append(d.at)

    await asyncio.gather(*(client() for _ in range(tasks)))
    await limiter.close()
    return {"t0": t0, "admitted": admitted, "attempts": attempts}


@pytest.mark.parametrize("backend", REDIS_ONLY)
async def test_two_processes_hammering_share_one_exact_rpm_limit(backend: str, redis_url: str) -> None:
    window, rpm = 5.0, 600  # 600 per (shortened) minute: the same algorithm, 120 slices of 1/24 s
    prefix = f"keel:test:limits:{uuid.uuid4().hex[:12]}:"
    kw = {
        "url": redis_url,
        "prefix": prefix,
        "window_s": window,
        "rpm": rpm,
        "tasks": 32,
        "duration": 2 * window,
    }
    try:
        results = await asyncio.to_thread(_run_processes, "_hammer", [kw, kw])
    finally:
        await _delete_prefix(redis_url, prefix)
    t0 = results[0]["t0"]
    admitted = sorted(t for r in results for t in r["admitted"])
    attempts = sum(r["attempts"] for r in results)
    first = sum(1 for t in admitted if t0 <= t < t0 + window)
    second = sum(1 for t in admitted if t0 + window <= t < t0 + 2 * window)
    peak = _max_in_any_window(admitted, window)
    print(
        f"\ncross-replica RPM, 2 processes x 32 tasks, limit {rpm} per {window:g}s window: "
        f"admitted {first} in window 1 ({(first - rpm) / rpm:+.2%}), {second} in window 2 "
        f"({(second - rpm) / rpm:+.2%}), at most {peak} in any {window:g}s interval; "
        f"{attempts} checks ({attempts / (2 * window):.0f}/s), per process {[len(r['admitted']) for r in results]}"
    )
    assert all(r["admitted"] for r in results)  # both replicas really competed
    assert attempts > 10 * rpm  # and hammered
    assert abs(first - rpm) <= rpm * 0.01
    assert abs(second - rpm) <= rpm * 0.01
    assert peak <= rpm


# --------------------------------------------------------------------------- budgets


async def test_reserve_settle_release(env: Env) -> None:
    led = env.ledger()
    b = Budget("key:b1", 1.0, "monthly")
    now = ts("2025-03-10T12:00:00")
    assert (await led.reserve([b], "r1", 0.4, now=now)).ok
    s = await led.status(b, now=now)
    assert (s["spent"], s["reserved"], s["remaining"], s["calls"]) == (0.0, 0.4, 0.6, 1)
    assert (s["period_start"], s["period_end"]) == ("2025-03-01T00:00:00Z", "2025-04-01T00:00:00Z")
    assert (await led.reserve([b], "r2", 0.4, now=now)).ok
    refused = await led.reserve([b], "r3", 0.4, now=now)
    assert not refused.ok and refused.budget == b and refused.reason == "limit"
    assert (refused.spent_usd, refused.reserved_usd) == (0.0, 0.8)
    assert refused.retry_after_s == pytest.approx(ts("2025-04-01T00:00:00") - now)

    result = await led.settle("r1", 0.1)
    assert result.settled and result.soft_limits_crossed == () and result.hard_limits_crossed == ()
    s = await led.status(b, now=now)
    assert (s["spent"], s["reserved"], s["remaining"]) == (0.1, 0.4, 0.5)
    assert (await led.reserve([b], "r3", 0.4, now=now)).ok  # 0.1 spent + 0.4 + 0.4 held
    assert await led.release("r2")
    s = await led.status(b, now=now)
    assert (s["spent"], s["reserved"], s["calls"]) == (0.1, 0.4, 3)  # a released call still counts
    # a retried reserve of a live reservation holds nothing more
    assert (await led.reserve([b], "r3", 0.4, now=now)).ok
    assert (await led.status(b, now=now))["reserved"] == 0.4


async def test_settle_and_release_are_idempotent(env: Env) -> None:
    led = env.ledger()
    b = Budget("team:idem", 5.0, "daily")
    now = time.time()
    assert (await led.reserve([b], "a", 1.0, now=now)).ok
    assert (await led.settle("a", 0.25)).settled
    assert not (await led.settle("a", 0.25)).settled  # a duplicate settle changes nothing
    assert not (await led.settle("a", 3.0)).settled
    assert not await led.release("a")  # nor does a release after the settle
    assert (await led.status(b, now=now))["spent"] == 0.25

    assert (await led.reserve([b], "c", 1.0, now=now)).ok
    assert await led.release("c")
    assert not await led.release("c")
    assert not (await led.settle("c", 1.0)).settled  # released: a late settle charges nothing
    s = await led.status(b, now=now)
    assert (s["spent"], s["reserved"]) == (0.25, 0.0)
    assert not (await led.settle("never-reserved", 1.0)).settled
    assert not await led.release("never-reserved")
    with pytest.raises(ValueError, match="already settled"):
        await led.reserve([b], "a", 1.0, now=now)  # a finished request id is not reused


async def test_hard_limit_refusal_names_the_budget_and_holds_nothing(env: Env) -> None:
    led = env.ledger()
    now = ts("2025-06-15T18:00:00")
    key = Budget("key:k", 10.0, "monthly")
    team = Budget("team:t", 1.0, "daily")
    r = await led.reserve([key, team], "big", 1.5, now=now)
    assert not r.ok and r.budget == team and r.reason == "limit"
    for b in (key, team):
        s = await led.status(b, now=now)
        assert (s["reserved"], s["calls"]) == (0.0, 0)  # all or nothing
    with pytest.raises(RateLimited) as exc:
        r.raise_if_denied()
    assert exc.value.status == 429 and exc.value.code == "budget_exceeded"
    assert exc.value.headers == {"retry-after": str(6 * 3600)}  # when the daily period resets
    assert "team daily budget of $1.00" in exc.value.message
    assert (await led.reserve([key, team], "fits", 1.0, now=now)).ok  # exactly the limit is allowed
    assert not (await led.reserve([key, team], "more", 0.000001, now=now)).ok
    # no hard limit at all: only the soft limit and call caps apply
    assert (await led.reserve([Budget("user:free", math.inf, "total")], "free", 1e6, now=now)).ok


async def test_soft_limit_crossing_is_reported_exactly_once_per_period(env: Env) -> None:
    led = env.ledger()
    b = Budget("key:soft", 100.0, "daily", soft_limit_usd=1.0)
    day1, day2 = ts("2025-01-10T09:00:00"), ts("2025-01-11T09:00:00")
    for i in range(30):  # settled concurrently: 30 x $0.10 cross $1.00 once
        assert (await led.reserve([b], f"d1-{i}", 0.2, now=day1)).ok
    results = await asyncio.gather(*(led.settle(f"d1-{i}", 0.1) for i in range(30)))
    assert sum(1 for r in results if r.soft_limits_crossed) == 1
    assert [r.soft_limits_crossed for r in results if r.soft_limits_crossed] == [(b,)]
    assert (await led.status(b, now=day1))["spent"] == pytest.approx(3.0)
    # a new day starts from zero and alerts again, once
    crossings = []
    for i in range(12):
        assert (await led.reserve([b], f"d2-{i}", 0.1, now=day2)).ok
        crossings.append((await led.settle(f"d2-{i}", 0.1)).soft_limits_crossed)
    assert crossings == [()] * 9 + [(b,)] + [()] * 2  # spend reaches $1.00 on the tenth settlement


async def test_hard_limit_crossing_is_reported_when_actual_exceeds_the_reservation(env: Env) -> None:
    led = env.ledger()
    b = Budget("key:over", 1.0, "total")
    assert (await led.reserve([b], "x", 0.5)).ok
    assert (await led.reserve([b], "y", 0.5)).ok
    assert (await led.settle("x", 0.6)).hard_limits_crossed == ()
    assert (await led.settle("y", 0.6)).hard_limits_crossed == (b,)  # the provider charged more than held
    s = await led.status(b)
    assert (s["spent"], s["remaining"], s["period_start"], s["period_end"]) == (1.2, 0.0, None, None)


async def test_daily_budget_resets_at_the_next_utc_midnight(env: Env) -> None:
    led = env.ledger()
    b = Budget("user:u1", 1.0, "daily")
    late = ts("2025-01-31T23:59:00")
    assert (await led.reserve([b], "late", 1.0, now=late)).ok
    assert (await led.settle("late", 1.0)).settled
    r = await led.reserve([b], "later", 0.01, now=late + 30)
    assert not r.ok and r.retry_after_s == pytest.approx(30)
    assert (await led.reserve([b], "next-day", 0.01, now=ts("2025-02-01T00:00:00"))).ok
    s1, s2 = await led.status(b, now=late), await led.status(b, now=ts("2025-02-01T00:30:00"))
    assert (s1["spent"], s1["period_end"]) == (1.0, "2025-02-01T00:00:00Z")
    assert (s2["spent"], s2["reserved"], s2["period_start"]) == (0.0, 0.01, "2025-02-01T00:00:00Z")
    # a request reserved before midnight and settled after it is charged to the day it started in
    assert (await led.reserve([b], "straddle", 0.5, now=ts("2025-02-01T23:59:59"))).ok
    assert (await led.settle("straddle", 0.5)).settled
    assert (await led.status(b, now=ts("2025-02-01T23:59:59")))["spent"] == 0.5
    assert (await led.status(b, now=ts("2025-02-02T00:00:01")))["spent"] == 0.0


def test_period_bounds_are_utc_calendar_periods() -> None:
    fri = ts("2025-01-31T15:30:00")  # a Friday
    assert period_bounds("daily", fri) == (
        datetime(2025, 1, 31, tzinfo=UTC),
        datetime(2025, 2, 1, tzinfo=UTC),
    )
    assert period_bounds("weekly", fri) == (
        datetime(2025, 1, 27, tzinfo=UTC),
        datetime(2025, 2, 3, tzinfo=UTC),
    )
    assert period_bounds("monthly", fri) == (
        datetime(2025, 1, 1, tzinfo=UTC),
        datetime(2025, 2, 1, tzinfo=UTC),
    )
    dec = ts("2024-12-31T23:59:59")
    assert period_bounds("monthly", dec) == (
        datetime(2024, 12, 1, tzinfo=UTC),
        datetime(2025, 1, 1, tzinfo=UTC),
    )
    assert period_bounds("total", fri) == (None, None)
    with pytest.raises(ValueError, match="period"):
        Budget("key:x", 1.0, "hourly")
    with pytest.raises(ValueError):
        Budget("key:x", -1.0)
    with pytest.raises(ValueError):
        Limit("key:x", rpm=-1)


async def test_weekly_budget_resets_on_monday(env: Env) -> None:
    led = env.ledger()
    b = Budget("team:w", 2.0, "weekly")
    sunday, monday = ts("2025-02-02T23:00:00"), ts("2025-02-03T00:00:00")
    assert (await led.reserve([b], "w1", 2.0, now=sunday)).ok
    r = await led.reserve([b], "w2", 1.0, now=sunday)
    assert not r.ok and r.retry_after_s == pytest.approx(3600)
    assert (await led.reserve([b], "w3", 2.0, now=monday)).ok


async def test_a_crashed_replicas_reservation_stops_holding_budget(env: Env) -> None:
    led = env.ledger(reservation_ttl_s=60)
    b = Budget("key:crash", 1.0, "total")
    assert (await led.reserve([b], "orphan", 0.9, now=T0)).ok  # its replica dies: never settled
    assert not (await led.reserve([b], "n1", 0.5, now=T0 + 30)).ok
    assert (await led.reserve([b], "n2", 0.5, now=T0 + 61)).ok  # the hold expired
    assert (await led.status(b, now=T0 + 61))["reserved"] == 0.5
    # the real clock too: a reservation record outlives nothing past its TTL
    quick = env.ledger(reservation_ttl_s=0.2)
    qb = Budget("key:quick", 1.0, "total")
    assert (await quick.reserve([qb], "q", 0.9)).ok
    await asyncio.sleep(0.3)
    assert (await quick.status(qb))["reserved"] == 0.0
    assert not (await quick.settle("q", 0.5)).settled
    assert (await quick.reserve([qb], "q2", 1.0)).ok


async def test_max_calls_caps_an_agent_run(env: Env) -> None:
    led = env.ledger()
    run = Budget("run:r42", 5.0, "total", max_calls=3)
    for i in range(3):
        assert (await led.reserve([run], f"call-{i}", 0.01)).ok
    assert await led.release("call-2")  # a failed call still used one of the run's calls
    r = await led.reserve([run], "call-3", 0.01)
    assert not r.ok and r.reason == "max_calls" and r.budget == run and r.retry_after_s is None
    with pytest.raises(RateLimited) as exc:
        r.raise_if_denied()
    assert exc.value.code == "budget_exceeded" and exc.value.headers == {}
    assert "cap of 3 calls" in exc.value.message
    s = await led.status(run)
    assert (s["calls"], s["max_calls"], s["reserved"]) == (3, 3, 0.02)
    zero = Budget("run:none", 5.0, "total", max_calls=0)
    assert not (await led.reserve([zero], "z", 0.0)).ok


async def test_amounts_are_exact_micro_dollars(env: Env) -> None:
    led = env.ledger()
    b = Budget("key:micro", 10.0, "total")
    for i in range(1000):
        assert (await led.reserve([b], f"m{i}", 0.001)).ok
        await led.settle(f"m{i}", 0.001)
    assert (await led.status(b))[
        "spent"
    ] == 1.0  # summing 0.001 a thousand times in floats gives 1.0000000000000007


async def test_concurrent_reservations_never_overspend_in_one_process(env: Env) -> None:
    led = env.ledger()
    budget = Budget("team:race", 1.0, "daily")
    stats = await _spend_against(led, budget, random.Random(1), tasks=40, duration=1.0, t0=time.time())
    s = await led.status(budget)
    assert s["spent"] == stats["settled_micros"] / 1_000_000 <= 1.0
    assert s["reserved"] == 0.0


async def _spend_against(
    led: MemoryBudgetLedger | RedisBudgetLedger,
    budget: Budget,
    rng: random.Random,
    *,
    tasks: int,
    duration: float,
    t0: float,
    tag: str = "",
) -> dict[str, int]:
    """Many tasks reserve up to $0.02, wait, then settle at most the reservation (or release)."""
    stats = {"settled_micros": 0, "reserved": 0, "refused": 0, "released": 0}

    async def client(i: int) -> None:
        n = 0
        while time.time() < t0 + duration:
            n += 1
            rid = f"{tag}{i}-{n}"
            amount = rng.uniform(0.001, 0.02)
            if not (await led.reserve([budget], rid, amount)).ok:
                stats["refused"] += 1
                await asyncio.sleep(0.001)
                continue
            stats["reserved"] += 1
            await asyncio.sleep(rng.uniform(0, 0.005))
            if rng.random() < 0.1:
                assert await led.release(rid)
                stats["released"] += 1
            else:
                actual = amount if rng.random() < 0.2 else amount * rng.uniform(0.5, 1.0)
                assert (await led.settle(rid, actual)).settled
                stats["settled_micros"] += round(actual * 1_000_000)

    await asyncio.gather(*(client(i) for i in range(tasks)))
    return stats


async def _overspend(
    *, url: str, prefix: str, seed: int, tasks: int, duration: float, **sync: Any
) -> dict[str, int]:
    ledger = RedisBudgetLedger(url, prefix=prefix)
    await asyncio.gather(*(ledger.redis.ping() for _ in range(tasks)))
    t0 = await _start_together(**sync)
    budget = Budget("team:shared", 1.0, "daily")
    rng = random.Random(seed)
    stats = await _spend_against(ledger, budget, rng, tasks=tasks, duration=duration, t0=t0, tag=f"p{seed}-")
    await ledger.close()
    return stats


@pytest.mark.parametrize("backend", REDIS_ONLY)
async def test_two_processes_reserving_concurrently_never_overspend(backend: str, redis_url: str) -> None:
    prefix = f"keel:test:limits:{uuid.uuid4().hex[:12]}:"
    kws = [{"url": redis_url, "prefix": prefix, "seed": s, "tasks": 32, "duration": 2.0} for s in (1, 2)]
    ledger = RedisBudgetLedger(redis_url, prefix=prefix)
    try:
        results = await asyncio.to_thread(_run_processes, "_overspend", kws)
        status = await ledger.status(Budget("team:shared", 1.0, "daily"))
    finally:
        await ledger.close()
        await _delete_prefix(redis_url, prefix)
    settled = sum(r["settled_micros"] for r in results) / 1_000_000
    print(
        f"\noverspend, 2 processes x 32 tasks against a $1.00 budget: settled ${status['spent']:.6f} "
        f"({1.0 - status['spent']:.6f} below the limit), {sum(r['reserved'] for r in results)} reservations, "
        f"{sum(r['refused'] for r in results)} refused, {sum(r['released'] for r in results)} released"
    )
    assert all(r["reserved"] for r in results)
    assert status["spent"] == settled  # every settled micro-dollar counted, once
    assert status["spent"] <= 1.0
    assert status["reserved"] == 0.0
