"""User, session, tags and metadata that propagate from a span to the spans started inside it.

They live in a :class:`contextvars.ContextVar`, so they follow the code path: into child spans,
into asyncio tasks created inside (a task copies its creator's context) and into threads started
with ``contextvars.copy_context().run``.  Setting one also stamps the current span.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import trace

from keel.sdk._runtime import guarded

__all__ = [
    "ATTR_METADATA",
    "ATTR_SESSION",
    "ATTR_TAGS",
    "ATTR_USER",
    "Propagated",
    "current",
    "propagated_attributes",
    "set_metadata",
    "set_session",
    "set_tags",
    "set_user",
]

ATTR_USER = "user.id"
ATTR_SESSION = "session.id"
ATTR_TAGS = "tag.tags"
ATTR_METADATA = "metadata"

_MAX_ID = 256
_MAX_TAG = 64
_MAX_TAGS = 50


@dataclass(frozen=True, slots=True)
class Propagated:
    """What a new span inherits (immutable: each change makes a new value)."""

    user: str | None = None
    session: str | None = None
    tags: tuple[str, ...] = ()
    metadata: Mapping[str, Any] = field(default_factory=dict)


_current: contextvars.ContextVar[Propagated] = contextvars.ContextVar(
    "keel_sdk_propagated",
    default=Propagated(),  # noqa: B039 -- frozen, and replaced (never mutated) on every change
)


def current() -> Propagated:
    return _current.get()


def scope() -> contextvars.Token[Propagated]:
    """Open a scope: changes made until :func:`end_scope` stay inside it (a span's body)."""
    return _current.set(_current.get())


def end_scope(token: contextvars.Token[Propagated]) -> None:
    try:
        _current.reset(token)
    except ValueError:  # reset from another context (a generator resumed elsewhere): keep what is set
        pass


def metadata_json(metadata: Mapping[str, Any]) -> str:
    return json.dumps(metadata, default=str, ensure_ascii=False, separators=(",", ":"))


def propagated_attributes(p: Propagated) -> dict[str, Any]:
    """The span attributes (OpenInference names) for ``p``."""
    attrs: dict[str, Any] = {}
    if p.user:
        attrs[ATTR_USER] = p.user
    if p.session:
        attrs[ATTR_SESSION] = p.session
    if p.tags:
        attrs[ATTR_TAGS] = list(p.tags)
    if p.metadata:
        attrs[ATTR_METADATA] = metadata_json(p.metadata)
    return attrs


def _stamp(p: Propagated, *names: str) -> None:
    span = trace.get_current_span()
    if span.is_recording():
        attrs = propagated_attributes(p)
        for name in names:
            if name in attrs:
                span.set_attribute(name, attrs[name])


def _text(value: object, limit: int) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text[:limit] or None


@guarded(None)
def set_user(user_id: str | None) -> None:
    """Attribute the current span and the spans started inside it to an end user."""
    p = replace(_current.get(), user=_text(user_id, _MAX_ID))
    _current.set(p)
    _stamp(p, ATTR_USER)


@guarded(None)
def set_session(session_id: str | None) -> None:
    """Group the current span and the spans started inside it into a session (a conversation)."""
    p = replace(_current.get(), session=_text(session_id, _MAX_ID))
    _current.set(p)
    _stamp(p, ATTR_SESSION)


@guarded(None)
def set_tags(*tags: str | Iterable[str]) -> None:
    """Add tags (strings, or lists of strings) to the current span and the spans started inside it."""
    flat: list[str] = []
    for t in tags:
        if t is None:
            continue
        if isinstance(t, str) or not isinstance(t, Iterable):
            flat.append(str(t))
        else:
            flat.extend(str(x) for x in t if x is not None)
    merged = list(_current.get().tags)
    for t in flat:
        text = _text(t, _MAX_TAG)
        if text and text not in merged:
            merged.append(text)
    p = replace(_current.get(), tags=tuple(merged[:_MAX_TAGS]))
    _current.set(p)
    _stamp(p, ATTR_TAGS)


@guarded(None)
def set_metadata(values: Mapping[str, Any] | None = None, /, **kv: Any) -> None:
    """Merge key/values into the metadata of the current span and of the spans started inside it."""
    merged = dict(_current.get().metadata)
    if values:
        merged.update({str(k): v for k, v in values.items()})
    merged.update(kv)
    p = replace(_current.get(), metadata=merged)
    _current.set(p)
    _stamp(p, ATTR_METADATA)
