"""OTLP trace ingest: decode an OTLP/HTTP export and map its spans onto keel's span records.

Decoding: OTLP/HTTP protobuf (opentelemetry-proto) or OTLP/JSON (hex ids, lowerCamelCase fields,
64-bit integers as strings or numbers), either one optionally gzip-compressed.

Mapping: the OpenTelemetry GenAI semantic conventions (current names and the older
``gen_ai.system`` / ``*_tokens`` / ``gen_ai.prompt.N`` ones) and OpenInference (``openinference.span.kind``,
``llm.*``, ``input.value`` ...) onto keel's span kinds, models, tokens, I/O, user, session and tags.
Chat messages are normalised to the OpenAI shape the trace UI renders (``{"messages": [...]}`` in,
``{"choices": [...]}`` out). Every attribute that is not moved into a column or into input/output is
kept on the span's ``attributes``; the resource's attributes are kept under ``otel.resource``.
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from keel.types import SpanRecord, Usage

__all__ = [
    "KINDS",
    "DecodedExport",
    "OTLPError",
    "Origin",
    "OtelEvent",
    "OtelSpan",
    "ResourceSpans",
    "decode_export",
    "encode_response",
    "media_type",
    "to_record",
    "to_records",
]

KINDS = (
    "llm",
    "embedding",
    "retriever",
    "reranker",
    "tool",
    "agent",
    "chain",
    "guardrail",
    "evaluator",
    "event",
)

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_MEDIA_TYPES = {PROTOBUF: PROTOBUF, "application/protobuf": PROTOBUF, JSON: JSON}

# column widths of the spans/traces tables (PostgreSQL enforces them: a longer value would fail the batch)
_NAME, _MODEL, _PROVIDER, _USER, _TAG = 200, 200, 64, 256, 200
_MAX_TAGS = 50

_OI_KINDS = {
    "LLM": "llm",
    "EMBEDDING": "embedding",
    "RETRIEVER": "retriever",
    "RERANKER": "reranker",
    "TOOL": "tool",
    "AGENT": "agent",
    "CHAIN": "chain",
    "GUARDRAIL": "guardrail",
    "EVALUATOR": "evaluator",
    "PROMPT": "chain",
}
_GENAI_OPS = {
    "chat": "llm",
    "text_completion": "llm",
    "generate_content": "llm",
    "embeddings": "embedding",
    "retrieval": "retriever",
    "execute_tool": "tool",
    "create_agent": "agent",
    "invoke_agent": "agent",
    "invoke_workflow": "chain",
    "rerank": "reranker",
    "guardrail": "guardrail",
    "evaluate": "evaluator",
    "evaluation": "evaluator",
}
_SPAN_KINDS = {2: "server", 3: "client", 4: "producer", 5: "consumer"}
_SPAN_KIND_NAMES = {
    "SPAN_KIND_UNSPECIFIED": 0,
    "SPAN_KIND_INTERNAL": 1,
    "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3,
    "SPAN_KIND_PRODUCER": 4,
    "SPAN_KIND_CONSUMER": 5,
}
_STATUS_NAMES = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16

# attribute aliases, first present wins
_INPUT_TOKENS = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt")
_OUTPUT_TOKENS = (
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.completion_tokens",
    "llm.token_count.completion",
)
_CACHED_TOKENS = (
    "gen_ai.usage.cache_read.input_tokens",
    "gen_ai.usage.cache_read_input_tokens",
    "llm.token_count.prompt_details.cache_read",
)
_REASONING_TOKENS = (
    "gen_ai.usage.reasoning.output_tokens",
    "gen_ai.usage.reasoning_tokens",
    "llm.token_count.completion_details.reasoning",
)
_REQUEST_MODEL = ("gen_ai.request.model", "llm.model_name", "embedding.model_name", "reranker.model_name")
_PROVIDER_KEYS = ("gen_ai.provider.name", "gen_ai.system", "llm.provider", "llm.system")
_COST_KEYS = ("keel.cost_usd", "llm.cost.total", "gen_ai.usage.cost")
_USER_KEYS = ("user.id", "enduser.id", "gen_ai.user.id")
_SESSION_KEYS = ("session.id", "gen_ai.conversation.id")


class OTLPError(Exception):
    """The export cannot be accepted: ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(slots=True)
class OtelEvent:
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(slots=True)
class OtelSpan:
    """One decoded OTLP span, the same for both encodings (ids as lowercase hex)."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[OtelEvent] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)
    status_code: int = 0  # 0 unset, 1 ok, 2 error
    status_message: str = ""
    scope: str | None = None


@dataclass(slots=True)
class ResourceSpans:
    attributes: dict[str, Any]
    spans: list[OtelSpan]


@dataclass(slots=True)
class DecodedExport:
    resources: list[ResourceSpans]
    json: bool
    rejected: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def span_count(self) -> int:
        return sum(len(r.spans) for r in self.resources)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where the spans of one resource go: the sender's project, key and team."""

    project_id: str | None
    key_id: str | None = None
    team_id: str | None = None
    end_user: str | None = None


# -- decoding ---------------------------------------------------------------------------------------


def media_type(content_type: str | None) -> str:
    """The OTLP encoding named by a Content-Type header, or OTLPError(415)."""
    mt = (content_type or "").split(";", 1)[0].strip().lower()
    found = _MEDIA_TYPES.get(mt)
    if found is None:
        raise OTLPError(
            f"unsupported content type {mt or '(none)'!r}: send application/x-protobuf or application/json",
            415,
        )
    return found


def _inflate(body: bytes, encoding: str | None, max_bytes: int) -> bytes:
    enc = (encoding or "identity").strip().lower()
    if enc in ("identity", ""):
        return body
    if enc not in ("gzip", "deflate"):
        raise OTLPError(f"unsupported content encoding {enc!r}: send gzip or none", 415)
    d = zlib.decompressobj(16 + zlib.MAX_WBITS if enc == "gzip" else zlib.MAX_WBITS)
    try:
        out = d.decompress(body, max_bytes + 1)
    except zlib.error as exc:
        raise OTLPError(f"body is not valid {enc}: {exc}") from None
    if len(out) > max_bytes:
        raise OTLPError(f"decompressed body is larger than {max_bytes} bytes", 413)
    if not d.eof:
        raise OTLPError(f"{enc} body is truncated")
    return out


def decode_export(
    body: bytes, content_type: str | None, content_encoding: str | None, max_bytes: int
) -> DecodedExport:
    """Decode an ExportTraceServiceRequest. Spans with invalid ids are counted as rejected, not raised."""
    mt = media_type(content_type)
    raw = _inflate(body, content_encoding, max_bytes)
    if mt == PROTOBUF:
        return _decode_protobuf(raw)
    return _decode_json(raw)


def _pb_value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "string_value":
        return v.string_value
    if which == "int_value":
        return v.int_value
    if which == "double_value":
        return v.double_value
    if which == "bool_value":
        return v.bool_value
    if which == "array_value":
        return [_pb_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _pb_value(kv.value) for kv in v.kvlist_value.values}
    if which == "bytes_value":
        return base64.b64encode(v.bytes_value).decode()
    return None


def _pb_attrs(kvs: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: _pb_value(kv.value) for kv in kvs}


def _decode_protobuf(raw: bytes) -> DecodedExport:
    req = ExportTraceServiceRequest()
    try:
        req.ParseFromString(raw)
    except (DecodeError, ValueError) as exc:
        raise OTLPError(f"body is not a valid OTLP protobuf ExportTraceServiceRequest: {exc}") from None
    out = DecodedExport([], json=False)
    for rs in req.resource_spans:
        spans: list[OtelSpan] = []
        for ss in rs.scope_spans:
            scope = ss.scope.name or None
            for s in ss.spans:
                tid, sid = s.trace_id.hex(), s.span_id.hex()
                if len(tid) != 32 or tid == _ZERO_TRACE or len(sid) != 16 or sid == _ZERO_SPAN:
                    out.rejected += 1
                    _note(out, f"span {s.name!r}: invalid trace_id or span_id")
                    continue
                if not s.start_time_unix_nano:
                    out.rejected += 1
                    _note(out, f"span {s.name!r}: missing start_time_unix_nano")
                    continue
                parent = s.parent_span_id.hex()
                spans.append(
                    OtelSpan(
                        trace_id=tid,
                        span_id=sid,
                        parent_span_id=parent if len(parent) == 16 and parent != _ZERO_SPAN else None,
                        name=s.name,
                        kind=s.kind,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes=_pb_attrs(s.attributes),
                        events=[
                            OtelEvent(e.name, e.time_unix_nano, _pb_attrs(e.attributes)) for e in s.events
                        ]
                        if s.events
                        else [],
                        links=[
                            {
                                "trace_id": ln.trace_id.hex(),
                                "span_id": ln.span_id.hex(),
                                "attributes": _pb_attrs(ln.attributes),
                            }
                            for ln in s.links
                        ]
                        if s.links
                        else [],
                        status_code=s.status.code,
                        status_message=s.status.message,
                        scope=scope,
                    )
                )
        if spans:
            out.resources.append(ResourceSpans(_pb_attrs(rs.resource.attributes), spans))
    return out


def _note(out: DecodedExport, msg: str) -> None:
    if len(out.errors) < 5:  # a few examples are enough for the partial-success message
        out.errors.append(msg)


def _get(d: dict[str, Any], camel: str, snake: str) -> Any:
    v = d.get(camel)
    return d.get(snake) if v is None else v


def _json_int(v: Any, what: str) -> int:
    if v is None:
        return 0
    if isinstance(v, bool):
        raise OTLPError(f"{what} must be an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:
            return int(v)
        except ValueError:
            pass
    if isinstance(v, float) and v.is_integer():
        return int(v)
    raise OTLPError(f"{what} must be an integer, got {v!r}")


def _json_value(v: Any) -> Any:
    if not isinstance(v, dict):
        return v
    for key in ("stringValue", "string_value"):
        if key in v:
            return v[key]
    for key in ("intValue", "int_value"):
        if key in v:
            return _json_int(v[key], "intValue")
    for key in ("doubleValue", "double_value"):
        if key in v:
            x = v[key]
            return float(x) if isinstance(x, int | float | str) and not isinstance(x, bool) else x
    for key in ("boolValue", "bool_value"):
        if key in v:
            return bool(v[key])
    arr = _get(v, "arrayValue", "array_value")
    if isinstance(arr, dict):
        return [_json_value(x) for x in arr.get("values") or ()]
    kvl = _get(v, "kvlistValue", "kvlist_value")
    if isinstance(kvl, dict):
        return _json_attrs(kvl.get("values"))
    b = _get(v, "bytesValue", "bytes_value")
    if b is not None:
        return b
    return None


def _json_attrs(kvs: Any) -> dict[str, Any]:
    if kvs is None:
        return {}
    if not isinstance(kvs, list):
        raise OTLPError("attributes must be an array of {key, value}")
    out: dict[str, Any] = {}
    for kv in kvs:
        if not isinstance(kv, dict) or not isinstance(kv.get("key"), str):
            raise OTLPError("attributes must be an array of {key, value}")
        out[kv["key"]] = _json_value(kv.get("value"))
    return out


def _json_id(v: Any, nbytes: int) -> str | None:
    """A hex id as OTLP/JSON sends it (base64, proto3's default, is accepted too)."""
    if not isinstance(v, str) or not v:
        return None
    if len(v) == 2 * nbytes:
        try:
            bytes.fromhex(v)
            return v.lower()
        except ValueError:
            pass
    try:
        raw = base64.b64decode(v, validate=True)
    except ValueError:
        return None
    return raw.hex() if len(raw) == nbytes else None


def _decode_json(raw: bytes) -> DecodedExport:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise OTLPError(f"body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OTLPError("body must be a JSON object (ExportTraceServiceRequest)")
    out = DecodedExport([], json=True)
    rss = _get(doc, "resourceSpans", "resource_spans") or []
    if not isinstance(rss, list):
        raise OTLPError("resourceSpans must be an array")
    for rs in rss:
        if not isinstance(rs, dict):
            raise OTLPError("resourceSpans[] must be objects")
        resource = rs.get("resource") or {}
        if not isinstance(resource, dict):
            raise OTLPError("resource must be an object")
        spans: list[OtelSpan] = []
        for ss in _get(rs, "scopeSpans", "scope_spans") or []:
            if not isinstance(ss, dict) or not isinstance(ss.get("spans") or [], list):
                raise OTLPError("scopeSpans[] must be objects with a spans array")
            scope_obj = ss.get("scope")
            scope = scope_obj.get("name") if isinstance(scope_obj, dict) else None
            for s in ss.get("spans") or []:
                if not isinstance(s, dict):
                    raise OTLPError("spans[] must be objects")
                sp = _json_span(s, scope, out)
                if sp is not None:
                    spans.append(sp)
        if spans:
            out.resources.append(ResourceSpans(_json_attrs(resource.get("attributes")), spans))
    return out


def _json_span(s: dict[str, Any], scope: str | None, out: DecodedExport) -> OtelSpan | None:
    name = s.get("name")
    name = name if isinstance(name, str) else ""
    tid = _json_id(_get(s, "traceId", "trace_id"), 16)
    sid = _json_id(_get(s, "spanId", "span_id"), 8)
    if tid is None or sid is None or tid == _ZERO_TRACE or sid == _ZERO_SPAN:
        out.rejected += 1
        _note(out, f"span {name!r}: invalid traceId or spanId")
        return None
    start = _json_int(_get(s, "startTimeUnixNano", "start_time_unix_nano"), "startTimeUnixNano")
    if not start:
        out.rejected += 1
        _note(out, f"span {name!r}: missing startTimeUnixNano")
        return None
    parent = _json_id(_get(s, "parentSpanId", "parent_span_id"), 8)
    kind = s.get("kind", 0)
    kind = _SPAN_KIND_NAMES.get(kind, 0) if isinstance(kind, str) else _json_int(kind, "kind")
    raw_status = s.get("status")
    status: dict[str, Any] = raw_status if isinstance(raw_status, dict) else {}
    code = status.get("code", 0)
    code = _STATUS_NAMES.get(code, 0) if isinstance(code, str) else _json_int(code, "status.code")
    events = []
    for e in s.get("events") or []:
        if isinstance(e, dict):
            events.append(
                OtelEvent(
                    str(e.get("name") or ""),
                    _json_int(_get(e, "timeUnixNano", "time_unix_nano"), "timeUnixNano"),
                    _json_attrs(e.get("attributes")),
                )
            )
    links = [
        {
            "trace_id": _json_id(_get(ln, "traceId", "trace_id"), 16),
            "span_id": _json_id(_get(ln, "spanId", "span_id"), 8),
            "attributes": _json_attrs(ln.get("attributes")),
        }
        for ln in s.get("links") or []
        if isinstance(ln, dict)
    ]
    return OtelSpan(
        trace_id=tid,
        span_id=sid,
        parent_span_id=parent if parent and parent != _ZERO_SPAN else None,
        name=name,
        kind=kind,
        start_ns=start,
        end_ns=_json_int(_get(s, "endTimeUnixNano", "end_time_unix_nano"), "endTimeUnixNano"),
        attributes=_json_attrs(s.get("attributes")),
        events=events,
        links=links,
        status_code=code,
        status_message=str(status.get("message") or ""),
        scope=scope if isinstance(scope, str) and scope else None,
    )


def encode_response(rejected: int, message: str, as_json: bool) -> bytes:
    """An ExportTraceServiceResponse (with partial_success when spans were rejected)."""
    if as_json:
        if not rejected:
            return b"{}"
        return orjson.dumps({"partialSuccess": {"rejectedSpans": str(rejected), "errorMessage": message}})
    resp = ExportTraceServiceResponse()
    if rejected:
        resp.partial_success.rejected_spans = rejected
        resp.partial_success.error_message = message
    return resp.SerializeToString()  # type: ignore[no-any-return]


# -- mapping ----------------------------------------------------------------------------------------


def to_records(export: DecodedExport, origin_for: Callable[[dict[str, Any]], Origin]) -> list[SpanRecord]:
    """Every decoded span as a SpanRecord; ``origin_for`` names the project of each resource."""
    out: list[SpanRecord] = []
    for rs in export.resources:
        origin = origin_for(rs.attributes)
        resource = {k: v for k, v in rs.attributes.items() if k != "keel.project"}
        for sp in rs.spans:
            out.append(to_record(sp, resource, origin))
    return out


def _first(a: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for k in keys:
        v = a.get(k)
        if v is not None and v != "":
            return v
    return None


def _int(v: Any) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return None


def _float(v: Any) -> float | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def _str(v: Any, limit: int) -> str | None:
    if v is None or v == "":
        return None
    s = v if isinstance(v, str) else str(v)
    return s[:limit]


def _maybe_json(v: Any) -> Any:
    """Parse a JSON-looking string (semconv puts structured values in string attributes)."""
    if isinstance(v, str) and v[:1] in ("{", "["):
        try:
            return orjson.loads(v)
        except orjson.JSONDecodeError:
            return v
    return v


def _kind(a: dict[str, Any], sp: OtelSpan) -> str:
    oi = a.get("openinference.span.kind")
    if isinstance(oi, str):
        k = _OI_KINDS.get(oi.upper())
        if k:
            return k
    op = a.get("gen_ai.operation.name")
    if isinstance(op, str):
        k = _GENAI_OPS.get(op.lower())
        if k:
            return k
    if "gen_ai.tool.name" in a or "tool.name" in a:
        return "tool"
    if "gen_ai.agent.name" in a or "agent.name" in a:
        return "agent"
    if "embedding.model_name" in a:
        return "embedding"
    if (
        "gen_ai.request.model" in a
        or "llm.model_name" in a
        or "gen_ai.system" in a
        or "gen_ai.provider.name" in a
    ):
        return "llm"
    if "gen_ai.retrieval.query.text" in a or any(k.startswith("retrieval.documents.") for k in a):
        return "retriever"
    if sp.end_ns and sp.end_ns <= sp.start_ns:
        return "event"
    return "chain"


def _indexed(a: dict[str, Any], prefix: str, used: set[str] | None) -> list[dict[str, Any]]:
    """Reassemble flattened list attributes: ``prefix.N.rest`` → [{rest: value}, ...] in index order."""
    items: dict[int, dict[str, Any]] = {}
    n = len(prefix)
    for k, v in a.items():
        if not k.startswith(prefix):
            continue
        idx, _, rest = k[n:].partition(".")
        if not idx.isdigit() or not rest:
            continue
        items.setdefault(int(idx), {})[rest] = v
        if used is not None:
            used.add(k)
    return [items[i] for i in sorted(items)]


def _arguments(v: Any) -> str:
    return v if isinstance(v, str) else orjson.dumps(v).decode()


def _genai_message(m: Any, default_role: str = "user") -> dict[str, Any]:
    """A GenAI semconv message ({role, parts[]}) in OpenAI chat shape; chat-shaped ones pass through."""
    if not isinstance(m, dict):
        return {"role": default_role, "content": m if isinstance(m, str) else orjson.dumps(m).decode()}
    parts = m.get("parts")
    if not isinstance(parts, list):
        return m
    out: dict[str, Any] = {"role": m.get("role") or default_role}
    texts: list[str] = []
    other: list[Any] = []
    calls: list[dict[str, Any]] = []
    for p in parts:
        if not isinstance(p, dict):
            texts.append(str(p))
            continue
        t = p.get("type")
        if t == "text":
            texts.append(str(p.get("content", "")))
        elif t == "tool_call":
            calls.append(
                {
                    "id": p.get("id"),
                    "type": "function",
                    "function": {"name": p.get("name"), "arguments": _arguments(p.get("arguments", {}))},
                }
            )
        elif t == "tool_call_response":
            out["role"] = "tool"
            out["tool_call_id"] = p.get("id")
            resp = p.get("response")
            texts.append(resp if isinstance(resp, str) else orjson.dumps(resp).decode())
        else:
            other.append(p)
    if other:
        out["content"] = [{"type": "text", "text": t} for t in texts] + other
    else:
        out["content"] = "\n".join(texts) if texts else None
    if calls:
        out["tool_calls"] = calls
    if m.get("name"):
        out["name"] = m["name"]
    if m.get("finish_reason"):
        out["finish_reason"] = m["finish_reason"]
    return out


def _oi_message(item: dict[str, Any]) -> dict[str, Any]:
    """An OpenInference flattened message (``message.role``, ``message.content`` ...) in OpenAI shape."""
    m: dict[str, Any] = {"role": item.get("message.role") or "user"}
    content = item.get("message.content")
    if content is None:
        parts: list[dict[str, Any]] = []
        for p in _indexed(item, "message.contents.", None):
            ptype = p.get("message_content.type", "text")
            if ptype == "image":
                parts.append(
                    {"type": "image_url", "image_url": {"url": p.get("message_content.image.image.url")}}
                )
            else:
                parts.append({"type": "text", "text": p.get("message_content.text")})
        content = parts or None
    m["content"] = content
    calls = [
        {
            "id": c.get("tool_call.id"),
            "type": "function",
            "function": {
                "name": c.get("tool_call.function.name"),
                "arguments": c.get("tool_call.function.arguments"),
            },
        }
        for c in _indexed(item, "message.tool_calls.", None)
    ]
    if calls:
        m["tool_calls"] = calls
    for src, dst in (("message.name", "name"), ("message.tool_call_id", "tool_call_id")):
        if item.get(src):
            m[dst] = item[src]
    return m


def _flat_message(item: dict[str, Any]) -> dict[str, Any]:
    """An OpenLLMetry-style flattened message (``gen_ai.prompt.N.role`` / ``.content`` ...)."""
    m: dict[str, Any] = {"role": item.get("role") or "user", "content": _maybe_json(item.get("content"))}
    calls = [
        {
            "id": c.get("id"),
            "type": "function",
            "function": {"name": c.get("name"), "arguments": c.get("arguments")},
        }
        for c in _indexed(item, "tool_calls.", None)
    ]
    if calls:
        m["tool_calls"] = calls
    for k in ("tool_call_id", "name", "finish_reason"):
        if item.get(k):
            m[k] = item[k]
    return m


def _messages_from(v: Any) -> list[dict[str, Any]] | None:
    v = _maybe_json(v)
    if isinstance(v, dict) and isinstance(v.get("messages"), list):
        v = v["messages"]
    if isinstance(v, list):
        return [_genai_message(m) for m in v]
    return None


def _system_message(v: Any) -> dict[str, Any] | None:
    v = _maybe_json(v)
    if isinstance(v, str):
        return {"role": "system", "content": v}
    if isinstance(v, list):
        return _genai_message({"role": "system", "parts": v}, "system")
    return None


def _choices(msgs: list[dict[str, Any]]) -> dict[str, Any]:
    choices = []
    for i, m in enumerate(msgs):
        m = dict(m)
        fr = m.pop("finish_reason", None)
        m.setdefault("role", "assistant")
        choices.append({"index": i, "message": m, "finish_reason": fr})
    return {"choices": choices}


def _documents(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    docs = []
    for d in items:
        doc = {k.removeprefix("document."): v for k, v in d.items()}
        if "metadata" in doc:
            doc["metadata"] = _maybe_json(doc["metadata"])
        docs.append(doc)
    return docs


def _value(a: dict[str, Any], key: str, used: set[str]) -> Any:
    """``input.value`` / ``output.value``, parsed when its mime type says JSON."""
    v = a.get(key)
    if v is None:
        return None
    used.add(key)
    mime = a.get(key.replace(".value", ".mime_type"))
    if mime == "application/json" or (mime is None and isinstance(v, str)):
        return _maybe_json(v)
    return v


def _event_messages(events: list[OtelEvent], used_events: set[int]) -> tuple[list[Any], list[Any]]:
    """Messages recorded as span events by older GenAI instrumentations."""
    ins: list[Any] = []
    outs: list[Any] = []
    for i, e in enumerate(events):
        ea = e.attributes
        if e.name == "gen_ai.content.prompt" and "gen_ai.prompt" in ea:
            ins.extend(
                _messages_from(ea["gen_ai.prompt"]) or [{"role": "user", "content": ea["gen_ai.prompt"]}]
            )
        elif e.name == "gen_ai.content.completion" and "gen_ai.completion" in ea:
            msgs = _messages_from(ea["gen_ai.completion"])
            outs.extend(msgs or [{"role": "assistant", "content": ea["gen_ai.completion"]}])
        elif e.name.startswith("gen_ai.") and e.name.endswith(".message") and e.name.count(".") == 2:
            role = e.name.split(".")[1]
            msg: dict[str, Any] = {"role": role, "content": _maybe_json(ea.get("content"))}
            if ea.get("tool_calls") is not None:
                msg["tool_calls"] = _maybe_json(ea["tool_calls"])
            if ea.get("id") and role == "tool":
                msg["tool_call_id"] = ea["id"]
            ins.append(msg)
        elif e.name == "gen_ai.choice":
            m = _maybe_json(ea.get("message"))
            msg = dict(m) if isinstance(m, dict) else {"role": "assistant", "content": m}
            if ea.get("finish_reason"):
                msg["finish_reason"] = ea["finish_reason"]
            outs.append(msg)
        else:
            continue
        used_events.add(i)
    return ins, outs


def _io(a: dict[str, Any], sp: OtelSpan, kind: str, used: set[str], used_events: set[int]) -> tuple[Any, Any]:
    """The span's input and output, normalised; the attributes they came from are added to ``used``."""
    src = a
    for e in sp.events:  # newer semconv may put the messages on one event instead of the span
        if e.name == "gen_ai.client.inference.operation.details":
            src = {**e.attributes, **a}
    inp: Any = None
    out: Any = None
    msgs: list[dict[str, Any]] | None = None
    outs: list[dict[str, Any]] | None = None

    if "gen_ai.input.messages" in src:
        msgs = _messages_from(src["gen_ai.input.messages"])
        used.add("gen_ai.input.messages")
    if "gen_ai.system_instructions" in src:
        sysm = _system_message(src["gen_ai.system_instructions"])
        used.add("gen_ai.system_instructions")
        if sysm is not None:
            msgs = [sysm, *(msgs or [])]
    if "gen_ai.output.messages" in src:
        outs = _messages_from(src["gen_ai.output.messages"])
        used.add("gen_ai.output.messages")
    if msgs is None:
        items = _indexed(a, "llm.input_messages.", used)
        if items:
            msgs = [_oi_message(m) for m in items]
    if outs is None:
        items = _indexed(a, "llm.output_messages.", used)
        if items:
            outs = [_oi_message(m) for m in items]
    if msgs is None:
        items = _indexed(a, "gen_ai.prompt.", used)
        if items:
            msgs = [_flat_message(m) for m in items]
        elif "gen_ai.prompt" in a:
            msgs = _messages_from(a["gen_ai.prompt"]) or [{"role": "user", "content": a["gen_ai.prompt"]}]
            used.add("gen_ai.prompt")
    if outs is None:
        items = _indexed(a, "gen_ai.completion.", used)
        if items:
            outs = [{**_flat_message(m), "role": m.get("role") or "assistant"} for m in items]
        elif "gen_ai.completion" in a:
            outs = _messages_from(a["gen_ai.completion"]) or [
                {"role": "assistant", "content": a["gen_ai.completion"]}
            ]
            used.add("gen_ai.completion")
    if (msgs is None or outs is None) and sp.events:
        ev_in, ev_out = _event_messages(sp.events, used_events)
        if msgs is None and ev_in:
            msgs = ev_in
        if outs is None and ev_out:
            outs = ev_out

    if msgs is not None:
        inp = {"messages": msgs}
        params = _maybe_json(a.get("llm.invocation_parameters"))
        if isinstance(params, dict):
            inp = {**params, **inp}
        tools = _maybe_json(a.get("gen_ai.tool.definitions"))
        if isinstance(tools, list):
            inp["tools"] = tools
    if outs is not None:
        out = _choices(outs)

    if kind == "tool":
        if inp is None and "gen_ai.tool.call.arguments" in a:
            inp = _maybe_json(a["gen_ai.tool.call.arguments"])
            used.add("gen_ai.tool.call.arguments")
        if out is None and "gen_ai.tool.call.result" in a:
            out = _maybe_json(a["gen_ai.tool.call.result"])
            used.add("gen_ai.tool.call.result")
    elif kind == "retriever":
        docs = _indexed(a, "retrieval.documents.", used)
        if docs:
            out = {"documents": _documents(docs)}
        elif "gen_ai.retrieval.documents" in a:
            out = {"documents": _maybe_json(a["gen_ai.retrieval.documents"])}
            used.add("gen_ai.retrieval.documents")
        if inp is None and "gen_ai.retrieval.query.text" in a:
            inp = a["gen_ai.retrieval.query.text"]
            used.add("gen_ai.retrieval.query.text")
    elif kind == "reranker":
        docs_in = _indexed(a, "reranker.input_documents.", used)
        docs_out = _indexed(a, "reranker.output_documents.", used)
        if docs_in or "reranker.query" in a:
            inp = {"query": a.get("reranker.query"), "documents": _documents(docs_in)}
        if docs_out:
            out = {"documents": _documents(docs_out)}
    elif kind == "embedding":
        texts = [e.get("embedding.text") for e in _indexed(a, "embedding.embeddings.", None)]
        if any(t is not None for t in texts):
            inp = {"input": texts}
            used.update(
                k for k in a if k.startswith("embedding.embeddings.") and k.endswith(".embedding.text")
            )

    if inp is None:
        inp = _value(a, "input.value", used)
    if out is None:
        out = _value(a, "output.value", used)
    return inp, out


def _tags(a: dict[str, Any]) -> list[str]:
    tags: list[str] = []
    for key in ("tag.tags", "keel.tags"):
        v = _maybe_json(a.get(key))
        if isinstance(v, str):
            v = [t.strip() for t in v.split(",")]
        if isinstance(v, list):
            for t in v:
                s = _str(t, _TAG)
                if s and s not in tags:
                    tags.append(s)
    return tags[:_MAX_TAGS]


def _error(sp: OtelSpan, a: dict[str, Any]) -> str:
    if sp.status_message:
        return sp.status_message
    for e in sp.events:
        if e.name == "exception":
            etype, emsg = e.attributes.get("exception.type"), e.attributes.get("exception.message")
            if etype or emsg:
                return f"{etype}: {emsg}" if etype and emsg else str(etype or emsg)
    return str(a.get("error.type") or "error")


def to_record(sp: OtelSpan, resource: dict[str, Any], origin: Origin) -> SpanRecord:
    """Map one OTLP span onto keel's span record (the trace writer prices it when it is an LLM call)."""
    a = sp.attributes
    kind = _kind(a, sp)
    used: set[str] = set()
    used_events: set[int] = set()
    inp, out = _io(a, sp, kind, used, used_events)

    requested = _str(_first(a, _REQUEST_MODEL), _MODEL)
    model = _str(a.get("gen_ai.response.model"), _MODEL) or requested
    usage = Usage(
        input_tokens=_int(_first(a, _INPUT_TOKENS)),
        output_tokens=_int(_first(a, _OUTPUT_TOKENS)),
        cached_input_tokens=_int(_first(a, _CACHED_TOKENS)),
        reasoning_tokens=_int(_first(a, _REASONING_TOKENS)),
    )
    metadata = _maybe_json(a.get("metadata"))
    if isinstance(metadata, dict):
        used.add("metadata")
    else:
        metadata = {}
    prompt_version = _int(_first(a, ("keel.prompt.version", "gen_ai.prompt.version")))
    ttft_s = _float(a.get("gen_ai.response.time_to_first_chunk"))
    status_code = _int(_first(a, ("http.response.status_code", "http.status_code")))

    attrs = {k: v for k, v in a.items() if k not in used} if used else dict(a)
    if sp.scope:
        attrs["otel.scope"] = sp.scope
    if sp.kind in _SPAN_KINDS:
        attrs["otel.span_kind"] = _SPAN_KINDS[sp.kind]
    events = [e for i, e in enumerate(sp.events) if i not in used_events]
    if events:
        attrs["otel.events"] = [
            {"name": e.name, "time_unix_nano": e.time_ns, "attributes": e.attributes} for e in events
        ]
    if sp.links:
        attrs["otel.links"] = sp.links
    if resource:
        attrs["otel.resource"] = resource

    start = sp.start_ns / 1e9
    end = max(sp.end_ns, sp.start_ns) / 1e9
    error = sp.status_code == 2
    return SpanRecord(
        trace_id=sp.trace_id,
        span_id=sp.span_id,
        parent_span_id=sp.parent_span_id,
        name=(sp.name or kind)[:_NAME],
        kind=kind,
        start_time=start,
        end_time=end,
        status="error" if error else "ok",
        error=_error(sp, a) if error else None,
        status_code=status_code,
        project_id=origin.project_id,
        key_id=origin.key_id,
        team_id=origin.team_id,
        model=model,
        requested_model=requested,
        provider=_str(_first(a, _PROVIDER_KEYS), _PROVIDER),
        usage=usage,
        cost_usd=_float(_first(a, _COST_KEYS)),
        ttft_ms=None if ttft_s is None else ttft_s * 1000.0,
        user=_str(_first(a, _USER_KEYS), _USER) or origin.end_user,
        session_id=_str(_first(a, _SESSION_KEYS), _USER),
        prompt_name=_str(_first(a, ("keel.prompt.name", "gen_ai.prompt.name")), _NAME),
        prompt_version=prompt_version,
        tags=_tags(a),
        metadata=metadata,
        input=inp,
        output=out,
        attributes=attrs,
    )
