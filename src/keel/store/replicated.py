"""An in-memory view of some tables, kept in step with the store across replicas.

A subclass implements :meth:`ReplicatedCache.load` (read the tables, swap the in-memory map). The
view is loaded at start, reloaded at once in the process that made a change (:meth:`changed`), in
the other replicas through a Redis pub/sub channel, and periodically as a safety net, so request
paths answer from memory without a database round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

__all__ = ["ReplicatedCache"]

log = logging.getLogger("keel.store.replicated")


class ReplicatedCache:
    """Base of the key cache and the prompt cache: reload on change, on pub/sub, and every ``refresh_s``."""

    what = "cache"  # for log lines and task names
    ping_redis_at_start = False  # fail fast when Redis is configured but unreachable

    def __init__(self, channel: str, redis_url: str | None, refresh_s: float) -> None:
        self.channel = channel
        self.redis_url = redis_url
        self.refresh_s = refresh_s
        self._tasks: list[asyncio.Task[None]] = []
        self._redis: Any = None
        self.reloads = 0

    def load(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def reload(self) -> None:
        await asyncio.to_thread(self.load)

    async def changed(self) -> None:
        """Call after a write: reload here and tell the other replicas."""
        await self.reload()
        if self._redis is not None:
            try:
                await self._redis.publish(self.channel, b"1")
            except Exception:
                log.warning(
                    "could not publish a %s change to redis; other replicas refresh within %ss",
                    self.what,
                    self.refresh_s,
                )

    async def start(self) -> None:
        await self.reload()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._periodic(), name=f"keel-{self.what}-refresh"))
        if self.redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(self.redis_url)
            if self.ping_redis_at_start:
                await self._redis.ping()
            self._tasks.append(loop.create_task(self._listen(), name=f"keel-{self.what}-pubsub"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _periodic(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.reload()
            except Exception:
                log.exception("%s refresh failed", self.what)

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(self.channel)
                async for msg in pubsub.listen():
                    if msg.get("type") == "message":
                        await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("redis pub/sub connection lost (%s); retrying", self.what)
                await asyncio.sleep(1.0)
