"""Encode finished OpenTelemetry spans as an OTLP/HTTP protobuf ``ExportTraceServiceRequest``.

``opentelemetry-exporter-otlp-proto-common`` would do this, but it is not a dependency of the
OpenTelemetry SDK, so the SDK stays light by encoding with the ``opentelemetry-proto`` classes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Status
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

__all__ = ["encode_spans"]

# OTLP numbers span kinds from 1 (INTERNAL); the API's enum starts at 0
_KIND_OFFSET = 1
_STATUS = {StatusCode.UNSET: 0, StatusCode.OK: 1, StatusCode.ERROR: 2}
# W3C trace flags in bits 0-7; bit 8 says whether the parent's remoteness is known, bit 9 that it is
_HAS_IS_REMOTE = 0x100
_IS_REMOTE = 0x200


def _any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, Sequence):
        return AnyValue(array_value=ArrayValue(values=[_any_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def _attributes(attrs: Mapping[str, Any] | None) -> list[KeyValue]:
    if not attrs:
        return []
    return [KeyValue(key=k, value=_any_value(v)) for k, v in attrs.items()]


def _span(span: ReadableSpan) -> PbSpan:
    ctx = span.get_span_context()
    assert ctx is not None  # a finished SDK span always has one
    out = PbSpan(
        trace_id=ctx.trace_id.to_bytes(16, "big"),
        span_id=ctx.span_id.to_bytes(8, "big"),
        trace_state=ctx.trace_state.to_header() if ctx.trace_state else "",
        name=span.name,
        kind=span.kind.value + _KIND_OFFSET,  # type: ignore[arg-type]
        start_time_unix_nano=span.start_time or 0,
        end_time_unix_nano=span.end_time or 0,
        attributes=_attributes(span.attributes),
        dropped_attributes_count=span.dropped_attributes,
        dropped_events_count=span.dropped_events,
        dropped_links_count=span.dropped_links,
        status=Status(code=_STATUS[span.status.status_code], message=span.status.description or ""),  # type: ignore[arg-type]
        flags=int(ctx.trace_flags)
        | _HAS_IS_REMOTE
        | (_IS_REMOTE if span.parent and span.parent.is_remote else 0),
    )
    if span.parent is not None:
        out.parent_span_id = span.parent.span_id.to_bytes(8, "big")
    for event in span.events:
        out.events.append(
            PbSpan.Event(
                time_unix_nano=event.timestamp or 0,
                name=event.name,
                attributes=_attributes(event.attributes),
            )
        )
    for link in span.links:
        out.links.append(
            PbSpan.Link(
                trace_id=link.context.trace_id.to_bytes(16, "big"),
                span_id=link.context.span_id.to_bytes(8, "big"),
                attributes=_attributes(link.attributes),
            )
        )
    return out


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """Serialise ``spans`` as one OTLP request, grouped by resource and instrumentation scope."""
    by_resource: dict[int, tuple[Any, dict[tuple[str, str], list[PbSpan]]]] = {}
    for span in spans:
        resource = span.resource
        entry = by_resource.setdefault(id(resource), (resource, {}))
        scope = span.instrumentation_scope
        key = (scope.name, scope.version or "") if scope is not None else ("", "")
        entry[1].setdefault(key, []).append(_span(span))
    request = ExportTraceServiceRequest()
    for resource, scopes in by_resource.values():
        rs = ResourceSpans(resource=PbResource(attributes=_attributes(resource.attributes)))
        for (name, version), pb_spans in scopes.items():
            rs.scope_spans.append(
                ScopeSpans(scope=InstrumentationScope(name=name, version=version), spans=pb_spans)
            )
        request.resource_spans.append(rs)
    return bytes(request.SerializeToString())
