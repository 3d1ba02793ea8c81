"""In-memory key cache: authentication without a database round trip.

The cache maps SHA-256(key) → :class:`Principal`.  It is loaded at start, reloaded when keys
change (directly in this process; through Redis pub/sub in the others) and refreshed
periodically as a safety net.
"""

from __future__ import annotations

import hmac
import logging

from keel.store import KeyRow, Store, hash_key
from keel.store.replicated import ReplicatedCache
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


class KeyCache(ReplicatedCache):
    """Answers "who is this key?" from memory."""

    what = "key cache"
    ping_redis_at_start = True

    def __init__(
        self,
        store: Store,
        master_key: str,
        redis_url: str | None = None,
        refresh_s: float = 10.0,
        redis_prefix: str = "keel:",
    ) -> None:
        super().__init__(keys_channel(redis_prefix), redis_url, refresh_s)
        self.store = store
        self._master_hash = hash_key(master_key)
        self._by_hash: dict[str, Principal] = {}
        self.master = Principal(
            key_id=None, project_id=None, is_master=True, name="master", scopes=frozenset(SCOPES)
        )

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
