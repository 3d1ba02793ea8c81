"""Pure helpers of the web UI: formatting, the span tree and readable views of LLM bodies.

Nothing here touches the request or the store, so every function is easy to test on its own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

__all__ = [
    "ChatMessage",
    "SpanNode",
    "ToolCall",
    "ToolDef",
    "abs_time",
    "build_span_tree",
    "fmt_cost",
    "fmt_ms",
    "fmt_tokens",
    "input_messages",
    "output_messages",
    "parse_iso",
    "pretty_json",
    "rel_time",
    "request_params",
    "snippet",
    "tool_defs",
]


# -- formatting ---------------------------------------------------------------------------------


def parse_iso(value: str | datetime | None) -> datetime | None:
    """An ISO 8601 time (as the store renders it, ``...Z``) as an aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def abs_time(value: str | datetime | None, seconds: bool = True) -> str:
    dt = parse_iso(value)
    if dt is None:
        return "—"
    return dt.strftime("%Y-%m-%d %H:%M:%S UTC" if seconds else "%Y-%m-%d %H:%M UTC")


def rel_time(value: str | datetime | None, now: datetime | None = None) -> str:
    """'just now', '5s ago', '3 min ago', '2 h ago', '4 d ago', then the date."""
    dt = parse_iso(value)
    if dt is None:
        return "—"
    now = now or datetime.now(UTC)
    s = (now - dt).total_seconds()
    if s < 0:
        s = 0
    if s < 5:
        return "just now"
    if s < 60:
        return f"{int(s)}s ago"
    if s < 3600:
        return f"{int(s // 60)} min ago"
    if s < 86400:
        return f"{int(s // 3600)} h ago"
    if s < 30 * 86400:
        return f"{int(s // 86400)} d ago"
    return dt.strftime("%Y-%m-%d")


def fmt_cost(cost: float | None, *, has_usage: bool = True) -> str:
    """USD with enough digits to be meaningful: ``$0.000123``, ``$0.0123``, ``$12.34``.

    A missing cost is "unpriced" when tokens were used (the model has no known price), else "—".
    """
    if cost is None:
        return "unpriced" if has_usage else "—"
    if cost == 0:
        return "$0"
    if cost >= 1:
        return f"${cost:,.2f}"
    if cost >= 0.01:
        return "$" + f"{cost:.4f}".rstrip("0").rstrip(".")
    digits = min(10, max(6, -math.floor(math.log10(cost)) + 2))
    text = f"{cost:.{digits}f}".rstrip("0")
    return "$" + (text if text != "0." else "0")


def fmt_ms(ms: float | None) -> str:
    """A duration: ``850 µs``, ``12.3 ms``, ``1.24 s``, ``2 min 5 s``."""
    if ms is None:
        return "—"
    if ms < 1:
        return f"{ms * 1000:.0f} µs"
    if ms < 100:
        return f"{ms:.1f} ms"
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.2f} s"
    m, s = divmod(int(ms // 1000), 60)
    return f"{m} min {s} s"


def fmt_tokens(n: int | None) -> str:
    return "—" if n is None else f"{n:,}"


def snippet(text: str | None, limit: int = 90) -> str:
    if not text:
        return ""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def pretty_json(value: Any) -> str:
    """Indented JSON for display (escaping is the template's job)."""
    try:
        return json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=False)
    except (TypeError, ValueError):
        return repr(value)


# -- span tree ----------------------------------------------------------------------------------


@dataclass
class SpanNode:
    span: dict[str, Any]
    depth: int
    offset_pct: float  # where the bar starts on the trace's timeline
    width_pct: float  # how much of it the span covers
    has_children: bool = False


def build_span_tree(spans: list[dict[str, Any]]) -> list[SpanNode]:
    """Spans in depth-first order, children by start time; a span whose parent is not in the trace is a root."""
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in spans:
        parent = s.get("parent_span_id")
        children.setdefault(parent if parent in ids and parent != s["span_id"] else None, []).append(s)

    def start_of(s: dict[str, Any]) -> datetime:
        return parse_iso(s.get("start_time")) or datetime.min.replace(tzinfo=UTC)

    for group in children.values():
        group.sort(key=start_of)
    starts = [t for t in (parse_iso(s.get("start_time")) for s in spans) if t]
    ends = [t for t in (parse_iso(s.get("end_time")) for s in spans) if t]
    t0 = min(starts) if starts else None
    total_ms = (max(ends) - t0) / timedelta(milliseconds=1) if t0 and ends else 0.0

    out: list[SpanNode] = []
    seen: set[str] = set()

    def walk(s: dict[str, Any], depth: int) -> None:
        if s["span_id"] in seen:  # defensive: a cycle in bad data must not recurse forever
            return
        seen.add(s["span_id"])
        begin = parse_iso(s.get("start_time"))
        offset = (begin - t0) / timedelta(milliseconds=1) if begin and t0 else 0.0
        dur = float(s.get("latency_ms") or 0.0)
        if total_ms > 0:
            off_pct = max(0.0, min(100.0, offset / total_ms * 100))
            w_pct = max(0.6, min(100.0 - off_pct, dur / total_ms * 100))
        else:
            off_pct, w_pct = 0.0, 100.0
        kids = children.get(s["span_id"], [])
        out.append(SpanNode(s, depth, round(off_pct, 3), round(w_pct, 3), bool(kids)))
        for k in kids:
            walk(k, depth + 1)

    for root in children.get(None, []):
        walk(root, 0)
    for s in spans:  # anything unreachable (cycles) still shows up
        if s["span_id"] not in seen:
            walk(s, 0)
    return out


# -- readable LLM bodies ------------------------------------------------------------------------


@dataclass
class ToolCall:
    name: str
    arguments: str  # pretty-printed when it is JSON
    id: str | None = None


@dataclass
class ChatMessage:
    role: str
    text: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # non-text parts, refusals, tool call ids...
    name: str | None = None
    finish_reason: str | None = None


def _pretty_arguments(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            return pretty_json(json.loads(arguments))
        except ValueError:
            return arguments
    return pretty_json(arguments)


def _content(content: Any) -> tuple[str | None, list[str]]:
    """Text of a message's content (text parts joined) and notes for the parts that are not text."""
    if content is None:
        return None, []
    if isinstance(content, str):
        return content, []
    if isinstance(content, list):
        texts: list[str] = []
        notes: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict):
                ptype = part.get("type")
                if ptype in ("text", "input_text", "output_text") and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif ptype == "image_url":
                    url = (
                        (part.get("image_url") or {}).get("url", "")
                        if isinstance(part.get("image_url"), dict)
                        else ""
                    )
                    notes.append(
                        "image: " + (snippet(url, 60) if not str(url).startswith("data:") else "inline data")
                    )
                elif ptype == "refusal":
                    notes.append("refusal: " + str(part.get("refusal", "")))
                else:
                    notes.append(f"{ptype or 'part'}: {snippet(pretty_json(part), 120)}")
        return ("\n".join(texts) if texts else None), notes
    return pretty_json(content), []


def _message(m: Any) -> ChatMessage:
    if not isinstance(m, dict):
        return ChatMessage(role="?", text=pretty_json(m))
    text, notes = _content(m.get("content"))
    calls: list[ToolCall] = []
    for tc in m.get("tool_calls") or ():
        if not isinstance(tc, dict):
            continue
        fn: dict[str, Any] = tc["function"] if isinstance(tc.get("function"), dict) else {}
        calls.append(
            ToolCall(
                name=str(fn.get("name") or "?"),
                arguments=_pretty_arguments(fn.get("arguments")),
                id=tc.get("id"),
            )
        )
    fc = m.get("function_call")
    if isinstance(fc, dict):  # the legacy single function call
        calls.append(
            ToolCall(name=str(fc.get("name") or "?"), arguments=_pretty_arguments(fc.get("arguments")))
        )
    if m.get("tool_call_id"):
        notes.insert(0, f"result of {m['tool_call_id']}")
    if m.get("refusal"):
        notes.append("refusal: " + str(m["refusal"]))
    name = m.get("name") if isinstance(m.get("name"), str) else None
    return ChatMessage(role=str(m.get("role") or "?"), text=text, tool_calls=calls, notes=notes, name=name)


def input_messages(body: Any) -> list[ChatMessage] | None:
    """The request's chat transcript, or None when the input is not a chat request."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return None
    return [_message(m) for m in body["messages"]]


def output_messages(output: Any) -> list[ChatMessage] | None:
    """The reply: ``choices[*].message`` of a chat.completion, or a streamed ``{"role", "content", ...}``."""
    if not isinstance(output, dict):
        return None
    if isinstance(output.get("choices"), list):
        msgs = []
        for choice in output["choices"]:
            if not isinstance(choice, dict):
                continue
            raw = choice.get("message") if isinstance(choice.get("message"), dict) else choice.get("delta")
            msg = _message(
                raw if isinstance(raw, dict) else {"role": "assistant", "content": choice.get("text")}
            )
            msg.finish_reason = choice.get("finish_reason")
            msgs.append(msg)
        return msgs
    if "role" in output or "content" in output or "tool_calls" in output:
        msg = _message({"role": "assistant", **output})
        msg.finish_reason = output.get("finish_reason")
        return [msg]
    return None


_NOT_PARAMS = frozenset({"messages", "model"})


@dataclass
class ToolDef:
    name: str
    description: str | None
    parameters: str | None  # pretty JSON schema


def tool_defs(body: Any) -> list[ToolDef] | None:
    """The request's ``tools`` as name/description/schema, or None when absent or not function tools."""
    tools = body.get("tools") if isinstance(body, dict) else None
    if not isinstance(tools, list) or not tools:
        return None
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            return None
        desc = fn.get("description")
        params = fn.get("parameters")
        out.append(
            ToolDef(
                fn["name"],
                desc if isinstance(desc, str) else None,
                None if params is None else pretty_json(params),
            )
        )
    return out


def request_params(body: Any) -> list[tuple[str, Any, bool]]:
    """(name, display value, is_block) for a chat request's settings: not model, messages, function tools."""
    if not isinstance(body, dict):
        return []
    skip = _NOT_PARAMS | ({"tools"} if tool_defs(body) is not None else set())
    out: list[tuple[str, Any, bool]] = []
    for k, v in body.items():
        if k in skip:
            continue
        if isinstance(v, dict | list):
            out.append((k, pretty_json(v), True))
        elif isinstance(v, bool) or v is None:
            out.append((k, json.dumps(v), False))
        else:
            out.append((k, str(v), False))
    return out


def attribute_rows(attrs: Any) -> list[tuple[str, str, bool]]:
    if not isinstance(attrs, dict):
        return []
    rows = []
    for k in sorted(attrs):
        v = attrs[k]
        if isinstance(v, dict | list):
            rows.append((k, pretty_json(v), True))
        elif isinstance(v, bool) or v is None:
            rows.append((k, json.dumps(v), False))
        else:
            rows.append((k, str(v), False))
    return rows
