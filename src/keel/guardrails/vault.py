"""Reversible pseudonymisation: placeholders go upstream, originals come back in the answer.

One :class:`Vault` per request, in memory only: the mapping never leaves the process and is never
traced. The same value gets the same placeholder within a request (so the model can refer to it).
"""

from __future__ import annotations

import re
from collections import Counter

__all__ = ["PLACEHOLDER", "Vault"]

#: what a placeholder looks like: <EMAIL_1>, <CARD_2>, <US_SSN_1>
PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]{0,30}_\d{1,4})>")
_MAX_LEN = 40


class Vault:
    """Placeholders for the values of one request, and their way back."""

    __slots__ = ("_counts", "_token_of", "_value_of")

    def __init__(self) -> None:
        self._token_of: dict[tuple[str, str], str] = {}
        self._value_of: dict[str, str] = {}
        self._counts: Counter[str] = Counter()

    def __bool__(self) -> bool:
        return bool(self._value_of)

    def __len__(self) -> int:
        return len(self._value_of)

    def token(self, kind: str, value: str) -> str:
        """The placeholder of ``value`` (a ``kind`` such as ``email``), minted on first sight."""
        key = (kind, value)
        tok = self._token_of.get(key)
        if tok is None:
            label = re.sub(r"[^A-Z0-9_]", "_", kind.upper())[:24] or "VALUE"
            self._counts[label] += 1
            tok = f"<{label}_{self._counts[label]}>"
            self._token_of[key] = tok
            self._value_of[tok] = value
        return tok

    def restore(self, text: str) -> str:
        """``text`` with every known placeholder replaced by its original value."""
        if not self._value_of or "<" not in text:
            return text
        return PLACEHOLDER.sub(lambda m: self._value_of.get(m.group(), m.group()), text)

    def pending_from(self, text: str) -> int:
        """Where a placeholder may have begun at the end of ``text`` and not yet ended (else len)."""
        i = text.rfind("<", max(0, len(text) - _MAX_LEN))
        if i < 0 or ">" in text[i:]:
            return len(text)
        return i if re.fullmatch(r"<[A-Z0-9_]*", text[i:]) else len(text)

    def pairs(self) -> list[tuple[str, str]]:
        """(original, placeholder) for scrubbing traces."""
        return [(v, t) for t, v in self._value_of.items()]
