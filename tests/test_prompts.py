"""The prompt registry: versions, sandboxed rendering, labels, rollback, audit, and the /api/prompts errors."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest

from keel.errors import BadRequest
from keel.prompts import LabelState, choose_version, render
from keel.prompts.diff import side_by_side
from keel.prompts.model import normalise
from keel.prompts.registry import version_from_dict


def version(ptype: str = "chat", **kw: Any) -> Any:
    """A Version as the registry would store it."""
    t, tpl, variables, config, meta = normalise(ptype, **kw)
    return version_from_dict(
        {
            "name": "p",
            "version": 1,
            "type": t,
            "template": tpl,
            "variables": [v.as_dict() for v in variables],
            "config": config,
            "metadata": meta,
        }
    )


# -- rendering ----------------------------------------------------------------------------------


def test_text_prompt_renders_with_loops_conditionals_and_defaults() -> None:
    v = version(
        "text",
        template="Hi {{ name }}{% if vip %} (VIP){% endif %}:{% for i in items %} {{ loop.index }}.{{ i | upper }}{% endfor %}",
        variables={"name": "string", "vip": {"type": "boolean", "default": False}, "items": "list"},
        config={"model": "gpt-4o-mini", "temperature": 0.1, "notes": "not a request parameter"},
    )
    out = render(v, {"name": "Ada", "items": ["a", "b"]})
    assert out.text == "Hi Ada: 1.A 2.B"
    assert out.messages == [{"role": "user", "content": "Hi Ada: 1.A 2.B"}]
    assert out.config == {"model": "gpt-4o-mini", "temperature": 0.1}  # config kept, not sent: notes
    assert render(v, {"name": "Bo", "vip": True, "items": []}).text == "Hi Bo (VIP):"


def test_chat_prompt_renders_messages_and_placeholders() -> None:
    v = version(
        "chat",
        messages=[
            {"role": "system", "content": "You help with {{ product }}."},
            {"placeholder": "history"},
            {"role": "user", "content": "{{ question }}"},
        ],
        variables={"product": {"type": "string", "default": "keel"}},
    )
    names = {x.name: x for x in v.variables}
    assert names["question"].type == "any" and names["question"].required  # inferred from the template
    assert names["history"].type == "list"
    out = render(v, {"question": "How?", "history": [{"role": "user", "content": "earlier"}]})
    assert out.messages == [
        {"role": "system", "content": "You help with keel."},
        {"role": "user", "content": "earlier"},
        {"role": "user", "content": "How?"},
    ]


@pytest.mark.parametrize(
    ("variables", "code", "needle"),
    [
        ({}, "missing_prompt_variable", "missing variable 'n'"),
        ({"n": "three"}, "invalid_prompt_variable", "variable 'n' must be an integer, got string"),
        ({"n": True}, "invalid_prompt_variable", "must be an integer, got boolean"),
        ({"n": 3, "tags": "x"}, "invalid_prompt_variable", "variable 'tags' must be a list"),
    ],
)
def test_render_fails_clearly_on_missing_or_mistyped_variables(
    variables: dict[str, Any], code: str, needle: str
) -> None:
    v = version(
        "text",
        template="{{ n }} {{ tags }}",
        variables={"n": "integer", "tags": {"type": "list", "default": []}},
    )
    with pytest.raises(BadRequest) as info:
        render(v, variables)
    assert info.value.code == code and needle in info.value.message


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ x.__class__.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ x.__class__.__base__.__subclasses__() }}",
        "{% for c in x.__class__.mro() %}{{ c }}{% endfor %}",
        "{{ items.append(1) }}",
        "{{ d.update({'a': 1}) }}",
        "{{ d.clear() }}",
        "{% for i in range(100000000) %}{% endfor %}",
        "{{ x.format.__globals__ }}",
        "{{ self.__init__.__globals__ }}",
    ],
)
def test_sandbox_blocks_escapes(template: str) -> None:
    v = version("text", template=template, variables={"x": "any", "items": "any", "d": "any"})
    with pytest.raises(BadRequest) as info:
        render(v, {"x": "s", "items": [1], "d": {"k": 1}})
    assert info.value.code in ("template_not_allowed", "missing_prompt_variable", "template_error"), (
        info.value.message
    )


def test_invalid_templates_are_refused_at_push() -> None:
    with pytest.raises(BadRequest, match=r"messages\[1\].content: template syntax error"):
        normalise(
            "chat", messages=[{"role": "system", "content": "ok"}, {"role": "user", "content": "{% if %}"}]
        )
    with pytest.raises(BadRequest, match="a text prompt needs 'template'"):
        normalise("text", template="")
    with pytest.raises(BadRequest, match="role"):
        normalise("chat", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(BadRequest, match="type must be one of"):
        normalise("text", template="{{ a }}", variables={"a": "str"})
    with pytest.raises(BadRequest, match="default must be an integer"):
        normalise("text", template="{{ a }}", variables={"a": {"type": "integer", "default": "x"}})


def test_canary_split_is_sticky_and_weighted() -> None:
    state = LabelState("production", 1, split=((1, 90.0), (2, 10.0)))
    picks = {f"user-{i}": choose_version("support", state, f"user-{i}") for i in range(4000)}
    share = Counter(picks.values())[2] / len(picks)
    assert 0.08 <= share <= 0.12
    assert all(choose_version("support", state, u) == v for u, v in list(picks.items())[:500])
    assert choose_version("support", LabelState("production", 3), "anyone") == 3


def test_side_by_side_rows() -> None:
    rows = side_by_side("a\nb\nc", "a\nB\nc\nd")
    assert [(r.left, r.right, r.kind) for r in rows] == [
        ("a", "a", "equal"),
        ("b", "B", "replace"),
        ("c", "c", "equal"),
        (None, "d", "insert"),
    ]


# -- the API ------------------------------------------------------------------------------------


def chat_prompt(
    name: str, system: str = "You answer questions about {{ product }}.", **kw: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "type": "chat",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "{{ question }}"}],
        "variables": {"product": "string", "question": "string"},
        "config": {"model": "gpt-4o-mini", "temperature": 0.2},
        "metadata": {"owner": "support-team", "use_case": "answers"},
        **kw,
    }


def test_push_is_versioned_and_deduplicated(keel: Any) -> None:
    name = f"faq-{uuid.uuid4().hex[:6]}"
    r = keel.http.post("/api/prompts", json=chat_prompt(name, commit_message="first"))
    assert r.status_code == 201, r.text
    v1 = r.json()
    assert v1["version"] == 1 and v1["created"] is True and v1["author"] == "master"
    assert v1["variables"] == [
        {"name": "product", "type": "string", "required": True},
        {"name": "question", "type": "string", "required": True},
    ]
    r = keel.http.post("/api/prompts", json=chat_prompt(name, commit_message="same content"))
    assert r.status_code == 200 and r.json()["created"] is False and r.json()["version"] == 1
    r = keel.http.post(
        "/api/prompts",
        json=chat_prompt(
            name, system="Be brief about {{ product }}.", author="ada", commit_message="shorter"
        ),
    )
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["author"] == "ada"

    got = keel.http.get(f"/api/prompts/{name}").json()
    assert got["latest_version"] == 2 and got["type"] == "chat"
    assert [(v["version"], v["commit_message"], v["labels"]) for v in got["versions"]] == [
        (2, "shorter", ["latest"]),
        (1, "first", []),
    ]
    one = keel.http.get(f"/api/prompts/{name}/versions/1").json()
    assert one["messages" if "messages" in one else "template"][0]["content"].startswith("You answer")
    assert one["metadata"] == {"owner": "support-team", "use_case": "answers"}
    assert keel.http.get(f"/api/prompts/{name}/versions/latest").json()["version"] == 2
    assert any(p["name"] == name and p["latest_version"] == 2 for p in keel.http.get("/api/prompts").json())

    d = keel.http.get(f"/api/prompts/{name}/diff", params={"from": 1, "to": 2}).json()
    assert "-You answer questions about {{ product }}." in d["template"]
    assert "+Be brief about {{ product }}." in d["template"] and d["config"] == ""


def test_labels_rollback_and_audit(keel: Any) -> None:
    name = f"lab-{uuid.uuid4().hex[:6]}"
    keel.http.post("/api/prompts", json=chat_prompt(name, labels=["production"]))
    keel.http.post("/api/prompts", json=chat_prompt(name, system="v2 {{ product }}"))
    keel.http.post("/api/prompts", json=chat_prompt(name, system="v3 {{ product }}"))
    prod = lambda: keel.http.get(f"/api/prompts/{name}/versions/production").json()["version"]  # noqa: E731
    assert prod() == 1

    r = keel.http.put(f"/api/prompts/{name}/labels/production", json={"version": 3})
    assert r.status_code == 200 and r.json()["version"] == 3 and r.json()["updated_by"] == "master"
    assert prod() == 3
    r = keel.http.put(f"/api/prompts/{name}/labels/staging", json={"version": 2})
    assert r.status_code == 200

    r = keel.http.post(f"/api/prompts/{name}/labels/production/rollback")
    assert r.status_code == 200 and r.json()["version"] == 1
    assert prod() == 1
    r = keel.http.post(f"/api/prompts/{name}/labels/production/rollback", json={"to_version": 2})
    assert r.json()["version"] == 2

    r = keel.http.put(
        f"/api/prompts/{name}/labels/production",
        json={"split": [{"version": 2, "weight": 90}, {"version": 3, "weight": 10}]},
    )
    assert r.status_code == 200 and r.json()["split"] == [
        {"version": 2, "weight": 90.0},
        {"version": 3, "weight": 10.0},
    ]
    assert r.json()["version"] == 2

    events = keel.http.get(f"/api/prompts/{name}/history").json()
    actions = [(e["action"], e["label"], e["version"]) for e in reversed(events)]
    assert actions == [
        ("create", None, 1),
        ("label", "production", 1),
        ("version", None, 2),
        ("version", None, 3),
        ("label", "production", 3),
        ("label", "staging", 2),
        ("rollback", "production", 1),
        ("rollback", "production", 2),
        ("label", "production", 2),
    ]
    assert all(e["actor"] == "master" and e["created_at"] for e in events)
    moves = keel.http.get(f"/api/prompts/{name}/history", params={"label": "production"}).json()
    assert moves[0]["detail"]["previous"] == {"version": 2, "split": None}

    r = keel.http.delete(f"/api/prompts/{name}/labels/staging")
    assert r.status_code == 204
    assert keel.http.get(f"/api/prompts/{name}/versions/staging").status_code == 404


def test_protected_labels_need_an_eval_run(keel: Any) -> None:
    name = f"prot-{uuid.uuid4().hex[:6]}"
    keel.http.post("/api/prompts", json=chat_prompt(name, labels=["production"]))
    keel.http.post("/api/prompts", json=chat_prompt(name, system="v2 {{ product }}"))
    assert keel.http.put(f"/api/prompts/{name}/protected", json={"labels": ["production"]}).status_code == 200
    r = keel.http.put(f"/api/prompts/{name}/labels/production", json={"version": 2})
    assert r.status_code == 409 and r.json()["error"]["code"] == "protected_label"
    r = keel.http.post(
        "/api/prompts", json=chat_prompt(name, system="v3 {{ product }}", labels=["production"])
    )
    assert r.status_code == 409
    # the run must exist, have completed and passed a server-side gate (tests/test_evals_gate.py moves one)
    r = keel.http.put(f"/api/prompts/{name}/labels/production", json={"version": 2, "eval_run": "run_123"})
    assert r.status_code == 409 and "does not exist in this project" in r.json()["error"]["message"]


def test_render_endpoint_and_errors(keel: Any) -> None:
    name = f"rend-{uuid.uuid4().hex[:6]}"
    keel.http.post("/api/prompts", json=chat_prompt(name))
    r = keel.http.post(
        f"/api/prompts/{name}/render", json={"variables": {"product": "keel", "question": "Why?"}}
    )
    assert r.status_code == 200
    assert r.json()["messages"][1] == {"role": "user", "content": "Why?"}
    assert r.json()["config"] == {"model": "gpt-4o-mini", "temperature": 0.2}
    r = keel.http.post(f"/api/prompts/{name}/render", json={"variables": {"product": "keel"}})
    assert r.status_code == 400 and "missing variable 'question'" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "prompt_variables.question"
    r = keel.http.post(f"/api/prompts/{name}/render", json={"variables": {"product": 5, "question": "x"}})
    assert r.status_code == 400 and "variable 'product' must be a string" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("get", "/api/prompts/nope-{u}", None, 404, "prompt_not_found"),
        ("get", "/api/prompts/{n}/versions/9", None, 404, "version_not_found"),
        ("get", "/api/prompts/{n}/versions/canary", None, 404, "label_not_found"),
        ("put", "/api/prompts/{n}/labels/production", {"version": 7}, 404, "version_not_found"),
        ("put", "/api/prompts/{n}/labels/latest", {"version": 1}, 400, "invalid_label"),
        ("put", "/api/prompts/{n}/labels/Bad Label", {"version": 1}, 400, "invalid_label"),
        ("put", "/api/prompts/{n}/labels/production", {}, 400, "invalid_request"),
        (
            "put",
            "/api/prompts/{n}/labels/production",
            {"split": [{"version": 1, "weight": -1}]},
            400,
            "invalid_split",
        ),
        ("post", "/api/prompts/{n}/labels/nolabel/rollback", None, 409, "nothing_to_rollback"),
        (
            "post",
            "/api/prompts",
            {"name": "bad name!", "type": "text", "template": "x"},
            400,
            "invalid_prompt",
        ),
        ("post", "/api/prompts", {"name": "x-{u}", "type": "audio", "template": "x"}, 400, "invalid_prompt"),
        (
            "post",
            "/api/prompts",
            {"name": "x-{u}", "type": "text", "template": "{{ a"},
            400,
            "invalid_template",
        ),
        (
            "post",
            "/api/prompts",
            {"name": "x-{u}", "type": "text", "template": "x", "bogus": 1},
            400,
            "invalid_request",
        ),
        ("post", "/api/prompts", {"name": "{n}", "type": "text", "template": "x"}, 400, "invalid_prompt"),
        (
            "post",
            "/api/prompts/{n}/render",
            {"variables": {"product": "k", "question": ["x"]}},
            400,
            "invalid_prompt_variable",
        ),
        ("get", "/api/prompts/{n}/diff?from=1&to=5", None, 404, "version_not_found"),
    ],
)
def test_api_errors_are_4xx_in_openai_shape(
    keel: Any, method: str, path: str, body: Any, status: int, code: str
) -> None:
    u = uuid.uuid4().hex[:6]
    n = f"err-{u}"
    keel.http.post("/api/prompts", json=chat_prompt(n))
    if isinstance(body, dict) and isinstance(body.get("name"), str):
        body = {**body, "name": body["name"].format(n=n, u=u)}
    r = keel.http.request(method, path.format(n=n, u=u), json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_virtual_keys_read_but_do_not_write(keel: Any) -> None:
    name = f"vk-{uuid.uuid4().hex[:6]}"
    keel.http.post("/api/prompts", json=chat_prompt(name, labels=["production"]))
    key = keel.create_key(project="default")["key"]  # prompts are per project: the master's are in default
    h = {"authorization": f"Bearer {key}"}
    assert keel.http.get(f"/api/prompts/{name}/resolve", headers=h).json()["version"] == 1
    other = {"authorization": f"Bearer {keel.create_key(project=f'proj-{name}')['key']}"}
    assert keel.http.get(f"/api/prompts/{name}/resolve", headers=other).status_code == 404
    r = keel.http.post("/api/prompts", json=chat_prompt(name, system="x {{ product }}"), headers=h)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert (
        keel.http.put(f"/api/prompts/{name}/labels/production", json={"version": 1}, headers=h).status_code
        == 403
    )
    assert keel.http.get("/api/prompts", headers={"authorization": "Bearer nope"}).status_code == 401
