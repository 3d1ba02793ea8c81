"""Cost-aware routing rules, per-deployment RPM/TPM, end-user limits and budgets, limit metrics.

Each runs on both backends: with Redis the deployment and end-user counters are shared Lua-checked
state, in process otherwise.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from keel.config import CooldownConfig, ModelConfig, RetryConfig, RouteRule, RoutingConfig
from keel.errors import ConfigError
from keel.testing import MockProvider
from tests.conftest import BACKENDS, Keel, make_keel


@pytest.fixture(scope="module")
def upstream() -> Iterator[MockProvider]:
    with MockProvider() as m:
        yield m


@pytest.fixture(scope="module", params=BACKENDS)
def k(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: MockProvider
) -> Iterator[Keel]:
    base = upstream.base_url
    models = (
        ModelConfig(name="gpt-4o", provider="openai", api_base=base),
        ModelConfig(
            name="small",
            provider="openai-compatible",
            model="small-model",
            api_base=base,
            input_cost_per_mtok=0.1,
            output_cost_per_mtok=0.2,
        ),
        ModelConfig(name="limited", provider="openai-compatible", model="lim-a", api_base=base, rpm=2),
        ModelConfig(
            name="spill", provider="openai-compatible", model="spill-a", api_base=base, rpm=2, priority=1
        ),
        ModelConfig(name="spill", provider="openai-compatible", model="spill-b", api_base=base, priority=2),
        ModelConfig(name="tokens", provider="openai-compatible", model="tok-a", api_base=base, tpm=200),
        ModelConfig(
            name="cheap",
            provider="openai-compatible",
            model="my-finetune",
            api_base=base,
            input_cost_per_mtok=1.0,
            output_cost_per_mtok=2.0,
        ),
    )
    routing = RoutingConfig(
        cooldown=CooldownConfig(allowed_fails=1_000_000),
        retry=RetryConfig(backoff_base_s=0.01),
        strategies={"spill": "priority"},
        rules=[
            RouteRule(name="free-tier", models=["gpt-4o"], route_to="small", headers={"x-tier": "free"}),
            RouteRule(name="batch-jobs", models=["gpt-4o"], route_to="small", tags_any=["batch"]),
            RouteRule(
                name="short-prompts", models=["gpt-4o"], route_to="small", max_prompt_tokens=30, no_tools=True
            ),
        ],
    )
    server, app = make_keel(
        request.param, tmp_path_factory.mktemp("costroute"), upstream, request, models=models, routing=routing
    )
    keel = Keel(server, app, request.param)
    yield keel
    keel.http.close()
    server.stop()


def chat(k: Keel, model: str, text: str, key: str | None = None, max_tokens: int = 10, **kw: Any) -> Any:
    c = openai.OpenAI(base_url=k.url + "/v1", api_key=key or k.master_key, max_retries=0)
    return c.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=max_tokens, **kw
    )


def served_upstream(upstream: MockProvider, marker: str) -> list[str]:
    """The upstream model ids the mock received requests for, for requests carrying ``marker``."""
    return [r.json["model"] for r in upstream.requests if r.json and marker in str(r.json.get("messages"))]


LONG = "please explain in detail " * 40  # well over 30 prompt tokens


def test_short_prompts_go_to_the_small_model_and_the_rule_is_traced(k: Keel, upstream: MockProvider) -> None:
    # a short marker: 32 random hex digits alone can tokenise to 15-25 tokens, near the rule's 30
    marker = uuid.uuid4().hex[:8]
    short = chat(k, "gpt-4o", f"hi {marker}")
    assert short.status_code == 200
    trace = k.wait_for_trace(short.headers["x-keel-trace-id"])
    span = trace["spans"][0]
    assert span["requested_model"] == "gpt-4o" and span["model"] == "small-model"
    assert span["attributes"]["keel.route.rule"] == "short-prompts"
    assert span["attributes"]["keel.route.to"] == "small"
    # priced at the small model's rates, not gpt-4o's
    expected = (span["input_tokens"] * 0.1 + span["output_tokens"] * 0.2) / 1e6
    assert span["cost_usd"] == pytest.approx(expected)

    long = chat(k, "gpt-4o", f"{LONG} {marker}")
    span = k.wait_for_trace(long.headers["x-keel-trace-id"])["spans"][0]
    assert span["model"] == "gpt-4o" and "keel.route.rule" not in span["attributes"]
    assert served_upstream(upstream, marker) == ["small-model", "gpt-4o"]


def test_header_and_tag_rules(k: Keel, upstream: MockProvider) -> None:
    marker = uuid.uuid4().hex
    free = chat(k, "gpt-4o", f"{LONG} {marker}", extra_headers={"x-tier": "free"})
    batch = chat(k, "gpt-4o", f"{LONG} {marker}", extra_headers={"x-keel-tags": "nightly,batch"})
    paid = chat(k, "gpt-4o", f"{LONG} {marker}", extra_headers={"x-tier": "pro"})
    rules = [
        k.wait_for_trace(r.headers["x-keel-trace-id"])["spans"][0]["attributes"].get("keel.route.rule")
        for r in (free, batch, paid)
    ]
    assert rules == ["free-tier", "batch-jobs", None]
    assert served_upstream(upstream, marker) == ["small-model", "small-model", "gpt-4o"]


def test_tool_calls_are_not_sent_to_the_small_model(k: Keel) -> None:
    tools = [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    ]
    r = chat(k, "gpt-4o", "hi", tools=tools)
    span = k.wait_for_trace(r.headers["x-keel-trace-id"])["spans"][0]
    assert span["model"] == "gpt-4o"


def test_a_deployment_at_its_rpm_refuses_with_429_naming_it(k: Keel) -> None:
    # a fresh window per backend module run: the limit is on the deployment, whoever calls
    codes, last = [], None
    for _ in range(4):
        try:
            r = chat(k, "limited", "x")
            codes.append(r.status_code)
        except openai.RateLimitError as exc:
            codes.append(429)
            last = exc
    assert codes[:2] == [200, 200] and codes[2:] == [429, 429]
    assert last is not None
    body = last.response.json()
    assert body["error"]["code"] == "rate_limit_exceeded:deployment"
    assert "limited:openai-compatible:lim-a" in body["error"]["message"]
    assert int(last.response.headers["retry-after"]) >= 1
    trace = k.wait_for_trace(last.response.headers["x-keel-trace-id"])
    assert trace["spans"][0]["status_code"] == 429
    # another key is refused too: the limit is the deployment's, not the caller's
    other = k.create_key(project="dep-" + uuid.uuid4().hex[:6])["key"]
    with pytest.raises(openai.RateLimitError):
        chat(k, "limited", "x", key=other)


def test_requests_spill_to_the_next_deployment_when_one_is_at_its_rpm(
    k: Keel, upstream: MockProvider
) -> None:
    marker = uuid.uuid4().hex
    ids = [chat(k, "spill", f"{marker} {i}").headers["x-keel-trace-id"] for i in range(5)]
    assert served_upstream(upstream, marker) == ["spill-a", "spill-a", "spill-b", "spill-b", "spill-b"]
    skipped = k.wait_for_trace(ids[-1])["spans"][0]["attributes"]["keel.skipped"]
    assert skipped == [{"deployment": "spill:openai-compatible:spill-a", "reason": "at its rpm limit"}]


def test_deployment_tpm_counts_actual_tokens(k: Keel) -> None:
    # tpm 200: prompt + max_tokens (150) is counted up front, then corrected to the actual usage
    # (a few dozen tokens), so more than one call fits; estimates alone would refuse the second
    codes = []
    for _ in range(12):
        try:
            codes.append(chat(k, "tokens", "count me", max_tokens=150).status_code)
        except openai.RateLimitError as exc:
            assert exc.response.json()["error"]["code"] == "rate_limit_exceeded:deployment"
            codes.append(429)
        time.sleep(0.05)  # the correction is settled in the background
    assert 200 in codes and 429 in codes
    assert codes.index(429) >= 2  # the corrections freed room: more calls fit than estimates alone allow


def test_end_user_rate_limits_and_budgets_apply_per_user(k: Keel) -> None:
    project = "eu-" + uuid.uuid4().hex[:6]
    r = k.http.post(
        "/api/projects",
        json={
            "name": project,
            "limits": {"user_rpm": 50, "user_budget_usd": 0.00004, "user_budget_period": "daily"},
        },
    )
    assert r.status_code == 201, r.text
    key = k.create_key(project=project)["key"]

    def as_user(user: str) -> int:
        try:
            return int(chat(k, "cheap", "hello there", key=key, user=user).status_code)
        except openai.RateLimitError as exc:
            assert exc.response.json()["error"]["code"] == "budget_exceeded"
            assert "user" in exc.response.json()["error"]["message"]
            return 429

    alice = []
    for _ in range(30):
        alice.append(as_user("alice"))
        if alice[-1] == 429:
            break
        time.sleep(0.02)  # settlement is asynchronous
    assert alice[-1] == 429 and alice.count(200) >= 1
    assert as_user("bob") == 200  # bob has his own budget


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(got.get(a) == b for a, b in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_expose_rejections_and_budget_remaining(k: Keel) -> None:
    project = "m-" + uuid.uuid4().hex[:6]
    created = k.http.post(
        "/api/keys", json={"project": project, "limits": {"rpm": 1, "budget_usd": 5.0}}
    ).json()
    chat(k, "cheap", "hi", key=created["key"])
    with pytest.raises(openai.RateLimitError):
        chat(k, "cheap", "hi", key=created["key"])
    scope = f"key:{created['id']}"
    deadline = time.monotonic() + 10
    while True:
        text = k.http.get("/metrics").text
        remaining = metric(text, "keel_budget_remaining_usd", scope=scope, period="monthly")
        if remaining is not None or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert (metric(text, "keel_limit_rejections_total", scope="key", limit="rpm") or 0) >= 1
    assert remaining is not None and 4.99 < remaining < 5.0
    assert metric(text, "keel_budget_limit_usd", scope=scope, period="monthly") == 5.0
    spent = metric(text, "keel_budget_spent_usd", scope=scope, period="monthly")
    assert spent is not None and spent > 0
    assert (metric(text, "keel_limit_rejections_total", scope="deployment", limit="rpm") or 0) >= 1


@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        ({"rpm": "fast"}, "rpm must be a positive integer"),
        ({"rpm": 0}, "rpm must be a positive integer"),
        ({"budget_usd": -1}, "budget_usd must be a non-negative number"),
        ({"budget_usd": 1, "budget_period": "hourly"}, "budget_period must be one of"),
        ({"soft_budget_usd": 1}, "soft_budget_usd needs budget_usd"),
        ({"user_rpm": 5}, "unknown limit 'user_rpm' on a key"),
        ({"rmp": 5}, "unknown limit 'rmp'"),
    ],
)
def test_bad_limits_are_a_clear_400(k: Keel, limits: dict[str, Any], fragment: str) -> None:
    r = k.http.post("/api/keys", json={"project": "bad-limits", "limits": limits})
    assert r.status_code == 400 and fragment in r.json()["error"]["message"], r.text


def test_rules_must_name_configured_models(tmp_path: Any) -> None:
    from keel.config import load_settings

    cfg = tmp_path / "keel.yaml"
    cfg.write_text(
        "models:\n  - {name: a, provider: openai}\n"
        "routing:\n  rules:\n    - {name: r, models: [a], route_to: nowhere, max_prompt_tokens: 10}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_settings(config_path=str(cfg), env={})
    assert "routing.rules[0].route_to" in str(err.value) and "nowhere" in str(err.value)


def test_http_metrics_route_requires_auth(k: Keel) -> None:
    assert httpx.get(k.url + "/metrics").status_code == 401


def test_team_model_allow_list_applies_to_its_keys(k: Keel) -> None:
    project = "tm-" + uuid.uuid4().hex[:6]
    r = k.http.post(
        "/api/teams", json={"project": project, "name": "budget-team", "models": ["cheap", "small"]}
    )
    assert r.status_code == 201 and r.json()["limits"]["models"] == ["cheap", "small"]
    key = k.http.post("/api/keys", json={"project": project, "team": "budget-team"}).json()["key"]
    narrow = k.http.post(
        "/api/keys", json={"project": project, "team": "budget-team", "models": ["small"]}
    ).json()
    assert chat(k, "cheap", "hi", key=key).status_code == 200
    with pytest.raises(openai.PermissionDeniedError) as err:
        chat(k, "gpt-4o", "hi", key=key)
    assert err.value.response.json()["error"]["code"] == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        chat(k, "cheap", "hi", key=narrow["key"])  # the key's own list narrows the team's
    assert chat(k, "small", "hi", key=narrow["key"]).status_code == 200
    bad = k.http.post("/api/teams", json={"project": project, "name": "x", "limits": {"models": "cheap"}})
    assert bad.status_code == 400 and "models must be a list of model names" in bad.text


def test_x_keel_user_header_names_the_end_user(k: Keel) -> None:
    project = "hdr-" + uuid.uuid4().hex[:6]
    k.http.post("/api/projects", json={"name": project, "limits": {"user_rpm": 1}})
    key = k.create_key(project=project)["key"]
    r = chat(k, "cheap", "hi", key=key, extra_headers={"x-keel-user": "dora"})
    assert k.wait_for_trace(r.headers["x-keel-trace-id"])["user"] == "dora"
    with pytest.raises(openai.RateLimitError) as err:  # dora's own per-user limit
        chat(k, "cheap", "hi", key=key, extra_headers={"x-keel-user": "dora"})
    assert err.value.response.json()["error"]["code"] == "rate_limit_exceeded:user:rpm"
    # the body's user field wins over the header
    r = chat(k, "cheap", "hi", key=key, user="eve", extra_headers={"x-keel-user": "dora"})
    assert k.wait_for_trace(r.headers["x-keel-trace-id"])["user"] == "eve"
