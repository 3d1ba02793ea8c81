"""Deployment health: latency EWMA, in-flight counts, failure windows and cooldowns (circuit breaker).

State lives in process memory and is read on every request without any I/O. With Redis, a
cooldown decided by one replica is published and applied by every other replica, and latency
statistics are exchanged periodically (see :class:`SharedHealth`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson

from keel.config import CooldownConfig

__all__ = ["COOLDOWN_CHANNEL", "DeploymentHealth", "HealthBoard", "SharedHealth"]

log = logging.getLogger("keel.health")
COOLDOWN_CHANNEL = "keel:cooldown"
LATENCY_KEY = "keel:latency"
_ALPHA = 0.2  # EWMA weight of the newest observation


@dataclass
class DeploymentHealth:
    key: str
    ewma_latency_s: float | None = None
    ewma_ttft_s: float | None = None
    in_flight: int = 0
    failures: deque[float] = field(default_factory=deque)
    cooldown_until: float = 0.0
    probing: bool = False  # a request is testing the deployment after its cooldown
    cooldowns: int = 0
    last_error: str | None = None


class HealthBoard:
    """Health of every deployment of this process."""

    def __init__(self, cooldown: CooldownConfig) -> None:
        self.cfg = cooldown
        self.by_key: dict[str, DeploymentHealth] = {}
        self.shared: SharedHealth | None = None

    def get(self, key: str) -> DeploymentHealth:
        h = self.by_key.get(key)
        if h is None:
            h = self.by_key[key] = DeploymentHealth(key)
        return h

    def available(self, key: str, now: float) -> tuple[bool, str | None]:
        """Whether a deployment may take a request now, else why not."""
        h = self.get(key)
        if now < h.cooldown_until:
            return False, f"cooling down for {h.cooldown_until - now:.1f}s after {h.last_error or 'failures'}"
        if h.cooldown_until and h.probing:
            return False, "a probe request is testing it after its cooldown"
        return True, None

    def begin(self, key: str, now: float) -> None:
        h = self.get(key)
        h.in_flight += 1
        if h.cooldown_until and now >= h.cooldown_until:
            h.probing = True  # first request after a cooldown: the probe

    def success(self, key: str, latency_s: float, ttft_s: float | None = None) -> None:
        h = self.get(key)
        h.in_flight = max(0, h.in_flight - 1)
        h.ewma_latency_s = (
            latency_s if h.ewma_latency_s is None else (1 - _ALPHA) * h.ewma_latency_s + _ALPHA * latency_s
        )
        if ttft_s is not None:
            h.ewma_ttft_s = (
                ttft_s if h.ewma_ttft_s is None else (1 - _ALPHA) * h.ewma_ttft_s + _ALPHA * ttft_s
            )
        if h.cooldown_until or h.failures:
            h.failures.clear()
            h.cooldown_until = 0.0
            h.probing = False

    def failure(
        self,
        key: str,
        error: str,
        now: float,
        *,
        rate_limited: bool = False,
        retry_after: float | None = None,
    ) -> bool:
        """Count a failure; return True when it put the deployment into cooldown."""
        h = self.get(key)
        h.in_flight = max(0, h.in_flight - 1)
        h.last_error = error
        h.failures.append(now)
        while h.failures and h.failures[0] < now - self.cfg.window_s:
            h.failures.popleft()
        if rate_limited or h.probing or len(h.failures) >= self.cfg.allowed_fails:
            duration = max(self.cfg.cooldown_s, retry_after or 0.0)
            self.cool(key, now + duration, error)
            if self.shared is not None:
                self.shared.publish_cooldown(key, time.time() + duration, error)
            return True
        return False

    def release(self, key: str) -> None:
        """The attempt ended without a verdict on the deployment (e.g. the client's own 400)."""
        h = self.get(key)
        h.in_flight = max(0, h.in_flight - 1)
        h.probing = False

    def cool(self, key: str, until: float, error: str | None) -> None:
        h = self.get(key)
        h.cooldown_until = max(h.cooldown_until, until)
        h.probing = False
        h.cooldowns += 1
        h.last_error = error

    def snapshot(self) -> dict[str, dict[str, Any]]:
        now = time.monotonic()
        return {
            k: {
                "state": "cooldown" if now < h.cooldown_until else "healthy",
                "cooldown_remaining_s": max(0.0, h.cooldown_until - now),
                "ewma_latency_ms": None if h.ewma_latency_s is None else h.ewma_latency_s * 1000,
                "in_flight": h.in_flight,
                "recent_failures": len(h.failures),
                "cooldowns": h.cooldowns,
                "last_error": h.last_error,
            }
            for k, h in self.by_key.items()
        }


def _log_publish_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("cooldown publish failed: %s", task.exception())


class SharedHealth:
    """Share cooldowns (pub/sub) and latency statistics (a Redis hash) across replicas."""

    def __init__(
        self, board: HealthBoard, redis_url: str, sync_s: float = 2.0, prefix: str = "keel:"
    ) -> None:
        self.board = board
        self.channel = f"{prefix}cooldown"
        self.latency_key = f"{prefix}latency"
        self.redis_url = redis_url
        self.sync_s = sync_s
        self._redis: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self.received = 0

    async def start(self) -> None:
        import redis.asyncio as aioredis

        self._redis = aioredis.from_url(self.redis_url)
        await self._redis.ping()
        self.board.shared = self
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._listen(), name="keel-cooldown-pubsub"),
            loop.create_task(self._sync_latency(), name="keel-latency-sync"),
        ]

    async def stop(self) -> None:
        self.board.shared = None
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._redis is not None:
            await self._redis.aclose()

    def publish_cooldown(self, key: str, until_epoch: float, error: str | None) -> None:
        if self._redis is None:
            return
        msg = orjson.dumps({"key": key, "until": until_epoch, "error": error})
        task = asyncio.get_running_loop().create_task(self._redis.publish(self.channel, msg))
        task.add_done_callback(_log_publish_failure)

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self.channel)
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    data = orjson.loads(msg["data"])
                    # epoch time on the wire; monotonic time in the board
                    until = time.monotonic() + (float(data["until"]) - time.time())
                    self.board.cool(str(data["key"]), until, data.get("error"))
                    self.received += 1
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("redis cooldown channel lost; retrying")
                await asyncio.sleep(1.0)

    async def _sync_latency(self) -> None:
        """Push this replica's latency EWMAs and blend in the fleet's."""
        while True:
            await asyncio.sleep(self.sync_s)
            try:
                mine = {
                    k: h.ewma_latency_s for k, h in self.board.by_key.items() if h.ewma_latency_s is not None
                }
                if mine:
                    await self._redis.hset(self.latency_key, mapping={k: str(v) for k, v in mine.items()})
                fleet = await self._redis.hgetall(self.latency_key)
                for raw_key, raw_val in fleet.items():
                    key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
                    val = float(raw_val)
                    h = self.board.get(key)
                    h.ewma_latency_s = val if h.ewma_latency_s is None else (h.ewma_latency_s + val) / 2
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("latency sync with redis failed")
