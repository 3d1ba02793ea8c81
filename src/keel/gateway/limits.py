"""Rate limits (requests and tokens per minute) and USD budgets that stay exact across replicas.

Rate limits: sliding window, never over
    Each scope's window (``window_s``, 60 s by default) is cut into ``slices`` equal slices (120:
    half a second each) and a counter is kept per slice. A request is admitted when the sum over
    the live slices — the current one and the ``slices`` before it — plus its cost fits the
    limit. The oldest live slice is counted in full rather than weighted by how much of it is
    still inside the window (the weighting in the classic two-window "sliding window counter"
    assumes that slice's traffic was spread evenly; after a burst from idle it admits up to
    nearly twice the limit within one window).
    Counting it in full means that any interval of ``window_s`` admits at most the limit, exactly
    and under any traffic pattern; what that costs is that each request holds its place for
    between ``window_s`` and ``window_s`` plus one slice, so a scope that is saturated
    without a break gets at least ``slices / (slices + 1)`` of the limit (> 99 %). A client
    hammering from idle gets exactly the limit in its first window. The per-slice counters also
    let a refusal say precisely when enough capacity frees up (``retry_after_s``).

    :class:`MemoryRateLimiter` keeps the windows in process memory. :class:`RedisRateLimiter`
    keeps each one in a Redis hash (slice → count, plus the running total) and checks every
    limit of a request and counts it in one Lua script call, timed by the Redis server's clock,
    so any number of replicas share one exact limit. A hash expires a window (and two slices)
    after its last write, when it would be empty anyway.

Budgets: reserve, then settle
    A request reserves an upper bound of its cost before it goes upstream; it is admitted only
    if ``spent + reserved + amount <= limit`` for every budget it draws on. When it ends, the
    reservation is replaced by the actual cost (:meth:`BudgetLedger.settle`) or dropped
    (:meth:`BudgetLedger.release`). As long as actual costs do not exceed what was reserved,
    concurrent requests on any number of replicas can never together spend past a hard limit.
    Amounts are integer micro-dollars, so sums do not drift. A budget's counters live under a
    key holding its UTC calendar period (``daily``, ``weekly`` from Monday, ``monthly``, or
    ``total``), so a new period starts from zero by itself. Reservations expire after
    ``reservation_ttl_s``, so those of a crashed replica stop holding budget. Settling or
    releasing twice changes nothing, and a soft limit is reported crossed by exactly one
    settlement per period.

The Redis scripts of :class:`RedisBudgetLedger` use keys that span scopes (settle and release
read the budget keys from the reservation), so they need a single Redis (or a primary with
replicas / Sentinel), not Redis Cluster.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson

from keel.errors import RateLimited

__all__ = [
    "PERIODS",
    "Budget",
    "BudgetLedger",
    "Decision",
    "Limit",
    "MemoryBudgetLedger",
    "MemoryRateLimiter",
    "RateLimiter",
    "RedisBudgetLedger",
    "RedisRateLimiter",
    "Reservation",
    "SettleResult",
    "check_limits",
    "period_bounds",
]

PERIODS = ("daily", "weekly", "monthly", "total")
_MICROS = 1_000_000  # micro-dollars per dollar
_SWEEP_EVERY_S = 30.0  # how often in-memory state is scanned for expired entries


# --------------------------------------------------------------------------- rate limits


@dataclass(frozen=True)
class Limit:
    """Requests (``rpm``) and/or tokens (``tpm``) per window for one scope, e.g. ``"key:abc"``.

    The window is the limiter's ``window_s`` (a minute unless configured otherwise).
    """

    scope: str
    rpm: int | None = None
    tpm: int | None = None

    def __post_init__(self) -> None:
        if not self.scope:
            raise ValueError("Limit.scope must not be empty")
        for name in ("rpm", "tpm"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"Limit.{name} must be a non-negative integer or None, not {v!r}")


def _scope_type(scope: str) -> str:
    return scope.split(":", 1)[0]


def _per_window(window_s: float) -> str:
    return "per minute" if window_s == 60 else f"per {window_s:g}s"


@dataclass(frozen=True)
class Decision:
    """The outcome of :meth:`RateLimiter.check`."""

    allowed: bool
    limit: Limit | None = None  # the limit that refused (the one that frees up last)
    kind: str | None = None  # "rpm" | "tpm"
    retry_after_s: float = 0.0
    at: float | None = None  # the clock reading the check was decided at (Redis: server time)
    too_large: bool = False  # the request alone exceeds the limit: no wait will let it through
    window_s: float = 60.0

    def raise_if_denied(self) -> None:
        """Raise :class:`~keel.errors.RateLimited` (429) naming the limit, if the check refused."""
        if self.allowed:
            return
        assert self.limit is not None and self.kind is not None
        stype = _scope_type(self.limit.scope)
        value = self.limit.rpm if self.kind == "rpm" else self.limit.tpm
        unit = "requests" if self.kind == "rpm" else "tokens"
        code = f"rate_limit_exceeded:{stype}:{self.kind}"
        if self.too_large:
            raise RateLimited(
                f"Request too large for the {stype} {self.kind} limit of {value} {unit} "
                f"{_per_window(self.window_s)}; reduce the prompt or max_tokens.",
                code=code,
            )
        after = max(1, math.ceil(self.retry_after_s))
        raise RateLimited(
            f"Rate limit reached for {stype}: {value} {unit} {_per_window(self.window_s)}. "
            f"Retry after {after}s.",
            code=code,
            headers={"retry-after": str(after)},
        )


class RateLimiter(Protocol):
    async def check(self, limits: Sequence[Limit], tokens: int, now: float | None = None) -> Decision:
        """Atomically: if every limit has room for one request and ``tokens`` tokens, count them
        all and admit; otherwise count nothing and say which limit refused and when to retry."""
        ...

    async def settle_tokens(
        self,
        limits: Sequence[Limit],
        estimated: int,
        actual: int,
        now: float | None = None,
        *,
        admitted_at: float | None = None,
    ) -> None:
        """Correct the token counts by ``actual - estimated`` once the real usage is known."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class _Entry:
    """One counter a check touches: a limit's rpm or tpm side."""

    limit: Limit
    kind: str
    key: str
    cap: int
    cost: int


class _LimiterBase:
    def __init__(self, window_s: float, slices: int, prefix: str) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        if slices < 1:
            raise ValueError("slices must be at least 1")
        self.window_s = float(window_s)
        self.slices = int(slices)
        self.slice_s = self.window_s / self.slices
        self.prefix = prefix
        # the window geometry is part of the key: replicas configured differently never share counters
        self._geometry_tag = f":{round(self.window_s * 1000)}:{self.slices}:"

    def _key(self, kind: str, scope: str) -> str:
        return self.prefix + kind + self._geometry_tag + scope

    def _entries(self, limits: Sequence[Limit], tokens: int) -> list[_Entry]:
        if tokens < 0:
            raise ValueError("tokens must be non-negative")
        seen: dict[str, int] = {}
        out: list[_Entry] = []
        for lim in limits:
            for kind, cap, cost in (("rpm", lim.rpm, 1), ("tpm", lim.tpm, tokens)):
                if cap is None:
                    continue
                key = self._key(kind, lim.scope)
                i = seen.get(key)
                if i is None:
                    seen[key] = len(out)
                    out.append(_Entry(lim, kind, key, cap, cost))
                elif cap < out[i].cap:  # the same counter listed twice: count once, keep the stricter cap
                    out[i] = _Entry(lim, kind, key, cap, cost)
        return out

    def _tpm_keys(self, limits: Sequence[Limit]) -> list[str]:
        return list(dict.fromkeys(self._key("tpm", lim.scope) for lim in limits if lim.tpm is not None))

    def _refusal(self, entry: _Entry, wait: float, at: float) -> Decision:
        if wait < 0:
            return Decision(False, entry.limit, entry.kind, 0.0, at, too_large=True, window_s=self.window_s)
        return Decision(False, entry.limit, entry.kind, wait, at, window_s=self.window_s)


class _Window:
    """One scope's sliding window in memory: the same algorithm as the Redis script, line for line."""

    __slots__ = ("counts", "head", "total", "touched")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.head: int | None = None  # newest slice seen: counts never go into an older one
        self.total = 0
        self.touched = 0.0

    def advance(self, cur: int, n: int) -> int:
        """Drop the slices that have left the window; return the slice new counts go to."""
        head = self.head
        if head is None:
            self.head = cur
            return cur
        if cur <= head:  # the clock stepped back: keep counting into the newest slice
            return head
        if cur - head > n:
            self.counts.clear()
            self.total = 0
        else:
            for b in range(head - n, cur - n):
                v = self.counts.pop(b, None)
                if v:
                    self.total -= v
        self.head = cur
        return cur

    def wait(self, cur: int, n: int, g: float, now: float, cost: int, cap: int) -> float:
        """Seconds until enough slices expire for ``cost`` to fit; -1 when it never can."""
        if cost > cap:
            return -1.0
        freed = 0
        for b in range(cur - n, cur + 1):
            freed += self.counts.get(b, 0)
            if self.total - freed + cost <= cap:
                return (b + n + 1) * g - now
        return (cur + n + 1) * g - now  # not reached: the counts sum to the total

    def add(self, cur: int, amount: int) -> None:
        self.counts[cur] = self.counts.get(cur, 0) + amount
        self.total += amount

    def refund(self, start: int, cur: int, n: int, amount: int) -> None:
        """Take ``amount`` back from slice ``start`` and older ones, never below zero.

        Taking from the slice the estimate was counted in (or older ones, which expire sooner)
        never frees more than the estimate would have freed itself: over-refunding would let
        other requests' tokens expire early.
        """
        b = min(start, cur)
        while amount > 0 and b >= cur - n:
            v = self.counts.get(b, 0)
            if v > 0:
                take = min(v, amount)
                if take == v:
                    del self.counts[b]
                else:
                    self.counts[b] = v - take
                self.total -= take
                amount -= take
            b -= 1


class MemoryRateLimiter(_LimiterBase):
    """Rate limits in this process's memory (a single replica, or tests).

    Safe under asyncio: a check runs start to finish without awaiting, so it is atomic with
    respect to every other task on the event loop. ``now`` defaults to ``time.time()``.
    """

    def __init__(self, *, window_s: float = 60.0, slices: int = 120, prefix: str = "") -> None:
        super().__init__(window_s, slices, prefix)
        self._windows: dict[str, _Window] = {}
        self._next_sweep = time.monotonic() + _SWEEP_EVERY_S

    def _window(self, key: str, mono: float) -> _Window:
        w = self._windows.get(key)
        if w is None:
            w = self._windows[key] = _Window()
        w.touched = mono
        return w

    def _sweep(self, mono: float) -> None:
        # like the Redis keys' TTL: a window untouched for a window and two slices is empty anyway
        if mono < self._next_sweep:
            return
        self._next_sweep = mono + _SWEEP_EVERY_S
        idle = self.window_s + 2 * self.slice_s
        for key in [k for k, w in self._windows.items() if mono - w.touched > idle]:
            del self._windows[key]

    async def check(self, limits: Sequence[Limit], tokens: int, now: float | None = None) -> Decision:
        now = time.time() if now is None else now
        mono = time.monotonic()
        self._sweep(mono)
        entries = self._entries(limits, tokens)
        n, g = self.slices, self.slice_s
        cur = math.floor(now / g)
        slots: list[tuple[_Window, int]] = []
        worst: tuple[_Entry, float] | None = None
        for e in entries:
            w = self._window(e.key, mono)
            s = w.advance(cur, n)
            slots.append((w, s))
            if w.total + e.cost > e.cap:
                wait = w.wait(s, n, g, now, e.cost, e.cap)
                if worst is None or _worse(wait, worst[1]):
                    worst = (e, wait)
        if worst is not None:
            return self._refusal(worst[0], worst[1], now)
        for e, (w, s) in zip(entries, slots, strict=True):
            if e.cost:
                w.add(s, e.cost)
        return Decision(True, at=now, window_s=self.window_s)

    async def settle_tokens(
        self,
        limits: Sequence[Limit],
        estimated: int,
        actual: int,
        now: float | None = None,
        *,
        admitted_at: float | None = None,
    ) -> None:
        """Correct TPM counts by ``actual - estimated``.

        A positive difference is counted now. A negative one is taken back from the slice the
        request was admitted in — pass ``admitted_at=decision.at`` — and, without it, from the
        newest slices (which may free capacity a little early); once that slice has left the
        window there is nothing left to take back.
        """
        delta = actual - estimated
        if delta == 0:
            return
        now = time.time() if now is None else now
        mono = time.monotonic()
        n, g = self.slices, self.slice_s
        cur = math.floor(now / g)
        for key in self._tpm_keys(limits):
            w = self._window(key, mono)
            s = w.advance(cur, n)
            if delta > 0:
                w.add(s, delta)
            elif w.total > 0:
                start = s if admitted_at is None else math.floor(admitted_at / g)
                w.refund(start, s, n, -delta)

    async def close(self) -> None:
        self._windows.clear()


def _worse(wait: float, than: float) -> bool:
    """Whether refusal ``wait`` outlasts ``than`` (-1, never fits, outlasts everything)."""
    if than < 0:
        return False
    return wait < 0 or wait > than


# Shared by both rate-limit scripts. ARGV[1] slice length (s), ARGV[2] slices per window, ARGV[3]
# the time ('' → the server's clock, so replicas with skewed clocks still share one timeline).
_RL_PRELUDE = """
local g = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local cur = math.floor(now / g)
local ttl = math.ceil((n + 2) * g * 1000 - 0.001)  -- ms; the 0.001 absorbs float noise

-- Drop the slices that left window k since it was last touched (the loop runs once per slice
-- boundary crossed, so the cost is amortised O(1)); return its total and the slice to count into,
-- never older than the newest slice seen, so a clock stepping back cannot revive expired slices.
local function advance(k)
  local hs = redis.call('HMGET', k, 'h', 's')
  local head = tonumber(hs[1])
  if not head then return 0, cur end
  if cur <= head then return tonumber(hs[2]) or 0, head end
  if cur - head > n then
    redis.call('DEL', k)
    return 0, cur
  end
  local total = tonumber(hs[2]) or 0
  for b = head - n, cur - n - 1 do
    local v = tonumber(redis.call('HGET', k, b))
    if v then
      total = total - v
      redis.call('HDEL', k, b)
    end
  end
  redis.call('HSET', k, 'h', cur, 's', total)
  return total, cur
end
"""

# KEYS: one window per counter. ARGV[3 + 2i - 1], ARGV[3 + 2i]: counter i's cap and cost.
# Returns {1, 0, now} when admitted (every counter incremented), else {0, i, now, wait} for the
# refusal that lasts longest (wait -1: the cost exceeds the cap) and nothing incremented. Floats go
# back as strings (a Lua number reply would be truncated to an integer).
_RL_CHECK = (
    _RL_PRELUDE
    + """
local slices = {}
local worst, worst_wait = 0, 0
for i = 1, #KEYS do
  local k = KEYS[i]
  local cap, cost = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local total, s = advance(k)
  slices[i] = s
  if total + cost > cap then
    local wait = -1
    if cost <= cap then
      -- free the live slices oldest first until the cost fits: that slice's expiry is the wait
      local flat, live, count = redis.call('HGETALL', k), {}, {}
      for j = 1, #flat, 2 do
        local b = tonumber(flat[j])  -- nil for the 'h' and 's' fields
        if b then
          live[#live + 1] = b
          count[b] = tonumber(flat[j + 1])
        end
      end
      table.sort(live)
      local freed = 0
      for _, b in ipairs(live) do
        freed = freed + count[b]
        if total - freed + cost <= cap then
          wait = (b + n + 1) * g - now
          break
        end
      end
    end
    if worst == 0 or (worst_wait >= 0 and (wait < 0 or wait > worst_wait)) then
      worst, worst_wait = i, wait
    end
  end
end
if worst > 0 then
  return {0, worst, string.format('%.17g', now), string.format('%.17g', worst_wait)}
end
for i = 1, #KEYS do
  local cost = ARGV[3 + 2 * i]
  if cost ~= '0' then
    local k = KEYS[i]
    redis.call('HINCRBY', k, slices[i], cost)
    redis.call('HINCRBY', k, 's', cost)
    redis.call('HSET', k, 'h', slices[i])
    redis.call('PEXPIRE', k, ttl)
  end
end
return {1, 0, string.format('%.17g', now)}
"""
)

# KEYS: tpm windows. ARGV[4]: actual - estimated; ARGV[5]: the admission time ('' → unknown).
_RL_SETTLE = (
    _RL_PRELUDE
    + """
local delta = tonumber(ARGV[4])
local at = tonumber(ARGV[5])
for i = 1, #KEYS do
  local k = KEYS[i]
  local total, s = advance(k)
  if delta > 0 then
    redis.call('HINCRBY', k, s, delta)
    redis.call('HINCRBY', k, 's', delta)
    redis.call('HSET', k, 'h', s)
    redis.call('PEXPIRE', k, ttl)
  elseif delta < 0 and total > 0 then
    local b = s
    if at then b = math.min(s, math.floor(at / g)) end
    local need = -delta
    while need > 0 and b >= s - n do
      local v = tonumber(redis.call('HGET', k, b)) or 0
      if v > 0 then
        local take = math.min(v, need)
        if take == v then
          redis.call('HDEL', k, b)
        else
          redis.call('HINCRBY', k, b, -take)
        end
        redis.call('HINCRBY', k, 's', -take)
        need = need - take
      end
      b = b - 1
    end
  end
end
return 1
"""
)


class _Script:
    """A Lua script run by EVALSHA; when the server has not cached it (restart, SCRIPT FLUSH),
    one EVAL runs it and caches it again."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        from redis.exceptions import NoScriptError

        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await client.eval(self.source, len(keys), *keys, *args)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class _RedisOwner:
    """Holds a redis.asyncio client, creating (and later closing) it from a URL if not given one."""

    def __init__(self, redis: Any) -> None:
        if isinstance(redis, str):
            import redis.asyncio as aioredis

            self.redis: Any = aioredis.Redis.from_url(redis)
            self._owned = True
        else:
            self.redis = redis
            self._owned = False

    async def close(self) -> None:
        if self._owned:
            await self.redis.aclose()


class RedisRateLimiter(_LimiterBase, _RedisOwner):
    """Rate limits shared by every replica through Redis: one script call per check.

    ``redis`` is a URL or a ``redis.asyncio`` client. ``now`` is for tests; by default the
    Redis server's clock decides, so replicas' clock skew does not matter.
    """

    _check_script = _Script(_RL_CHECK)
    _settle_script = _Script(_RL_SETTLE)

    def __init__(
        self, redis: Any, *, prefix: str = "keel:rl:", window_s: float = 60.0, slices: int = 120
    ) -> None:
        _LimiterBase.__init__(self, window_s, slices, prefix)
        _RedisOwner.__init__(self, redis)
        self._geometry = [repr(self.slice_s), str(self.slices)]

    async def check(self, limits: Sequence[Limit], tokens: int, now: float | None = None) -> Decision:
        entries = self._entries(limits, tokens)
        if not entries:
            return Decision(True, at=time.time() if now is None else now, window_s=self.window_s)
        args: list[Any] = [*self._geometry, "" if now is None else repr(now)]
        for e in entries:
            args += [e.cap, e.cost]
        res = await self._check_script(self.redis, [e.key for e in entries], args)
        at = float(_text(res[2]))
        if int(res[0]):
            return Decision(True, at=at, window_s=self.window_s)
        return self._refusal(entries[int(res[1]) - 1], float(_text(res[3])), at)

    async def settle_tokens(
        self,
        limits: Sequence[Limit],
        estimated: int,
        actual: int,
        now: float | None = None,
        *,
        admitted_at: float | None = None,
    ) -> None:
        """Correct TPM counts by ``actual - estimated``; see :meth:`MemoryRateLimiter.settle_tokens`."""
        delta = actual - estimated
        keys = self._tpm_keys(limits)
        if delta == 0 or not keys:
            return
        args = [
            *self._geometry,
            "" if now is None else repr(now),
            delta,
            "" if admitted_at is None else repr(admitted_at),
        ]
        await self._settle_script(self.redis, keys, args)


# --------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Budget:
    """A USD budget for one scope over a UTC calendar period.

    ``limit_usd`` is hard (``math.inf``: none); crossing ``soft_limit_usd`` is reported once per
    period by :meth:`BudgetLedger.settle`. ``max_calls`` caps the number of reservations in the
    period (e.g. an agent run's model calls); released calls still count.
    """

    scope: str
    limit_usd: float
    period: str = "monthly"
    soft_limit_usd: float | None = None
    max_calls: int | None = None

    def __post_init__(self) -> None:
        if not self.scope:
            raise ValueError("Budget.scope must not be empty")
        if self.period not in PERIODS:
            raise ValueError(f"Budget.period must be one of {', '.join(PERIODS)}, not {self.period!r}")
        if math.isnan(self.limit_usd) or self.limit_usd < 0:
            raise ValueError("Budget.limit_usd must be >= 0")
        if self.soft_limit_usd is not None and not 0 <= self.soft_limit_usd < math.inf:
            raise ValueError("Budget.soft_limit_usd must be a finite amount >= 0")
        if self.max_calls is not None and self.max_calls < 0:
            raise ValueError("Budget.max_calls must be >= 0")


def period_bounds(period: str, now: float) -> tuple[datetime | None, datetime | None]:
    """The UTC start and end of the ``period`` containing ``now`` (``None, None`` for ``total``)."""
    if period == "total":
        return None, None
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        return day, day + timedelta(days=1)
    if period == "weekly":
        start = day - timedelta(days=day.weekday())  # ISO weeks start on Monday
        return start, start + timedelta(days=7)
    if period == "monthly":
        start = day.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        return start, end
    raise ValueError(f"unknown budget period {period!r}")


def _micros(usd: float) -> int:
    return round(usd * _MICROS)


def _cap_micros(usd: float) -> int:
    return -1 if usd == math.inf else _micros(usd)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class Reservation:
    """The outcome of :meth:`BudgetLedger.reserve`."""

    ok: bool
    request_id: str
    amount_usd: float
    budget: Budget | None = None  # the budget that refused
    reason: str | None = None  # "limit" | "max_calls"
    spent_usd: float = 0.0  # of the refusing budget, this period
    reserved_usd: float = 0.0
    retry_after_s: float | None = None  # until the refusing budget's period ends; None for "total"

    def raise_if_denied(self) -> None:
        """Raise :class:`~keel.errors.RateLimited` (429, ``budget_exceeded``) if refused."""
        if self.ok:
            return
        b = self.budget
        assert b is not None
        stype = _scope_type(b.scope)
        what = "total" if b.period == "total" else b.period
        if self.reason == "max_calls":
            msg = f"Budget exceeded: the {stype} {what} cap of {b.max_calls} calls is used up."
        else:
            msg = f"Budget exceeded: the {stype} {what} budget of ${b.limit_usd:.2f} is used up."
        headers = {}
        if self.retry_after_s is not None:
            headers["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
        raise RateLimited(msg, code="budget_exceeded", headers=headers)


@dataclass(frozen=True)
class SettleResult:
    """The outcome of :meth:`BudgetLedger.settle`."""

    settled: bool  # False: unknown, expired or already settled/released request id; nothing changed
    soft_limits_crossed: tuple[Budget, ...] = ()  # crossed by this settlement (alert once)
    hard_limits_crossed: tuple[Budget, ...] = ()  # only when an actual cost exceeded its reservation


class BudgetLedger(Protocol):
    async def reserve(
        self, budgets: Sequence[Budget], request_id: str, amount_usd: float, now: float | None = None
    ) -> Reservation:
        """Atomically across ``budgets``: hold ``amount_usd`` on each if every hard limit (and call
        cap) allows it, else hold nothing and name the budget that refused."""
        ...

    async def settle(self, request_id: str, actual_usd: float) -> SettleResult:
        """Replace the reservation by the actual cost; a second settle changes nothing.

        The reservation must still exist: a request outliving ``reservation_ttl_s`` is not charged.
        """
        ...

    async def release(self, request_id: str) -> bool:
        """Drop the reservation (failure, disconnect); True if there was one to drop."""
        ...

    async def status(self, budget: Budget, now: float | None = None) -> dict[str, Any]:
        """Spent, reserved and remaining USD for the budget's current period, and its bounds."""
        ...

    async def close(self) -> None: ...


class _LedgerBase:
    def __init__(
        self,
        prefix: str,
        reservation_ttl_s: float,
        tombstone_ttl_s: float,
        retention_s: float,
        total_ttl_s: float | None,
    ) -> None:
        if reservation_ttl_s <= 0 or tombstone_ttl_s <= 0:
            raise ValueError("reservation_ttl_s and tombstone_ttl_s must be positive")
        self.prefix = prefix
        self.reservation_ttl_s = reservation_ttl_s
        self.tombstone_ttl_s = tombstone_ttl_s
        self.retention_s = retention_s
        self.total_ttl_s = total_ttl_s

    def _place(self, b: Budget, now: float) -> tuple[str, datetime | None, datetime | None, float | None]:
        """The budget's counter key for the period containing ``now``, its bounds, and how long to keep it."""
        start, end = period_bounds(b.period, now)
        tag = "all" if start is None else start.strftime("%Y-%m-%d")
        keep = self.total_ttl_s if end is None else end.timestamp() - now + self.retention_s
        return f"{b.period}:{tag}:{b.scope}", start, end, keep

    @staticmethod
    def _unique(budgets: Sequence[Budget]) -> list[Budget]:
        # the same (scope, period) listed twice is one counter: count it once (the first wins)
        seen: dict[tuple[str, str], Budget] = {}
        for b in budgets:
            seen.setdefault((b.scope, b.period), b)
        return list(seen.values())

    @staticmethod
    def _check_amount(amount_usd: float) -> None:
        if not 0 <= amount_usd < math.inf:
            raise ValueError(f"amount must be a finite USD amount >= 0, not {amount_usd!r}")

    @staticmethod
    def _status(
        b: Budget, start: datetime | None, end: datetime | None, spent: int, reserved: int, calls: int
    ) -> dict[str, Any]:
        limit = b.limit_usd
        return {
            "scope": b.scope,
            "period": b.period,
            "period_start": _iso(start),
            "period_end": _iso(end),
            "limit": limit,
            "soft_limit": b.soft_limit_usd,
            "spent": spent / _MICROS,
            "reserved": reserved / _MICROS,
            "remaining": limit if limit == math.inf else max(0, _micros(limit) - spent - reserved) / _MICROS,
            "calls": calls,
            "max_calls": b.max_calls,
        }

    def _refused(
        self, b: Budget, rid: str, amount: float, reason: str, spent: int, reserved: int, now: float
    ) -> Reservation:
        _, end = period_bounds(b.period, now)
        return Reservation(
            False,
            rid,
            amount,
            budget=b,
            reason=reason,
            spent_usd=spent / _MICROS,
            reserved_usd=reserved / _MICROS,
            retry_after_s=None if end is None else end.timestamp() - now,
        )


@dataclass
class _Counter:
    """One budget's period in memory."""

    spent: int = 0
    reserved: int = 0
    calls: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # request id → (amount, deadline)
    deadlines: list[tuple[float, str]] = field(default_factory=list)  # heap of the same
    expires: float | None = None  # monotonic

    def purge(self, now: float) -> None:
        """Drop holds past their deadline (a crashed or very slow request's)."""
        while self.deadlines and self.deadlines[0][0] <= now:
            deadline, rid = heapq.heappop(self.deadlines)
            hold = self.holds.get(rid)
            if hold is not None and hold[1] == deadline:
                del self.holds[rid]
                self.reserved -= hold[0]


@dataclass
class _Held:
    """A reservation in memory (or its tombstone once settled or released)."""

    state: str
    expires: float  # monotonic
    amount: int = 0
    places: list[tuple[str, Budget, float | None]] = field(default_factory=list)  # key, budget, keep_s


class MemoryBudgetLedger(_LedgerBase):
    """Budgets in this process's memory; atomic under asyncio (no awaits inside an operation).

    Mirrors :class:`RedisBudgetLedger`, expiries included: reservations hold budget for
    ``reservation_ttl_s``; finished ones are remembered for ``tombstone_ttl_s``, so that a late
    retry of their reserve is refused instead of holding budget again.
    """

    def __init__(
        self,
        *,
        reservation_ttl_s: float = 3600.0,
        tombstone_ttl_s: float = 3600.0,
        retention_s: float = 7 * 86400.0,
        total_ttl_s: float | None = None,
    ) -> None:
        super().__init__("", reservation_ttl_s, tombstone_ttl_s, retention_s, total_ttl_s)
        self._counters: dict[str, _Counter] = {}
        self._held: dict[str, _Held] = {}
        self._next_sweep = time.monotonic() + _SWEEP_EVERY_S

    def _sweep(self, mono: float) -> None:
        if mono < self._next_sweep:
            return
        self._next_sweep = mono + _SWEEP_EVERY_S
        for k in [k for k, c in self._counters.items() if c.expires is not None and c.expires <= mono]:
            del self._counters[k]
        for k in [k for k, h in self._held.items() if h.expires <= mono]:
            del self._held[k]

    def _counter(self, key: str, mono: float, keep: float | None, create: bool = True) -> _Counter | None:
        c = self._counters.get(key)
        if c is not None and c.expires is not None and c.expires <= mono:
            del self._counters[key]
            c = None
        if c is None and create:
            c = self._counters[key] = _Counter()
        if c is not None and keep is not None:
            c.expires = mono + keep
        return c

    def _record(self, rid: str, mono: float) -> _Held | None:
        h = self._held.get(rid)
        if h is not None and h.expires <= mono:
            del self._held[rid]
            return None
        return h

    async def reserve(
        self, budgets: Sequence[Budget], request_id: str, amount_usd: float, now: float | None = None
    ) -> Reservation:
        self._check_amount(amount_usd)
        now = time.time() if now is None else now
        mono = time.monotonic()
        self._sweep(mono)
        held = self._record(request_id, mono)
        if held is not None:
            if held.state == "reserved":
                return Reservation(True, request_id, amount_usd)  # a retried reserve: already held
            raise ValueError(f"request id {request_id!r} was already {held.state}")
        amount = _micros(amount_usd)
        places = []
        counters = []
        for b in self._unique(budgets):
            key, _, _, keep = self._place(b, now)
            c = self._counter(key, mono, keep)
            assert c is not None
            c.purge(now)
            cap = _cap_micros(b.limit_usd)
            if cap >= 0 and c.spent + c.reserved + amount > cap:
                return self._refused(b, request_id, amount_usd, "limit", c.spent, c.reserved, now)
            if b.max_calls is not None and c.calls >= b.max_calls:
                return self._refused(b, request_id, amount_usd, "max_calls", c.spent, c.reserved, now)
            places.append((key, b, keep))
            counters.append(c)
        deadline = now + self.reservation_ttl_s
        for c in counters:
            c.reserved += amount
            c.calls += 1
            c.holds[request_id] = (amount, deadline)
            heapq.heappush(c.deadlines, (deadline, request_id))
        self._held[request_id] = _Held("reserved", mono + self.reservation_ttl_s, amount, places)
        return Reservation(True, request_id, amount_usd)

    def _finish(self, request_id: str, state: str, actual: int | None) -> SettleResult:
        mono = time.monotonic()
        held = self._record(request_id, mono)
        if held is None or held.state != "reserved":
            return SettleResult(False)
        soft: list[Budget] = []
        hard: list[Budget] = []
        for key, b, keep in held.places:
            c = self._counter(key, mono, None, create=actual is not None)
            if c is None:
                continue
            hold = c.holds.pop(request_id, None)
            if hold is not None:
                c.reserved -= hold[0]
            if actual is not None:
                before = c.spent
                c.spent += actual
                if c.expires is None and keep is not None:
                    c.expires = mono + keep
                _crossings(b, before, c.spent, soft, hard)
        self._held[request_id] = _Held(state, mono + self.tombstone_ttl_s)
        return SettleResult(True, tuple(soft), tuple(hard))

    async def settle(self, request_id: str, actual_usd: float) -> SettleResult:
        self._check_amount(actual_usd)
        return self._finish(request_id, "settled", _micros(actual_usd))

    async def release(self, request_id: str) -> bool:
        return self._finish(request_id, "released", None).settled

    async def status(self, budget: Budget, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        key, start, end, _ = self._place(budget, now)
        c = self._counter(key, time.monotonic(), None, create=False)
        if c is None:
            return self._status(budget, start, end, 0, 0, 0)
        c.purge(now)
        return self._status(budget, start, end, c.spent, c.reserved, c.calls)

    async def close(self) -> None:
        self._counters.clear()
        self._held.clear()


def _crossings(b: Budget, before: int, after: int, soft: list[Budget], hard: list[Budget]) -> None:
    """Note the limits that the move of spend from ``before`` to ``after`` crossed."""
    if b.soft_limit_usd is not None:
        s = _micros(b.soft_limit_usd)
        if s > 0 and before < s <= after:
            soft.append(b)
    cap = _cap_micros(b.limit_usd)
    if cap >= 0 and before <= cap < after:
        hard.append(b)


# Drop the holds of budget b (with deadline zset z) that expired by ARGV time `now`; bounded per call.
_BUDGET_PRELUDE = """
local function purge(b, z, now)
  local gone = redis.call('ZRANGEBYSCORE', z, '-inf', now, 'LIMIT', 0, 256)
  for _, id in ipairs(gone) do
    local f = 'r:' .. id
    local v = redis.call('HGET', b, f)
    if v then
      if v ~= '0' then redis.call('HINCRBY', b, 'reserved', '-' .. v) end
      redis.call('HDEL', b, f)
    end
    redis.call('ZREM', z, id)
  end
end
"""

# KEYS[1] the reservation; KEYS[2i], KEYS[2i+1] budget i's counter hash and hold-deadline zset.
# ARGV: request id, amount (µ$), now (ms), hold ttl (ms), the reservation's JSON, then per budget
# cap (µ$, -1 none), max calls (-1 none), key ttl (ms, -1 none).
# Returns {1} reserved, {2} already reserved (a retry), {-1, state} finished, {0, i, reason, spent, reserved}.
_BUDGET_RESERVE = (
    _BUDGET_PRELUDE
    + """
local rec, rid, amount, now, hold = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local state = redis.call('HGET', rec, 'state')
if state == 'reserved' then return {2} end
if state then return {-1, state} end
local nb = (#KEYS - 1) / 2
for i = 1, nb do
  local b, z = KEYS[2 * i], KEYS[2 * i + 1]
  purge(b, z, now)
  local v = redis.call('HMGET', b, 'spent', 'reserved', 'calls')
  local spent, reserved, calls = tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0
  local cap, maxc = tonumber(ARGV[3 + 3 * i]), tonumber(ARGV[4 + 3 * i])
  if cap >= 0 and spent + reserved + amount > cap then return {0, i, 'limit', spent, reserved} end
  if maxc >= 0 and calls >= maxc then return {0, i, 'max_calls', spent, reserved} end
end
local field, deadline = 'r:' .. rid, tonumber(now) + hold
for i = 1, nb do
  local b, z, ttl = KEYS[2 * i], KEYS[2 * i + 1], tonumber(ARGV[5 + 3 * i])
  redis.call('HINCRBY', b, 'reserved', ARGV[2])
  redis.call('HINCRBY', b, 'calls', 1)
  redis.call('HSET', b, field, ARGV[2])
  redis.call('ZADD', z, deadline, rid)
  if ttl >= 0 then
    redis.call('PEXPIRE', b, ttl)
    redis.call('PEXPIRE', z, ttl)
  end
end
redis.call('HSET', rec, 'state', 'reserved', 'rid', rid, 'rec', ARGV[5])
redis.call('PEXPIRE', rec, ARGV[4])
return {1}
"""
)

# KEYS[1] the reservation. ARGV[1] the actual cost (µ$; '' to release), ARGV[2] tombstone ttl (ms).
# The reservation records its budgets' keys: {"k": [[hash, zset, cap, soft, ttl], ...], "m": [...]}.
# Returns {0, state} when there is nothing to do, else {1, reservation JSON, soft crossed, hard crossed}.
_BUDGET_FINISH = """
local rec = KEYS[1]
local r = redis.call('HMGET', rec, 'state', 'rid', 'rec')
if not r[1] then return {0, 'unknown'} end
if r[1] ~= 'reserved' then return {0, r[1]} end
local rid, info, actual = r[2], cjson.decode(r[3]), ARGV[1]
local field = 'r:' .. rid
local soft, hard = {}, {}
for i, e in ipairs(info['k']) do
  local b, z, cap, sl, ttl = e[1], e[2], e[3], e[4], e[5]
  local v = redis.call('HGET', b, field)
  if v then
    if v ~= '0' then redis.call('HINCRBY', b, 'reserved', '-' .. v) end
    redis.call('HDEL', b, field)
    redis.call('ZREM', z, rid)
  end
  if actual ~= '' then
    local before = tonumber(redis.call('HGET', b, 'spent')) or 0
    local after = redis.call('HINCRBY', b, 'spent', actual)
    if sl > 0 and before < sl and after >= sl then soft[#soft + 1] = i end
    if cap >= 0 and before <= cap and after > cap then hard[#hard + 1] = i end
    if ttl >= 0 and redis.call('PTTL', b) == -1 then redis.call('PEXPIRE', b, ttl) end
  end
end
redis.call('DEL', rec)
redis.call('HSET', rec, 'state', actual == '' and 'released' or 'settled')
redis.call('PEXPIRE', rec, ARGV[2])
return {1, r[3], soft, hard}
"""

# KEYS: a budget's counter hash and hold-deadline zset; ARGV[1] now (ms).
_BUDGET_STATUS = (
    _BUDGET_PRELUDE
    + """
purge(KEYS[1], KEYS[2], ARGV[1])
return redis.call('HMGET', KEYS[1], 'spent', 'reserved', 'calls')
"""
)


class RedisBudgetLedger(_LedgerBase, _RedisOwner):
    """Budgets shared by every replica through Redis: one script call per reserve, settle, release.

    Keys (under ``prefix``): ``b:<period>:<start>:<scope>`` (hash: spent, reserved, calls, and
    one ``r:<request id>`` field per live hold), ``z:...`` (the holds' deadlines), and
    ``res:<request id>`` (the reservation; after settle or release, a small tombstone).
    ``total`` budgets are kept forever unless ``total_ttl_s`` is set (e.g. for per-run caps).
    """

    _reserve_script = _Script(_BUDGET_RESERVE)
    _finish_script = _Script(_BUDGET_FINISH)
    _status_script = _Script(_BUDGET_STATUS)

    def __init__(
        self,
        redis: Any,
        *,
        prefix: str = "keel:budget:",
        reservation_ttl_s: float = 3600.0,
        tombstone_ttl_s: float = 3600.0,
        retention_s: float = 7 * 86400.0,
        total_ttl_s: float | None = None,
    ) -> None:
        _LedgerBase.__init__(self, prefix, reservation_ttl_s, tombstone_ttl_s, retention_s, total_ttl_s)
        _RedisOwner.__init__(self, redis)

    async def reserve(
        self, budgets: Sequence[Budget], request_id: str, amount_usd: float, now: float | None = None
    ) -> Reservation:
        self._check_amount(amount_usd)
        now = time.time() if now is None else now
        uniq = self._unique(budgets)
        keys = [f"{self.prefix}res:{request_id}"]
        args: list[Any] = [
            request_id,
            _micros(amount_usd),
            round(now * 1000),
            round(self.reservation_ttl_s * 1000),
        ]
        extra: list[Any] = []
        k_info, m_info = [], []
        for b in uniq:
            place, _, _, keep = self._place(b, now)
            hkey, zkey = f"{self.prefix}b:{place}", f"{self.prefix}z:{place}"
            keys += [hkey, zkey]
            ttl = -1 if keep is None else max(1, round(keep * 1000))
            soft = -1 if b.soft_limit_usd is None else _micros(b.soft_limit_usd)
            k_info.append([hkey, zkey, _cap_micros(b.limit_usd), soft, ttl])
            limit = None if b.limit_usd == math.inf else b.limit_usd  # JSON has no infinity
            m_info.append([b.scope, limit, b.period, b.soft_limit_usd, b.max_calls])
            extra += [_cap_micros(b.limit_usd), -1 if b.max_calls is None else b.max_calls, ttl]
        args.append(orjson.dumps({"k": k_info, "m": m_info}).decode())
        res = await self._reserve_script(self.redis, keys, args + extra)
        code = int(res[0])
        if code in (1, 2):
            return Reservation(True, request_id, amount_usd)
        if code == -1:
            raise ValueError(f"request id {request_id!r} was already {_text(res[1])}")
        i, reason, spent, reserved = int(res[1]), _text(res[2]), int(res[3]), int(res[4])
        return self._refused(uniq[i - 1], request_id, amount_usd, reason, spent, reserved, now)

    async def _finish(self, request_id: str, actual: str) -> SettleResult:
        keys = [f"{self.prefix}res:{request_id}"]
        res = await self._finish_script(self.redis, keys, [actual, round(self.tombstone_ttl_s * 1000)])
        if int(res[0]) != 1:
            return SettleResult(False)
        meta = orjson.loads(res[1])["m"]
        budgets = [
            Budget(s, math.inf if limit is None else limit, p, soft, calls)
            for s, limit, p, soft, calls in meta
        ]
        return SettleResult(
            True,
            tuple(budgets[int(i) - 1] for i in res[2]),
            tuple(budgets[int(i) - 1] for i in res[3]),
        )

    async def settle(self, request_id: str, actual_usd: float) -> SettleResult:
        self._check_amount(actual_usd)
        return await self._finish(request_id, str(_micros(actual_usd)))

    async def release(self, request_id: str) -> bool:
        return (await self._finish(request_id, "")).settled

    async def status(self, budget: Budget, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        place, start, end, _ = self._place(budget, now)
        keys = [f"{self.prefix}b:{place}", f"{self.prefix}z:{place}"]
        spent, reserved, calls = await self._status_script(self.redis, keys, [round(now * 1000)])
        return self._status(budget, start, end, int(spent or 0), int(reserved or 0), int(calls or 0))


# --------------------------------------------------------------------------- the limits JSON

_COMMON_LIMITS: dict[str, str] = {
    "rpm": "count",
    "tpm": "count",
    "budget_usd": "usd",
    "soft_budget_usd": "usd",
    "budget_period": "period",
}
# on a team only: the models its keys may use
_TEAM_LIMITS: dict[str, str] = {"models": "names"}
# on a project only: defaults for each end user, caps for agent runs
_PROJECT_LIMITS: dict[str, str] = {
    **{f"user_{k}": v for k, v in _COMMON_LIMITS.items()},
    "run_max_calls": "count",
    "run_budget_usd": "usd",
    "retention_days": "days",
}


def check_limits(limits: dict[str, Any] | None, level: str) -> dict[str, Any] | None:
    """Validate the ``limits`` JSON of a key, team or project; raise ValueError naming the bad entry."""
    if limits is None:
        return None
    allowed = {
        **_COMMON_LIMITS,
        **(_PROJECT_LIMITS if level == "project" else {}),
        **(_TEAM_LIMITS if level == "team" else {}),
    }
    for name, value in limits.items():
        kind = allowed.get(name)
        if kind is None:
            raise ValueError(f"unknown limit {name!r} on a {level} (known: {', '.join(sorted(allowed))})")
        if value is None:
            continue
        if kind == "count":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer")
        elif kind == "names":
            if not isinstance(value, list) or not all(isinstance(n, str) and n for n in value):
                raise ValueError(f"{name} must be a list of model names")
        elif kind in ("usd", "days"):
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative number")
        elif value not in PERIODS:
            raise ValueError(f"{name} must be one of {', '.join(PERIODS)}")
    for prefix in ("", "user_"):
        soft, hard = limits.get(f"{prefix}soft_budget_usd"), limits.get(f"{prefix}budget_usd")
        if soft is not None and hard is None:
            raise ValueError(f"{prefix}soft_budget_usd needs {prefix}budget_usd")
    return limits
