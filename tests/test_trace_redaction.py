"""KEEL_TRACE_REDACT_PII: traces are stored with personal data and secrets masked; the upstream sees the request as sent."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import orjson
import pytest

from keel.guardrails.redact import Redactor
from keel.testing import MockProvider
from tests.conftest import BACKENDS, Keel, make_keel

CARD = "4111 1111 1111 1111"
EMAIL = "jane.doe@example.org"
KEY = "sk-proj-Zq81LbU7c3yTpW0a9fK2mN5xx"


@pytest.fixture(scope="module", params=[(b, w) for b in BACKENDS for w in ("process", "thread")])
def k(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, mock_upstream: MockProvider
) -> Iterator[Keel]:
    backend, writer = request.param
    server, app = make_keel(
        backend,
        tmp_path_factory.mktemp("redact"),
        mock_upstream,
        request,
        trace_redact_pii=True,
        trace_writer=writer,
    )
    keel = Keel(server, app, backend)
    yield keel
    keel.http.close()
    server.stop()


def test_stored_bodies_are_masked_but_the_upstream_got_the_original(
    k: Keel, mock_upstream: MockProvider
) -> None:
    text = f"My card is {CARD}, mail me at {EMAIL}; key {KEY}. Order 12345-678 ships v2.3.4."
    c = openai.OpenAI(base_url=k.url + "/v1", api_key=k.master_key, max_retries=0)
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}], max_tokens=30
    )
    # redaction is for what keel keeps, not what it forwards (guardrails do that)
    assert any(text in str(r.json) for r in mock_upstream.requests if r.json)
    trace = k.wait_for_trace(raw.headers["x-keel-trace-id"])
    stored = orjson.dumps(trace["spans"]).decode()
    for secret in (CARD, EMAIL, KEY):
        assert secret not in stored
    msg = trace["spans"][0]["input"]["messages"][0]["content"]
    assert "[CARD]" in msg and "[EMAIL]" in msg and "Order 12345-678 ships v2.3.4." in msg


def test_the_redactor_keeps_structure_and_look_alikes() -> None:
    r = Redactor()
    value: dict[str, Any] = {"a": [f"to {EMAIL}", 5, None, {"b": f"card {CARD}"}], "n": 1.5}
    out = r.redact(value)
    assert out == {"a": ["to [EMAIL]", 5, None, {"b": "card [CARD]"}], "n": 1.5}
    assert (
        r.text("invalid card 4111 1111 1111 1112, build 1.2.3.4-rc")
        == "invalid card 4111 1111 1111 1112, build 1.2.3.4-rc"
    )
