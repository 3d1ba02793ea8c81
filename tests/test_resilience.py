"""Routing, retries, cooldowns and fallbacks against real mock upstreams, on both backends.

Each test builds its own keel (its own deployments and routing policy) in front of dedicated mock
providers, and counts at the mock what keel really sent.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from keel.config import CooldownConfig, ModelConfig, RetryConfig, RoutingConfig
from keel.testing import MockProvider
from tests.conftest import BACKENDS, Keel, make_keel

MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def good() -> Iterator[MockProvider]:
    with MockProvider() as m:
        yield m


@pytest.fixture(scope="module")
def bad() -> Iterator[MockProvider]:
    with MockProvider() as m:
        yield m


@pytest.fixture(autouse=True)
def _clean(good: MockProvider, bad: MockProvider) -> None:
    good.reset()
    bad.reset()


@pytest.fixture(params=BACKENDS)
def build(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, good: MockProvider
) -> Iterator[Any]:
    started: list[Keel] = []

    def _build(models: list[ModelConfig], **routing: Any) -> Keel:
        routing.setdefault("retry", RetryConfig(backoff_base_s=0.01))
        server, app = make_keel(
            request.param,
            tmp_path_factory.mktemp("res"),
            good,
            request,
            models=tuple(models),
            routing=RoutingConfig(**routing),
        )
        k = Keel(server, app, request.param)
        started.append(k)
        return k

    yield _build
    for k in started:
        k.http.close()
        k.server.stop()


def dep(name: str, mock: MockProvider, model: str = "gpt-4o-mini", **kw: Any) -> ModelConfig:
    return ModelConfig(name=name, provider="openai-compatible", model=model, api_base=mock.base_url, **kw)


def client(k: Keel) -> openai.OpenAI:
    return openai.OpenAI(base_url=k.url + "/v1", api_key=k.master_key, max_retries=0)


def chat(k: Keel, model: str, **kw: Any) -> Any:
    return client(k).chat.completions.with_raw_response.create(model=model, messages=MSGS, **kw)  # type: ignore[arg-type]


def spans(k: Keel, raw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    trace = k.wait_for_trace(raw.headers["x-keel-trace-id"])
    root = next(s for s in trace["spans"] if s["kind"] == "llm")
    return root, [s for s in trace["spans"] if s["kind"] == "attempt"]


def test_transient_500_is_retried_on_the_same_deployment(build: Any, good: MockProvider) -> None:
    k = build([dep("m", good, max_retries=2)])
    good.set_fault("500", times=1)
    raw = chat(k, "m")
    assert raw.parse().choices[0].message.content == "Mock reply to: hello"
    assert len(good.requests) == 2
    root, attempts = spans(k, raw)
    assert root["status"] == "ok" and root["attributes"]["keel.attempts"] == 2
    assert [a["status"] for a in attempts] == ["error", "ok"]
    assert (
        attempts[0]["error"].startswith("upstream_error") and attempts[0]["parent_span_id"] == root["span_id"]
    )
    assert (
        'keel_retries_total{deployment="m:openai-compatible:gpt-4o-mini"} 1.0' in k.http.get("/metrics").text
    )


@pytest.mark.parametrize("fault", ["400", "context"])
def test_client_errors_are_never_retried(build: Any, good: MockProvider, fault: str) -> None:
    k = build([dep("m", good, model=f"fault:{fault}", max_retries=3)])
    with pytest.raises(openai.BadRequestError):
        chat(k, "m")
    assert len(good.requests) == 1


@pytest.mark.parametrize("fault", ["500", "reset", "badjson", "slow:5"])
def test_each_fault_falls_back_to_the_next_name(
    build: Any, good: MockProvider, bad: MockProvider, fault: str
) -> None:
    k = build(
        [dep("primary", bad, max_retries=1, timeout_s=0.5), dep("backup", good)],
        fallbacks={"primary": ["backup"]},
    )
    bad.set_fault(fault)
    raw = chat(k, "primary")
    assert raw.parse().choices[0].message.content == "Mock reply to: hello"
    assert len(bad.requests) == 2 and len(good.requests) == 1  # one retry on primary, then the fallback
    root, attempts = spans(k, raw)
    assert root["attributes"]["keel.served_by"] == "backup" and root["requested_model"] == "primary"
    assert [a["attributes"]["keel.model_name"] for a in attempts] == ["primary", "primary", "backup"]
    assert [a["status"] for a in attempts] == ["error", "error", "ok"]
    assert (
        'keel_fallbacks_total{kind="fallbacks",model="primary",to="backup"} 1.0'
        in k.http.get("/metrics").text
    )


def test_429_honours_retry_after_and_surfaces_when_nothing_else_can_answer(
    build: Any, bad: MockProvider
) -> None:
    k = build([dep("m", bad, max_retries=1)])
    bad.set_fault("429:1")
    with pytest.raises(openai.RateLimitError) as exc:
        chat(k, "m")
    assert exc.value.response.headers["retry-after"] == "1"
    sent = bad.requests
    assert len(sent) == 2 and sent[1].time - sent[0].time >= 1.0  # waited out retry-after before retrying


def test_429_moves_to_another_deployment_at_once(build: Any, good: MockProvider, bad: MockProvider) -> None:
    k = build([dep("m", bad, weight=1000, max_retries=3), dep("m", good, weight=0.001)])
    bad.set_fault("429:30")
    raw = chat(k, "m")
    assert raw.parse().choices[0].message.content
    assert len(bad.requests) == 1 and len(good.requests) == 1
    # and the rate-limited deployment is cooling down: the next request goes straight to the other
    chat(k, "m")
    assert len(bad.requests) == 1 and len(good.requests) == 2
    root, _ = spans(k, chat(k, "m"))
    assert any("cooling down" in s["reason"] for s in root["attributes"]["keel.skipped"])


def test_cooldown_takes_a_failing_deployment_out_until_its_probe_succeeds(
    build: Any, good: MockProvider, bad: MockProvider
) -> None:
    k = build(
        [dep("pair", bad, max_retries=0), dep("pair", good, max_retries=0)],
        strategy="priority",  # both tier 1, weighted within: requests hit both
        cooldown=CooldownConfig(allowed_fails=2, window_s=60, cooldown_s=3.0),
        fallbacks={},
    )
    bad.set_fault("500")
    outcomes = []
    for _ in range(30):
        try:
            chat(k, "pair")
            outcomes.append(200)
        except openai.APIStatusError as exc:
            outcomes.append(exc.status_code)
    # exactly `allowed_fails` requests reached the failing deployment; then it left the rotation.
    # The client never noticed: each failure was retried on the healthy deployment of the same name.
    assert len(bad.requests) == 2
    assert outcomes == [200] * 30
    assert (
        'keel_deployment_cooling_down{deployment="pair:openai-compatible:gpt-4o-mini@'
        in k.http.get("/metrics").text
    )
    # after the cooldown one probe goes to it; still failing -> straight back into cooldown
    # (30 requests: the healthy deployment is ordered first at random half the time)
    time.sleep(3.1)
    for _ in range(30):
        try:
            chat(k, "pair")
        except openai.APIStatusError:
            pass
    assert len(bad.requests) == 3
    # healed: the next probe succeeds and it is back in rotation
    bad.set_fault(None)
    time.sleep(3.1)
    for _ in range(30):
        chat(k, "pair")
    assert len(bad.requests) > 5


def test_all_deployments_cooling_down_falls_back_or_fails_with_503(
    build: Any, good: MockProvider, bad: MockProvider
) -> None:
    k = build(
        [
            dep("solo", bad, max_retries=0),
            dep("alone", bad, model="other", max_retries=0),
            dep("backup", good),
        ],
        cooldown=CooldownConfig(allowed_fails=1, window_s=60, cooldown_s=30),
        fallbacks={"solo": ["backup"]},
    )
    bad.set_fault("500")
    chat(k, "solo")  # fails over to backup, and puts solo's deployment into cooldown
    n = len(bad.requests)
    raw = chat(k, "solo")
    assert raw.parse().choices[0].message.content and len(bad.requests) == n  # skipped, fell back
    root, _ = spans(k, raw)
    assert root["attributes"]["keel.served_by"] == "backup"
    with pytest.raises(openai.InternalServerError):
        chat(k, "alone")
    r = httpx.post(
        k.url + "/v1/chat/completions",
        json={"model": "alone", "messages": MSGS},
        headers={"authorization": f"Bearer {k.master_key}"},
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_deployment_available"
    assert 1 <= int(r.headers["retry-after"]) <= 30


def test_context_window_fallbacks_upstream_and_estimated(
    build: Any, good: MockProvider, bad: MockProvider
) -> None:
    k = build(
        [
            dep("small", bad, model="fault:context"),
            dep("tiny", bad, max_input_tokens=5),
            dep("big", good),
            dep("other", good, model="other"),
        ],
        context_window_fallbacks={"small": ["big"], "tiny": ["big"]},
        fallbacks={"small": ["other"]},
    )
    raw = chat(k, "small")
    assert raw.parse().choices[0].message.content
    root, _ = spans(k, raw)
    assert root["attributes"]["keel.served_by"] == "big"
    assert len(bad.requests) == 1  # the upstream said too long; keel did not retry it
    n = len(bad.requests)
    raw = chat(k, "tiny")  # keel's own estimate: never sent to `tiny`
    assert len(bad.requests) == n
    root, _ = spans(k, raw)
    assert root["attributes"]["keel.served_by"] == "big"
    assert "context window" in root["attributes"]["keel.skipped"][0]["reason"]


@pytest.mark.parametrize("fault", ["cut:0", "500", "reset"])
def test_stream_failing_before_the_first_chunk_falls_back_transparently(
    build: Any, good: MockProvider, bad: MockProvider, fault: str
) -> None:
    k = build([dep("primary", bad, max_retries=0), dep("backup", good)], fallbacks={"primary": ["backup"]})
    bad.set_fault(fault)
    with client(k).chat.completions.with_streaming_response.create(
        model="primary", messages=MSGS, stream=True
    ) as raw:  # type: ignore[arg-type]
        tid = raw.headers["x-keel-trace-id"]
        text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    assert text == "Mock reply to: hello"
    trace = k.wait_for_trace(tid)
    root = next(s for s in trace["spans"] if s["kind"] == "llm")
    assert root["status"] == "ok" and root["attributes"]["keel.served_by"] == "backup" and root["ttft_ms"] > 0


def test_stream_cut_after_the_first_chunk_ends_with_an_error_event(
    build: Any, bad: MockProvider, good: MockProvider
) -> None:
    k = build([dep("primary", bad, max_retries=0), dep("backup", good)], fallbacks={"primary": ["backup"]})
    bad.set_fault("cut:3")
    got: list[str] = []
    with pytest.raises(openai.APIError):
        for ch in client(k).chat.completions.create(model="primary", messages=MSGS, stream=True):  # type: ignore[arg-type]
            if ch.choices and ch.choices[0].delta.content:
                got.append(ch.choices[0].delta.content)
    assert got and len(good.requests) == 0  # no fallback once bytes reached the client


def test_stream_idle_timeout(build: Any, bad: MockProvider) -> None:
    k = build([dep("m", bad, max_retries=0, stream_timeout_s=0.3)])
    bad.set_fault("drip:1")
    with pytest.raises(openai.APIError):
        list(client(k).chat.completions.create(model="m", messages=MSGS, stream=True))  # type: ignore[arg-type]


def _served(k: Keel, model: str, n: int) -> Counter[str]:
    got: Counter[str] = Counter()
    for _ in range(n):
        got[chat(k, model).parse().model] += 1
    return got


def test_strategies(build: Any, good: MockProvider) -> None:
    k = build(
        [
            dep("cost", good, model="pricey", input_cost_per_mtok=5, output_cost_per_mtok=15),
            dep("cost", good, model="cheap", input_cost_per_mtok=0.1, output_cost_per_mtok=0.2),
            dep("tiers", good, model="tier2", priority=2, weight=100),
            dep("tiers", good, model="tier1", priority=1),
            dep("fast", good, model="fault:slow:0.15"),
            dep("fast", good, model="quick"),
            dep("weighted", good, model="heavy", weight=50),
            dep("weighted", good, model="light", weight=1),
        ],
        strategies={"cost": "lowest-cost", "tiers": "priority", "fast": "lowest-latency"},
        aliases={"cheapest": "cost"},
    )
    assert _served(k, "cost", 5) == {"cheap": 5}
    assert _served(k, "cheapest", 2) == {"cheap": 2}
    assert _served(k, "tiers", 5) == {"tier1": 5}
    fast = _served(k, "fast", 20)
    assert fast["quick"] >= 15  # both measured once, then the quick one wins
    heavy = _served(k, "weighted", 40)
    assert heavy["heavy"] > heavy["light"]


def test_least_busy_prefers_the_idle_deployment(build: Any, good: MockProvider) -> None:
    import concurrent.futures

    k = build(
        [dep("busy", good, model="fault:slow:1"), dep("busy", good, model="idle")],
        strategies={"busy": "least-busy"},
    )
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(chat, k, "busy") for _ in range(4)]
        time.sleep(0.3)
        served = [chat(k, "busy").parse().model for _ in range(5)]
        [f.result() for f in futures]
    assert served.count("idle") == 5


def test_cooldowns_are_shared_across_replicas(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    good: MockProvider,
    bad: MockProvider,
) -> None:
    if "postgresql" not in BACKENDS:
        pytest.fail("the PostgreSQL + Redis leg is required")
    models = (dep("pair", bad, max_retries=0), dep("pair", good, max_retries=0))
    routing = RoutingConfig(
        cooldown=CooldownConfig(allowed_fails=1, cooldown_s=30), retry=RetryConfig(backoff_base_s=0.01)
    )
    replicas = []
    for i in range(2):
        server, app = make_keel(
            "postgresql", tmp_path_factory.mktemp(f"rep{i}"), good, request, models=models, routing=routing
        )
        replicas.append(Keel(server, app, "postgresql"))
    try:
        a, b = replicas
        bad.set_fault("500")
        for _ in range(10):  # until replica A hits the bad deployment once and cools it down
            try:
                chat(a, "pair")
            except openai.APIStatusError:
                break
        assert len(bad.requests) == 1
        deadline = time.monotonic() + 5
        while b.app.state.gateway.health.available(
            models[0] and b.app.state.gateway.models.by_name["pair"][0].key, time.monotonic()
        )[0]:
            assert time.monotonic() < deadline, "replica B never heard of the cooldown"
            time.sleep(0.05)
        for _ in range(20):
            chat(b, "pair")
        assert len(bad.requests) == 1  # replica B never sent it a request
    finally:
        for k in replicas:
            k.http.close()
            k.server.stop()


def test_read_timeout_retries_then_falls_back(build: Any, good: MockProvider, bad: MockProvider) -> None:
    k = build(
        [dep("primary", bad, max_retries=1, read_timeout_s=0.2), dep("backup", good)],
        fallbacks={"primary": ["backup"]},
    )
    bad.set_fault("slow:2")
    raw = chat(k, "primary")
    root, attempts = spans(k, raw)
    assert root["attributes"]["keel.served_by"] == "backup"
    assert [a["error"].split(":")[0] for a in attempts[:2]] == ["upstream_timeout", "upstream_timeout"]


def test_prompt_over_every_context_window_without_fallback_is_400(build: Any, good: MockProvider) -> None:
    k = build([dep("tiny", good, max_input_tokens=5)])
    with pytest.raises(openai.BadRequestError) as exc:
        chat(k, "tiny")
    assert exc.value.response.json()["error"]["code"] == "context_length_exceeded"
    assert len(good.requests) == 0  # refused by keel's own estimate, never sent
