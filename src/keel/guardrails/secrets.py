"""Secret detectors (regex tier): provider API keys, common token formats, private keys, and
high-entropy strings that look like credentials."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from keel.guardrails.base import TIER_REGEX, Finding, RailOptionError, option
from keel.guardrails.pii import resolve_overlaps

__all__ = ["SECRET_PATTERNS", "SecretsRail", "shannon_entropy"]

#: type -> pattern of a token format with a recognisable prefix (so no entropy test is needed)
SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    "anthropic_key": re.compile(r"(?<![\w-])sk-ant-(?:api|admin)?\d{0,2}-?[A-Za-z0-9_-]{32,}"),
    "openai_key": re.compile(r"(?<![\w-])sk-(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_-]{32,}"),
    "keel_key": re.compile(r"(?<![\w-])(?:sk|pk)-keel-[A-Za-z0-9_-]{16,}"),
    "aws_access_key": re.compile(
        r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA)[A-Z0-9]{16}(?![A-Z0-9])"
    ),
    "github_token": re.compile(r"(?<!\w)(?:gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{60,255})"),
    "gitlab_token": re.compile(r"(?<!\w)glpat-[A-Za-z0-9_-]{20,}"),
    "slack_token": re.compile(r"(?<!\w)xox[abposr]-[A-Za-z0-9-]{10,}"),
    "slack_webhook": re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/_-]{20,}"),
    "google_api_key": re.compile(r"(?<![\w-])AIza[0-9A-Za-z_-]{35}"),
    "stripe_key": re.compile(r"(?<!\w)(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{20,}"),
    "huggingface_token": re.compile(r"(?<!\w)hf_[A-Za-z0-9]{30,}"),
    "npm_token": re.compile(r"(?<!\w)npm_[A-Za-z0-9]{36}"),
    "sendgrid_key": re.compile(r"(?<!\w)SG\.[A-Za-z0-9_-]{22}\.[A-Za-z0-9_-]{43}"),
    "jwt": re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    # an unterminated key (a stream cut mid-key, a truncated paste) is redacted to the end of the text
    "private_key": re.compile(
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:[\s\S]*?-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|[\s\S]*\Z)"
    ),
    "password_assignment": re.compile(
        r"(?i)(?<![\w-])(?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token|client[_-]?secret)"
        r"[\"']?\s*[:=]\s*[\"']?(?P<value>[^\s\"',;]{8,})"
    ),
}
_CANDIDATE = re.compile(r"(?<![\w/+-])[A-Za-z0-9+/_-]{24,}={0,2}(?![\w/+=-])")
_CONTEXT = re.compile(r"(?i)\b(?:key|token|secret|password|passwd|credential|bearer|auth)\b")


def shannon_entropy(s: str) -> float:
    """Bits per character of ``s``."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


def _classes(s: str) -> int:
    return sum(
        (
            any(c.islower() for c in s),
            any(c.isupper() for c in s),
            any(c.isdigit() for c in s),
            any(c in "+/=_-" for c in s),
        )
    )


class SecretsRail:
    """Credentials: provider API keys and token formats, private keys, and high-entropy strings.

    Options: ``types`` (default: all), ``entropy`` (bits/char a 24+ char token needs to count as a
    secret, default 4.3; 3.8 next to a word like "token" or "key"), ``high_entropy`` (default true).
    """

    tier = TIER_REGEX
    window = 128

    def __init__(self, options: dict[str, Any] | None = None, name: str = "secrets") -> None:
        options = options or {}
        types = option(options, "types", list, list(SECRET_PATTERNS))
        unknown = [t for t in types if t not in SECRET_PATTERNS and t != "high_entropy"]
        if unknown:
            raise RailOptionError(f"types: unknown secret type {unknown[0]!r}")
        self.name = name
        self._patterns = [(t, p) for t, p in SECRET_PATTERNS.items() if t in types]
        self.entropy = option(options, "entropy", float, 4.3)
        self.high_entropy = option(options, "high_entropy", bool, True)

    def scan(self, text: str) -> list[Finding]:
        found: list[Finding] = []
        for kind, pat in self._patterns:
            for m in pat.finditer(text):
                if "value" in pat.groupindex:
                    found.append(Finding(kind, m.start("value"), m.end("value")))
                else:
                    found.append(Finding(kind, m.start(), m.end()))
        if self.high_entropy and len(text) >= 24:
            for m in _CANDIDATE.finditer(text):
                tok = m.group()
                if any(f.start <= m.start() < f.end for f in found):  # type: ignore[operator]
                    continue
                if _classes(tok) < 3 or tok.count("-") + tok.count("_") > len(tok) // 4:
                    continue  # hex digests, UUIDs and snake/kebab identifiers are not secrets
                ctx = _CONTEXT.search(text[max(0, m.start() - 40) : m.start()])
                # a short random token cannot reach a long one's entropy: scale the bar with length
                threshold = min(self.entropy, 0.82 * math.log2(len(tok)))
                threshold -= 0.5 if ctx else 0.0
                if shannon_entropy(tok) >= threshold:
                    found.append(Finding("high_entropy", m.start(), m.end(), score=0.8))
        return resolve_overlaps(found) if len(found) > 1 else found
