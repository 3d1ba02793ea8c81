"""keel's client SDK: trace your application into keel, and call models through keel's gateway.

    import keel.sdk as keel

    keel.init()                      # KEEL_BASE_URL, KEEL_API_KEY

    @keel.observe(kind="tool")
    def search(query: str) -> list[str]: ...

Spans go to keel's ``/v1/traces`` over OTLP/HTTP from a background thread with a bounded queue:
the application never waits on the network and never sees an SDK exception. See docs/sdk.md.
Depends only on OpenTelemetry and httpx (and ``openai`` for :func:`openai_client`).
"""

from keel.sdk import prompts as prompts  # keel.sdk.prompts.get(name, label=...)
from keel.sdk._context import set_metadata, set_session, set_tags, set_user
from keel.sdk._export import ExportStats
from keel.sdk._observe import KINDS, SpanHandle, SpanScope, current_span, observe, span
from keel.sdk._openai import async_openai_client, gateway_headers, openai_client, wrap_openai
from keel.sdk._runtime import Config, flush, init, shutdown, stats

__all__ = [
    "KINDS",
    "Config",
    "ExportStats",
    "SpanHandle",
    "SpanScope",
    "async_openai_client",
    "current_span",
    "flush",
    "gateway_headers",
    "init",
    "observe",
    "openai_client",
    "set_metadata",
    "set_session",
    "set_tags",
    "set_user",
    "shutdown",
    "span",
    "stats",
    "wrap_openai",
]
