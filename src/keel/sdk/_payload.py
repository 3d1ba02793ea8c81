"""Turn a function's arguments and results into span input/output: JSON text, size-capped."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import inspect
import json
import uuid
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["JSON", "TEXT", "bind_arguments", "encode", "signature_of", "to_plain", "usage_of"]

JSON = "application/json"
TEXT = "text/plain"


def to_plain(value: Any) -> Any:
    """A JSON-friendly view of common objects (pydantic models, dataclasses, OpenAI responses)."""
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        try:
            return dump(mode="json")
        except TypeError:
            return dump()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _default(value: Any) -> Any:
    plain = to_plain(value)
    if plain is not value:
        return plain
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, uuid.UUID):
        return str(value)
    return repr(value)


def encode(value: Any, limit: int) -> tuple[str, str]:
    """(text, mime type) for a span's input or output; text longer than ``limit`` is cut and marked."""
    if isinstance(value, str):
        text, mime = value, TEXT
    else:
        try:
            text, mime = json.dumps(value, default=_default, ensure_ascii=False), JSON
        except (TypeError, ValueError, RecursionError):  # cycles, exotic keys
            text, mime = repr(value), TEXT
    if len(text) > limit:
        text, mime = f"{text[:limit]}... [truncated {len(text) - limit} chars]", TEXT
    return text, mime


def bind_arguments(sig: inspect.Signature | None, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The call's arguments by parameter name (defaults included), without ``self``/``cls``."""
    if sig is not None:
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:  # the call itself is wrong; the function will say so
            pass
        else:
            bound.apply_defaults()
            out = dict(bound.arguments)
            first = next(iter(sig.parameters), None)
            if first in ("self", "cls"):
                out.pop(first, None)
            return out
    return {"args": list(args), "kwargs": dict(kwargs)}


def signature_of(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def usage_of(value: Any) -> tuple[str | None, int | None, int | None]:
    """(model, input tokens, output tokens) of an OpenAI- or Anthropic-shaped response, if it is one."""
    plain = to_plain(value)
    if not isinstance(plain, Mapping):
        return None, None, None
    model = plain.get("model") if isinstance(plain.get("model"), str) else None
    usage = plain.get("usage")
    if not isinstance(usage, Mapping):
        return model, None, None
    inp = usage.get("prompt_tokens", usage.get("input_tokens"))
    out = usage.get("completion_tokens", usage.get("output_tokens"))
    return (
        model,
        inp if isinstance(inp, int) and not isinstance(inp, bool) else None,
        out if isinstance(out, int) and not isinstance(out, bool) else None,
    )
