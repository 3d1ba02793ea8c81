"""No secret in an error message, a trace or a log line, even when an upstream echoes the key it got."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import openai
import orjson
import pytest

from keel.config import ModelConfig
from keel.errors import SecretScrubFilter, UpstreamError, scrub_secrets
from tests.conftest import BACKENDS, Keel, free_port, make_keel

UPSTREAM_KEY = "sk-proj-Zq81LbU7c3yTpW0a9fK2mN5"


class EchoingUpstream:
    """An OpenAI-shaped upstream that rejects every key and quotes it back, as real providers do."""

    def __init__(self) -> None:
        class H(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                got = self.headers.get("authorization", "")
                body = orjson.dumps(
                    {"error": {"message": f"Incorrect API key provided: {got}", "code": "invalid_api_key"}}
                )
                self.send_response(401)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", free_port()), H)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def echo() -> Iterator[EchoingUpstream]:
    e = EchoingUpstream()
    yield e
    e.server.shutdown()


@pytest.fixture(scope="module", params=BACKENDS)
def k(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    mock_upstream: Any,
    echo: EchoingUpstream,
) -> Iterator[Keel]:
    models = (
        ModelConfig(
            name="leaky", provider="openai-compatible", model="m", api_base=echo.url, api_key=UPSTREAM_KEY
        ),
    )
    server, app = make_keel(
        request.param, tmp_path_factory.mktemp("nosecrets"), mock_upstream, request, models=models
    )
    keel = Keel(server, app, request.param)
    yield keel
    keel.http.close()
    server.stop()


def test_an_echoed_upstream_key_reaches_neither_the_client_nor_the_trace(
    k: Keel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    c = openai.OpenAI(base_url=k.url + "/v1", api_key=k.master_key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        c.chat.completions.create(model="leaky", messages=[{"role": "user", "content": "hi"}])
    text = err.value.response.text
    assert err.value.status_code == 502 and "Incorrect API key provided" in text
    assert UPSTREAM_KEY not in text and "[redacted]" in text
    trace = k.wait_for_trace(err.value.response.headers["x-keel-trace-id"])
    assert UPSTREAM_KEY not in orjson.dumps(trace).decode()
    assert UPSTREAM_KEY not in caplog.text
    # nor is the keel master key ever echoed in an error
    bad = openai.OpenAI(base_url=k.url + "/v1", api_key="sk-keel-not-a-real-key-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err2:
        bad.models.list()
    assert "sk-keel-not-a-real-key" not in err2.value.response.text


@pytest.mark.parametrize(
    "secret",
    [
        "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv",
        "sk-proj-AbCdEfGhIjKlMnOpQrStUv",
        "ghp_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
        "AKIAABCDEFGHIJKLMNOP",
        "AIzaSyAbCdEfGhIjKlMnOpQrStUvWxYz0123456",
        "xoxb-123456789012-abcdefghijkl",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
    ],
)
def test_scrubbing_known_credential_shapes(secret: str) -> None:
    out = scrub_secrets(f"failed with {secret} here")
    assert secret not in out and "redacted" in out and out.startswith("failed with ")
    assert secret not in UpstreamError(f"upstream said {secret}").message


def test_ordinary_text_is_left_alone() -> None:
    for text in ("model gpt-4o-mini failed", "task-1234 skipped", "sk-short", "a risk-free plan"):
        assert scrub_secrets(text) == text


def test_the_log_filter_scrubs_messages_and_tracebacks() -> None:
    logger = logging.getLogger("keel.test.scrub")
    records: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    h = Capture()
    h.addFilter(SecretScrubFilter())
    logger.addHandler(h)
    try:
        logger.warning("calling with %s", UPSTREAM_KEY)
        try:
            raise RuntimeError(f"boom {UPSTREAM_KEY}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(h)
    joined = "\n".join(records)
    assert UPSTREAM_KEY not in joined and "sk-proj-[redacted]" in joined and "RuntimeError" in joined
