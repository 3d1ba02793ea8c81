"""Which version a label serves to a caller: its version, or a sticky weighted pick for a canary."""

from __future__ import annotations

import hashlib
import random

from keel.prompts.model import LabelState

__all__ = ["choose_version", "sticky_fraction"]


def sticky_fraction(prompt: str, label: str, user: str) -> float:
    """A stable number in [0, 1) for (prompt, label, user): the same user always lands in the same bucket."""
    digest = hashlib.blake2b(f"{prompt}\x00{label}\x00{user}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def choose_version(prompt: str, state: LabelState, user: str | None = None) -> int:
    """The version ``state`` sends this caller to (sticky per ``user``; random without one)."""
    if not state.split:
        return state.version
    total = sum(w for _, w in state.split)
    x = (sticky_fraction(prompt, state.label, user) if user else random.random()) * total
    acc = 0.0
    for version, weight in state.split:
        acc += weight
        if x < acc:
            return version
    return state.split[-1][0]
