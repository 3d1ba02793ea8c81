"""The `local` provider: SmolLM2-135M-Instruct run in-process by llama.cpp (the `local` extra)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

from keel.providers.local import find_model_file, local_available
from tests.conftest import Keel, free_port


def test_model_file_ships_in_the_package() -> None:
    path = find_model_file()
    assert (
        local_available() and path is not None and path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    )


def test_local_chat_non_stream_and_stream(keel: Keel) -> None:
    c = openai.OpenAI(base_url=keel.url + "/v1", api_key=keel.master_key, max_retries=0)
    raw = c.chat.completions.with_raw_response.create(
        model="local", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
    )
    resp = raw.parse()
    assert resp.choices[0].message.content and resp.usage and resp.usage.completion_tokens > 0
    trace = keel.wait_for_trace(raw.headers["x-keel-trace-id"])
    span = trace["spans"][0]
    assert span["provider"] == "local" and span["input_tokens"] > 0 and span["cost_usd"] == 0.0
    chunks = list(
        c.chat.completions.create(
            model="local",
            messages=[{"role": "user", "content": "Count to three."}],
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip() and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_local_context_overflow_is_400(keel: Keel) -> None:
    c = openai.OpenAI(base_url=keel.url + "/v1", api_key=keel.master_key, max_retries=0)
    try:
        c.chat.completions.create(
            model="local", messages=[{"role": "user", "content": "word " * 5000}], max_tokens=8
        )
    except openai.BadRequestError as exc:
        assert "context" in str(exc)
    else:
        raise AssertionError("an over-long prompt must be refused with 400")


def test_serve_with_no_config_answers_model_local(tmp_path: Path) -> None:
    """What `make serve` does on a fresh clone: no config, SQLite in ./.keel, the local model."""
    port = free_port()
    env = {**os.environ, "KEEL_PORT": str(port), "KEEL_MASTER_KEY": "sk-fresh-master"}
    env.pop("KEEL_CONFIG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel.cli", "serve"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        c = openai.OpenAI(base_url=url + "/v1", api_key="sk-fresh-master", max_retries=0)
        assert [m.id for m in c.models.list()] == ["local", "all-minilm-l6-v2"]
        resp = c.chat.completions.create(
            model="local", messages=[{"role": "user", "content": "Hi!"}], max_tokens=12
        )
        assert resp.choices[0].message.content
        assert (tmp_path / ".keel" / "keel.db").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
