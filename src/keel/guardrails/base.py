"""The Rail protocol, what a rail finds, and the actions a policy takes on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from keel.errors import BadRequest

__all__ = [
    "ACTIONS",
    "AsyncRail",
    "Finding",
    "GuardrailBlocked",
    "Rail",
    "RailOptionError",
    "option",
]

#: allow: record only; flag: record and mark the trace; mask: replace findings with ``[TYPE]``;
#: block: refuse the request (input) or the answer (output); pseudonymize: placeholders upstream,
#: originals restored in the answer.
ACTIONS = ("allow", "flag", "mask", "block", "pseudonymize")

#: tiers, cheapest first: the pipeline runs the rails of a stage in this order
TIER_REGEX, TIER_MODEL, TIER_LLM = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a rail found: a span of the text (``start``/``end``), or the whole text (both None).

    ``type`` names what it is (``email``, ``card``, ``openai_key``, ``injection``...); ``score`` is
    the rail's confidence in [0, 1]. The matched value is never stored here: callers slice the text.
    """

    type: str
    start: int | None = None
    end: int | None = None
    score: float = 1.0
    detail: str | None = None  # a short reason fit for a trace (never the matched value)

    @property
    def spans_text(self) -> bool:
        return self.start is not None and self.end is not None


@runtime_checkable
class Rail(Protocol):
    """A guardrail: scans one text and returns what it found (nothing found: an empty list).

    ``tier`` orders the rails of a stage (0 regex, 1 local model, 2 LLM judge); ``window`` is the
    longest span it can match, in characters (0: it judges a whole text and cannot redact a stream
    incrementally); a stream's output is held back by the largest window of its rails.
    """

    name: str
    tier: int
    window: int

    def scan(self, text: str) -> list[Finding]: ...


@runtime_checkable
class AsyncRail(Protocol):
    """A rail whose check is slow or remote (a model, an LLM judge): awaited, off the event loop."""

    name: str
    tier: int
    window: int

    async def ascan(self, text: str) -> list[Finding]: ...


class RailOptionError(ValueError):
    """A rail's options are invalid; the message names the option."""


class GuardrailBlocked(BadRequest):
    """A rail blocked the request or the answer (400, code ``guardrail_blocked``)."""

    code = "guardrail_blocked"

    def __init__(self, rail: str, stage: str, types: list[str]) -> None:
        what = ", ".join(sorted(set(types))) or "a policy violation"
        where = "the request" if stage == "input" else "the response"
        super().__init__(f"guardrail '{rail}' blocked {where}: {what} detected", code="guardrail_blocked")
        self.rail = rail
        self.stage = stage


def option(options: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any) -> Any:
    """``options[name]`` checked against ``kind``, or ``default`` when absent."""
    if name not in options or options[name] is None:
        return default
    value = options[name]
    if isinstance(value, bool) and kind in (int, float):
        raise RailOptionError(f"{name}: expected a number, got a boolean")
    if kind is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RailOptionError(f"{name}: expected {names}, got {type(value).__name__}")
    return value
