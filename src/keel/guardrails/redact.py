"""Mask personal data and secrets in anything JSON-shaped (used to store traces redacted).

The regex tier only (PII with checksums, credential formats): cheap enough to run on every span the
trace writer stores, off the request path.
"""

from __future__ import annotations

from typing import Any

from keel.guardrails.pii import PIIRail, resolve_overlaps
from keel.guardrails.secrets import SecretsRail

__all__ = ["Redactor"]


class Redactor:
    """``redact(value)``: every string in ``value`` with findings replaced by ``[TYPE]``."""

    def __init__(self) -> None:
        self._rails = (PIIRail(), SecretsRail())

    def text(self, text: str) -> str:
        if len(text) < 5:
            return text
        found = [f for rail in self._rails for f in rail.scan(text) if f.spans_text]
        if not found:
            return text
        out, pos = [], 0
        for f in resolve_overlaps(found):
            assert f.start is not None and f.end is not None
            out.append(text[pos : f.start])
            out.append(f"[{f.type.upper()}]")
            pos = f.end
        out.append(text[pos:])
        return "".join(out)

    def redact(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.redact(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact(v) for v in value]
        return value
