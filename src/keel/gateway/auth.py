"""In-memory key cache: authentication without a database round trip.

The cache maps SHA-256(key) → :class:`Principal`.  It is loaded at start, reloaded when keys
change (directly in this process; through Redis pub/sub in the others) and refreshed
periodically as a safety net.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from typing import Any

from keel.store import KeyRow, Store, hash_key
from keel.types import DEFAULT_SCOPES, SCOPES, Principal

__all__ = ["KEYS_CHANNEL", "KeyCache", "bearer_token", "keys_channel"]

log = logging.getLogger("keel.auth")
KEYS_CHANNEL = "keel:keys:changed"


def keys_channel(prefix: str = "keel:") -> str:
    """The pub/sub channel that tells replicas to reload keys."""
    return f"{prefix}keys:changed"


def bearer_token(authorization: str | None, x_api_key: str | None = None) -> str | None:
    """The key from ``Authorization: Bearer <key>`` (or ``x-api-key``)."""
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def _default_scopes(kind: str) -> frozenset[str]:
    return frozenset() if kind == "public" else DEFAULT_SCOPES


class KeyCache:
    """Answers "who is this key?" from memory."""

    def __init__(
        self,
        store: Store,
        master_key: str,
        redis_url: str | None = None,
        refresh_s: float = 10.0,
        redis_prefix: str = "keel:",
    ) -> None:
        self.store = store
        self._master_hash = hash_key(master_key)
        self._by_hash: dict[str, Principal] = {}
        self.redis_url = redis_url
        self.channel = keys_channel(redis_prefix)
        self.refresh_s = refresh_s
        self._tasks: list[asyncio.Task[None]] = []
        self._redis: Any = None
        self.master = Principal(
            key_id=None, project_id=None, is_master=True, name="master", scopes=frozenset(SCOPES)
        )
        self.reloads = 0

    @staticmethod
    def _principal(row: KeyRow) -> Principal:
        allowed = frozenset(row.allowed_models) if row.allowed_models else None
        return Principal(
            key_id=row.id,
            project_id=row.project_id,
            allowed_models=allowed,
            name=row.name,
            team_id=row.team_id,
            end_user=row.end_user,
            limits=row.limits,
            team_limits=row.team_limits,
            project_limits=row.project_limits,
            kind=row.kind,
            scopes=frozenset(row.scopes) if row.scopes is not None else _default_scopes(row.kind),
        )

    def load(self) -> None:
        """(Re)load every active key from the store; swaps the map atomically."""
        self._by_hash = {row.key_hash: self._principal(row) for row in self.store.active_keys()}
        self.reloads += 1

    def lookup(self, key: str | None) -> Principal | None:
        """The principal of the master key or a secret key; None for unknown, revoked or public keys."""
        p = self.lookup_any(key)
        return None if p is None or p.is_public else p

    def lookup_any(self, key: str | None) -> Principal | None:
        """Like :meth:`lookup`, public (feedback-only) keys included: the caller checks ``is_public``."""
        if not key:
            return None
        h = hash_key(key)
        if hmac.compare_digest(h, self._master_hash):
            return self.master
        return self._by_hash.get(h)

    async def reload(self) -> None:
        await asyncio.to_thread(self.load)

    async def changed(self) -> None:
        """Call after creating or revoking a key: reload here and tell the other replicas."""
        await self.reload()
        if self._redis is not None:
            try:
                await self._redis.publish(self.channel, b"1")
            except Exception:
                log.warning(
                    "could not publish key change to redis; other replicas refresh within %ss", self.refresh_s
                )

    async def start(self) -> None:
        await self.reload()
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._periodic(), name="keel-key-refresh"))
        if self.redis_url:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(self.redis_url)
            await self._redis.ping()  # fail fast at start when Redis is configured but unreachable
            self._tasks.append(loop.create_task(self._listen(), name="keel-key-pubsub"))

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
                log.exception("key cache refresh failed")

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
                log.warning("redis pub/sub connection lost; retrying")
                await asyncio.sleep(1.0)
