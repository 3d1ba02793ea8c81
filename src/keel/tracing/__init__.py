"""Tracing: trace context, the batching trace writer."""

from keel.tracing.context import new_span_id, new_trace_id, parse_traceparent
from keel.tracing.writer import TraceWriter, WriterStats, span_to_row

__all__ = ["TraceWriter", "WriterStats", "new_span_id", "new_trace_id", "parse_traceparent", "span_to_row"]
