"""Leaf types shared across keel's layers: principals, span records, the provider protocol."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from keel.config import ModelConfig

__all__ = [
    "DEFAULT_SCOPES",
    "SCOPES",
    "ChatResult",
    "Principal",
    "Provider",
    "ProviderFactory",
    "SpanRecord",
    "StreamResult",
    "Usage",
]


SCOPES: tuple[str, ...] = ("gateway", "ingest", "read", "admin")
DEFAULT_SCOPES: frozenset[str] = frozenset({"gateway", "ingest", "read"})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the master key, one virtual key of a project, or a signed-in user in one project."""

    key_id: str | None
    project_id: str | None
    is_master: bool = False
    allowed_models: frozenset[str] | None = None  # None: every model
    name: str | None = None
    team_id: str | None = None
    end_user: str | None = None  # requests by this key are attributed to this end user by default
    # rate limits and budgets as configured on the key, its team and its project (enforced by the gateway)
    limits: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    team_limits: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    project_limits: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    kind: str = "secret"  # "public": a pk-keel- key that may only post end-user feedback
    # what the key may do: gateway (model calls), ingest (OTLP, scores), read (/api GET), admin (its project)
    scopes: frozenset[str] = DEFAULT_SCOPES
    role: str | None = None  # a signed-in user's role in project_id: admin | developer | viewer
    user_name: str | None = None  # a signed-in user (UI session), not a key
    is_owner: bool = False  # an organisation owner: every project, every action (users only)

    def may_use(self, model: str) -> bool:
        if self.allowed_models is not None and model not in self.allowed_models:
            return False
        team_models = self.team_limits.get("models") if self.team_limits else None
        return team_models is None or model in team_models

    @property
    def is_public(self) -> bool:
        return self.kind == "public"


@dataclass(slots=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    reasoning_tokens: int | None = None
    estimated: bool = False  # counted by keel rather than reported by the provider


@dataclass(slots=True)
class SpanRecord:
    """One finished span, as queued for the trace writer. Times are epoch seconds."""

    trace_id: str
    span_id: str
    name: str
    kind: str
    start_time: float
    end_time: float
    status: str = "ok"  # ok | error
    parent_span_id: str | None = None
    project_id: str | None = None
    key_id: str | None = None
    team_id: str | None = None
    error: str | None = None
    status_code: int | None = None
    model: str | None = None  # model served (upstream id)
    requested_model: str | None = None
    provider: str | None = None
    deployment: str | None = None
    usage: Usage = field(default_factory=Usage)
    cost_usd: float | None = None
    price_override: tuple[float, float] | None = None  # per-MTok (input, output) from config
    ttft_ms: float | None = None
    user: str | None = None
    session_id: str | None = None
    prompt_name: str | None = None  # the registry prompt this span rendered, if any
    prompt_version: int | None = None
    tags: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    input: Any = None
    output: Any = None
    attributes: dict[str, Any] = field(default_factory=dict)
    stream: bool = False


@dataclass(slots=True)
class ChatResult:
    """A complete (non-streaming) chat completion in OpenAI wire shape."""

    body: dict[str, Any]
    usage: Usage
    served_model: str
    raw: bytes | None = None  # the upstream's bytes, forwarded unchanged when set


class StreamResult(Protocol):
    """A streaming chat completion: OpenAI-shaped SSE bytes, plus what was learnt from them."""

    usage: Usage
    output_text: str
    tool_calls: list[dict[str, Any]]
    finish_reason: str | None
    served_model: str | None

    def __aiter__(self) -> AsyncIterator[bytes]: ...


@runtime_checkable
class Provider(Protocol):
    """An upstream of chat completions (and, optionally, embeddings).

    ``chat`` takes an OpenAI chat-completions body (already validated) and returns a
    :class:`ChatResult`; ``chat_stream`` returns a :class:`StreamResult` whose iteration
    yields OpenAI-shaped SSE event bytes.  Failures raise :class:`keel.errors.KeelError`
    subclasses (``UpstreamError`` and friends) before the first byte; after it, the stream
    raises ``UpstreamError`` from iteration.
    """

    name: str

    async def chat(self, body: dict[str, Any], headers: dict[str, str]) -> ChatResult: ...

    async def chat_stream(self, body: dict[str, Any], headers: dict[str, str]) -> StreamResult: ...

    async def aclose(self) -> None: ...


class ProviderFactory(Protocol):
    def __call__(self, deployment: ModelConfig, settings: Any) -> Provider: ...
