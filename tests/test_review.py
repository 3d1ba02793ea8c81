"""Human review API (keel.evals.review, /api/annotation-queues, /api/annotation-items) on both backends:
queues, picking traces into them, reviewing (a human score on the trace; a re-review replaces it),
skipping, validation errors in the API's shape, project scoping, and sending reviewed items to a dataset.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from keel.testing import MockProvider
from tests.conftest import BACKENDS, Keel
from tests.eval_judges_support import admin_key, start_keel


@pytest.fixture(scope="module", params=BACKENDS)
def rk(
    request: pytest.FixtureRequest, mock_upstream: MockProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keel]:
    k = start_keel(request.param, tmp_path_factory.mktemp("review"), mock_upstream, request)
    yield k
    k.http.close()
    k.server.stop()


def traces(k: Keel, n: int, key: str | None = None) -> list[str]:
    client = openai.OpenAI(base_url=k.url + "/v1", api_key=key or k.master_key, max_retries=0, timeout=30)
    ids = []
    for i in range(n):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"review me {i}"}]
        )
        ids.append(raw.headers["x-keel-trace-id"])
    client.close()
    for t in ids:
        k.wait_for_trace(t)
    return ids


def queue(k: Keel, **body: Any) -> dict[str, Any]:
    body.setdefault("name", "q-" + uuid.uuid4().hex[:6])
    body.setdefault("score_name", "quality")
    r = k.http.post("/api/annotation-queues", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def items(k: Keel, qid: str, **params: Any) -> list[dict[str, Any]]:
    r = k.http.get(f"/api/annotation-queues/{qid}/items", params=params)
    assert r.status_code == 200, r.text
    return list(r.json())


def review(k: Keel, item_id: int, **body: Any) -> httpx.Response:
    return k.http.post(f"/api/annotation-items/{item_id}/review", json=body)


def error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert {"message", "type", "code"} <= set(err)
    return str(err["message"])


def test_queue_lifecycle_and_review_writes_human_scores(rk: Keel) -> None:
    q = queue(rk, description="Is the reply any good?")
    assert (q["score_type"], q["pending"], q["done"]) == ("scale", 0, 0)
    ids = traces(rk, 3)
    missing = uuid.uuid4().hex
    added = rk.http.post(
        f"/api/annotation-queues/{q['id']}/items", json={"trace_ids": [*ids, ids[0], missing]}
    )
    assert added.status_code == 201, added.text
    assert added.json() == {"added": 3, "already_queued": [], "not_found": [missing]}
    again = rk.http.post(f"/api/annotation-queues/{q['id']}/items", json={"trace_ids": ids[:1]}).json()
    assert again == {"added": 0, "already_queued": [ids[0]], "not_found": []}
    listed = items(rk, q["id"])
    assert [i["trace_id"] for i in listed] == ids and listed[0]["trace"]["model"] == "gpt-4o-mini"
    first, second, third = listed

    r = review(rk, first["id"], value=4, comment="solid answer")
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["value"], r.json()["reviewer"]) == ("done", 4.0, "master")
    scores = rk.http.get("/api/scores", params={"trace_id": ids[0]}).json()["data"]
    assert [(s["name"], s["value"], s["source"], s["comment"]) for s in scores] == [
        ("quality", 4.0, "human", "solid answer")
    ]
    # a re-review replaces the earlier score
    assert review(rk, first["id"], value=2).status_code == 200
    scores = rk.http.get("/api/scores", params={"trace_id": ids[0]}).json()["data"]
    assert [(s["value"], s["comment"]) for s in scores] == [(2.0, None)]

    skipped = review(rk, second["id"], skip=True).json()
    assert skipped["status"] == "skipped" and skipped["value"] is None
    assert rk.http.get("/api/scores", params={"trace_id": ids[1]}).json()["data"] == []

    got = rk.http.get(f"/api/annotation-queues/{q['id']}").json()
    assert (got["pending"], got["done"], got["skipped"]) == (1, 1, 1)
    assert [i["id"] for i in items(rk, q["id"], status="pending")] == [third["id"]]
    assert [i["id"] for i in items(rk, q["id"], after=first["id"], limit=1)] == [second["id"]]
    assert rk.http.get(f"/api/annotation-items/{third['id']}").json()["status"] == "pending"

    assert rk.http.delete(f"/api/annotation-queues/{q['id']}").status_code == 200
    assert rk.http.get(f"/api/annotation-queues/{q['id']}").status_code == 404
    assert rk.http.get(f"/api/annotation-items/{third['id']}").status_code == 404
    # the reviewers' scores stay on the traces
    assert len(rk.http.get("/api/scores", params={"trace_id": ids[0]}).json()["data"]) == 1


def test_boolean_queue(rk: Keel) -> None:
    q = queue(rk, score_type="boolean", score_name="on_topic")
    [tid] = traces(rk, 1)
    rk.http.post(f"/api/annotation-queues/{q['id']}/items", json={"trace_ids": [tid]})
    [item] = items(rk, q["id"])
    assert review(rk, item["id"], value="yes").json()["value"] == 1.0
    [score] = rk.http.get("/api/scores", params={"trace_id": tid, "name": "on_topic"}).json()["data"]
    assert score["data_type"] == "boolean" and score["value"] is True
    assert review(rk, item["id"], value=False).json()["value"] == 0.0
    [score] = rk.http.get("/api/scores", params={"trace_id": tid, "name": "on_topic"}).json()["data"]
    assert score["value"] is False


def test_bad_input_is_a_clear_4xx(rk: Keel) -> None:
    q = queue(rk)
    [tid] = traces(rk, 1)
    rk.http.post(f"/api/annotation-queues/{q['id']}/items", json={"trace_ids": [tid]})
    [item] = items(rk, q["id"])
    assert "1 to 5" in error(review(rk, item["id"], value=7), 400)
    assert "1 to 5" in error(review(rk, item["id"], value="great"), 400)
    assert "required unless skip" in error(review(rk, item["id"], comment="no value"), 400)
    assert "1 to 5" in error(review(rk, item["id"], value=2.5), 400)
    error(review(rk, 987654321, value=3), 404)
    error(review(rk, 10**30, value=3), 400)  # out of range for any id column: refused, not a 500
    assert "trace id" in error(
        rk.http.post(f"/api/annotation-queues/{q['id']}/items", json={"trace_ids": ["nope"]}), 400
    )
    error(rk.http.post("/api/annotation-queues/aq_missing/items", json={"trace_ids": [tid]}), 404)
    error(rk.http.post("/api/annotation-queues", json={"name": "x", "score_name": "bad name!"}), 400)
    error(
        rk.http.post("/api/annotation-queues", json={"name": "x", "score_name": "s", "score_type": "stars"}),
        400,
    )
    error(
        rk.http.post("/api/annotation-queues", json={"name": "x", "score_name": "s", "project": "nope-proj"}),
        404,
    )
    error(rk.http.get("/api/annotation-queues/aq_missing/items"), 404)
    error(rk.http.post(f"/api/annotation-items/{item['id']}/review", content=b"{not json"), 400)


def test_boolean_queue_refuses_a_number(rk: Keel) -> None:
    q = queue(rk, score_type="boolean")
    [tid] = traces(rk, 1)
    rk.http.post(f"/api/annotation-queues/{q['id']}/items", json={"trace_ids": [tid]})
    [item] = items(rk, q["id"])
    assert "yes or no" in error(review(rk, item["id"], value=3), 400)


def test_queues_are_scoped_to_a_project(rk: Keel) -> None:
    key_a = admin_key(rk, "g2-review-a")
    key_b = admin_key(rk, "g2-review-b")
    plain = rk.create_key(project="g2-review-a")["key"]
    refused = httpx.post(
        rk.url + "/api/annotation-queues",
        json={"name": "nope", "score_name": "q"},
        headers={"authorization": f"Bearer {plain}"},
    )
    assert refused.status_code == 403, refused.text
    ha = httpx.Client(base_url=rk.url, headers={"authorization": f"Bearer {key_a}"}, timeout=30)
    hb = httpx.Client(base_url=rk.url, headers={"authorization": f"Bearer {key_b}"}, timeout=30)
    q = ha.post("/api/annotation-queues", json={"name": "mine", "score_name": "quality"}).json()
    own = traces(rk, 1, key=key_a)
    foreign = traces(rk, 1, key=key_b)
    added = ha.post(f"/api/annotation-queues/{q['id']}/items", json={"trace_ids": own + foreign}).json()
    assert added["added"] == 1 and added["not_found"] == foreign  # another project's trace is not visible
    assert hb.get(f"/api/annotation-queues/{q['id']}").status_code == 404
    assert q["id"] not in {x["id"] for x in hb.get("/api/annotation-queues").json()}
    [item] = ha.get(f"/api/annotation-queues/{q['id']}/items").json()
    assert hb.post(f"/api/annotation-items/{item['id']}/review", json={"value": 5}).status_code == 404
    assert ha.post(f"/api/annotation-items/{item['id']}/review", json={"value": 5}).status_code == 200
    assert q["id"] in {x["id"] for x in rk.http.get("/api/annotation-queues").json()}
    ha.close()
    hb.close()


def test_reviewed_items_go_to_a_dataset(rk: Keel) -> None:
    q = queue(rk)
    ids = traces(rk, 3)
    rk.http.post(f"/api/annotation-queues/{q['id']}/items", json={"trace_ids": ids})
    listed = items(rk, q["id"])
    review(rk, listed[0]["id"], value=5, comment="perfect")
    review(rk, listed[1]["id"], value=1)
    name = "reviewed-" + uuid.uuid4().hex[:6]
    r = rk.http.post(f"/api/annotation-queues/{q['id']}/dataset", json={"dataset": name})
    assert r.status_code == 200, r.text
    assert r.json()["added"] == 2 and r.json()["skipped_traces"] == []
    ds = rk.http.get(f"/api/datasets/{name}", params={"project": "default"})
    assert ds.status_code == 200, ds.text
    data = rk.http.get(f"/api/datasets/{name}/items", params={"project": "default"}).json()["data"]
    assert len(data) == 2
    reviews = sorted((d["metadata"]["review"]["quality"], d["metadata"]["review"]["comment"]) for d in data)
    assert reviews == [(1.0, None), (5.0, "perfect")]
    assert all(d["input"]["messages"][0]["content"].startswith("review me") for d in data)
    assert all(d["expected"].startswith("Mock reply to: review me") for d in data)
    # only chosen items, and a second push of the same items changes nothing
    again = rk.http.post(
        f"/api/annotation-queues/{q['id']}/dataset", json={"dataset": name, "item_ids": [listed[0]["id"]]}
    ).json()
    assert again["added"] == 0 and again["unchanged"] == 1
    empty = queue(rk)
    assert "no reviewed item" in error(
        rk.http.post(f"/api/annotation-queues/{empty['id']}/dataset", json={"dataset": name}), 400
    )
