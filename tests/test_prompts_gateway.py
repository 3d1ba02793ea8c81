"""Gateway-side prompts, end to end: push, label, call by name, canary 10 %, rollback, breakdown by version.

The official openai SDK is the client; the mock upstream answers "Mock reply to: <last user message>",
so each reply says which version rendered it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import make_keel

pytestmark = pytest.mark.timeout(600)


def sdk(keel: Any, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=keel.url + "/v1", api_key=key or keel.master_key, max_retries=0, timeout=30)


def push(keel: Any, name: str, marker: str, **kw: Any) -> dict[str, Any]:
    body = {
        "name": name,
        "type": "chat",
        "messages": [
            {"role": "system", "content": "You answer support questions about {{ product }}."},
            {"role": "user", "content": marker + ": {{ question }}"},
        ],
        "variables": {"product": {"type": "string", "default": "keel"}, "question": "string"},
        "config": {"model": "gpt-4o-mini", "temperature": 0.3, "max_tokens": 64},
        **kw,
    }
    r = keel.http.post("/api/prompts", json=body)
    assert r.status_code in (200, 201), r.text
    return dict(r.json())


def call(client: openai.OpenAI, name: str, user: str | None = None, **kw: Any) -> tuple[str, str]:
    """One call by prompt name; returns (reply, trace id)."""
    raw = client.chat.completions.with_raw_response.create(
        model=f"prompt:{name}",
        messages=[],
        extra_body={"prompt_variables": {"question": "where is my order?"}, **kw.pop("extra_body", {})},
        **({"user": user} if user else {}),
        **kw,
    )
    return raw.parse().choices[0].message.content or "", raw.headers["x-keel-trace-id"]


def version_of(reply: str) -> int:
    assert reply.startswith("Mock reply to: V"), reply
    return int(reply.removeprefix("Mock reply to: V").split(":", 1)[0])


def wait_usage(keel: Any, name: str, total: int, timeout: float = 60.0) -> dict[str, int]:
    """Requests per version of ``name`` from /api/usage?group_by=prompt_version, once all are written."""
    deadline = time.monotonic() + timeout
    while True:
        rows = keel.http.get("/api/usage", params={"group_by": "prompt_version"}).json()["data"]
        mine = {r["group"]: r["requests"] for r in rows if r["group"] and r["group"].startswith(name + ":")}
        if sum(mine.values()) >= total or time.monotonic() > deadline:
            return mine
        time.sleep(0.2)


def test_done_when_push_label_call_canary_rollback(keel: Any) -> None:
    name = f"support-answer-{uuid.uuid4().hex[:6]}"
    push(keel, name, "V1", labels=["production"])
    client = sdk(keel)

    # called through the gateway by name: rendered, the version's config applied, traced with name + version
    reply, tid = call(client, name, user="alice")
    assert reply == "Mock reply to: V1: where is my order?"
    t = keel.wait_for_trace(tid)
    assert (t["prompt_name"], t["prompt_version"]) == (name, 1)
    span = t["spans"][0]
    assert (span["prompt_name"], span["prompt_version"]) == (name, 1)
    assert span["requested_model"] == "gpt-4o-mini"
    assert span["input"]["temperature"] == 0.3 and span["input"]["max_tokens"] == 64
    assert span["input"]["messages"][0]["content"] == "You answer support questions about keel."

    # a new version canaried at 10 %, sticky per end user
    push(keel, name, "V2")
    r = keel.http.put(
        f"/api/prompts/{name}/labels/production",
        json={"split": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]},
    )
    assert r.status_code == 200, r.text
    users = [f"user-{i}" for i in range(2000)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda u: version_of(call(client, name, user=u)[0]), users))
    share = Counter(got)[2] / len(got)
    assert 0.07 <= share <= 0.13, share
    first = dict(zip(users, got, strict=True))
    again = [u for u in users[:100]] + [u for u in users if first[u] == 2][:50]
    with ThreadPoolExecutor(8) as pool:
        repeat = list(pool.map(lambda u: version_of(call(client, name, user=u)[0]), again))
    assert repeat == [first[u] for u in again]  # sticky: every user keeps their version

    # visible in the breakdown by version
    canary_calls = 1 + len(users) + len(again)
    by_version = wait_usage(keel, name, canary_calls)
    assert by_version == {
        f"{name}:1": 1 + Counter(got)[1] + sum(1 for u in again if first[u] == 1),
        f"{name}:2": Counter(got)[2] + sum(1 for u in again if first[u] == 2),
    }
    traces_v2 = keel.http.get(
        "/api/traces", params={"prompt": name, "prompt_version": 2, "limit": 500}
    ).json()
    assert len(traces_v2["data"]) == by_version[f"{name}:2"]
    assert {(t["prompt_name"], t["prompt_version"]) for t in traces_v2["data"]} == {(name, 2)}

    # rolled back by one label move: everyone on version 1 again
    r = keel.http.post(f"/api/prompts/{name}/labels/production/rollback")
    assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["split"] is None
    canaried = [u for u in users if first[u] == 2][:40]
    with ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda u: version_of(call(client, name, user=u)[0]), canaried))
    assert after == [1] * len(canaried)
    by_version = wait_usage(keel, name, canary_calls + len(canaried))
    assert by_version[f"{name}:1"] == 1 + Counter(got)[1] + sum(1 for u in again if first[u] == 1) + len(
        canaried
    )

    m = keel.http.get(f"/api/prompts/{name}/metrics").json()["versions"]
    per = {row["version"]: row for row in m}
    assert per[1]["requests"] == by_version[f"{name}:1"] and per[2]["requests"] == by_version[f"{name}:2"]
    assert per[2]["errors"] == 0 and per[2]["latency_ms_p95"] is not None and per[2]["cost_usd"] > 0

    events = keel.http.get(f"/api/prompts/{name}/history", params={"label": "production"}).json()
    assert [e["action"] for e in events][:2] == ["rollback", "label"]


def test_labels_headers_pins_streams_and_explicit_params(keel: Any) -> None:
    name = f"opts-{uuid.uuid4().hex[:6]}"
    push(keel, name, "V1", labels=["production"])
    push(keel, name, "V2", labels=["staging"])
    client = sdk(keel)
    assert version_of(call(client, name)[0]) == 1
    assert version_of(call(client, name, extra_body={"prompt_label": "staging"})[0]) == 2
    assert version_of(call(client, name, extra_headers={"x-keel-prompt-label": "staging"})[0]) == 2
    assert version_of(call(client, name, extra_body={"prompt_version": 1, "prompt_label": "staging"})[0]) == 1
    assert version_of(call(client, name, extra_body={"prompt_label": "latest"})[0]) == 2

    # explicit request parameters win over the version's config; extra messages are appended
    _, tid = call(client, name, max_tokens=3)
    span = keel.wait_for_trace(tid)["spans"][0]
    assert span["input"]["max_tokens"] == 3 and span["input"]["temperature"] == 0.3
    raw = client.chat.completions.with_raw_response.create(
        model=f"prompt:{name}",
        messages=[{"role": "user", "content": "and a follow-up"}],
        extra_body={"prompt_variables": {"question": "q"}},
    )
    assert raw.parse().choices[0].message.content == "Mock reply to: and a follow-up"

    # naming the prompt in a header: rendered, but the request's own model is used
    raw = client.chat.completions.with_raw_response.create(
        model="cheap",
        messages=[],
        extra_headers={"x-keel-prompt": name},
        extra_body={"prompt_variables": {"question": "hdr"}},
    )
    assert raw.parse().choices[0].message.content == "Mock reply to: V1: hdr"
    t = keel.wait_for_trace(raw.headers["x-keel-trace-id"])
    assert t["spans"][0]["requested_model"] == "cheap" and t["prompt_version"] == 1

    # streaming works the same way
    stream = client.chat.completions.create(
        model=f"prompt:{name}", messages=[], stream=True, extra_body={"prompt_variables": {"question": "s"}}
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    assert text == "Mock reply to: V1: s"


def test_prompt_errors_in_openai_shape(keel: Any) -> None:
    name = f"errs-{uuid.uuid4().hex[:6]}"
    push(keel, name, "V1", labels=["production"])
    client = sdk(keel)
    with pytest.raises(openai.NotFoundError) as nf:
        call(client, f"nope-{name}")
    assert nf.value.status_code == 404 and nf.value.body["code"] == "prompt_not_found"
    tid = nf.value.response.headers["x-keel-trace-id"]
    assert keel.wait_for_trace(tid)["status"] == "error"
    with pytest.raises(openai.NotFoundError) as nf:
        call(client, name, extra_body={"prompt_label": "canary"})
    assert nf.value.body["code"] == "prompt_label_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=f"prompt:{name}", messages=[])
    assert bad.value.status_code == 400 and "missing variable 'question'" in bad.value.body["message"]
    assert bad.value.body["param"] == "prompt_variables.question"
    with pytest.raises(openai.BadRequestError) as bad:
        call(client, name, extra_body={"prompt_variables": {"question": 42}})
    assert "variable 'question' must be a string, got integer" in bad.value.body["message"]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=f"prompt:{name}", messages=[], extra_body={"prompt_variables": [1]}
        )
    assert bad.value.body["param"] == "prompt_variables"

    # a key limited to other models may not reach gpt-4o-mini through a prompt either
    key = keel.http.post("/api/keys", json={"project": "default", "models": ["cheap"]}).json()["key"]
    with pytest.raises(openai.PermissionDeniedError):
        call(sdk(keel, key), name)

    # a prompt without config.model can only be used through the header
    r = keel.http.post(
        "/api/prompts",
        json={"name": f"{name}-nomodel", "type": "text", "template": "T {{ q }}", "labels": ["production"]},
    )
    assert r.status_code == 201
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=f"prompt:{name}-nomodel", messages=[], extra_body={"prompt_variables": {"q": "x"}}
        )
    assert bad.value.body["code"] == "prompt_without_model"


def test_label_move_reaches_another_replica(
    keel: Any, tmp_path: Path, mock_upstream: Any, request: Any
) -> None:
    """A second keel on the same database sees a label move: through Redis at once, else within key_refresh_s."""
    name = f"rep-{uuid.uuid4().hex[:6]}"
    push(keel, name, "V1", labels=["production"])
    push(keel, name, "V2")
    if keel.backend == "sqlite":  # the same SQLite file as the fixture's keel
        tmp_path = Path(keel.app.state.settings.database_url.removeprefix("sqlite:///")).parent
    other, _ = make_keel(keel.backend, tmp_path, mock_upstream, request, key_refresh_s=0.5)
    try:
        client = sdk(type("K", (), {"url": other.url, "master_key": keel.master_key})())
        assert version_of(call(client, name)[0]) == 1
        keel.http.put(f"/api/prompts/{name}/labels/production", json={"version": 2})
        deadline = time.monotonic() + 30
        while version_of(call(client, name)[0]) != 2:
            assert time.monotonic() < deadline, "the other replica never saw the label move"
            time.sleep(0.1)
    finally:
        other.stop()
