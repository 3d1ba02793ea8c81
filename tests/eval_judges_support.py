"""Helpers shared by the judge, RAG, online-evaluation and review tests: a keel whose model table
also has scripted judge models (``script:<id>`` at the mock upstream, see keel.testing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from keel.config import ModelConfig
from keel.testing import MockProvider
from tests.conftest import Keel, make_keel, test_models

# gateway model name -> script id at the mock upstream
JUDGES = {"judge": "g2-judge", "judge-b": "g2-judge-b", "rag-judge": "g2-rag"}


def judge_models(mock: MockProvider) -> tuple[ModelConfig, ...]:
    return tuple(
        ModelConfig(name=name, provider="openai-compatible", model=f"script:{sid}", api_base=mock.base_url)
        for name, sid in JUDGES.items()
    )


def start_keel(
    backend: str, tmp: Path, mock: MockProvider, request: pytest.FixtureRequest, **overrides: Any
) -> Keel:
    overrides.setdefault("models", (*test_models(mock), *judge_models(mock)))
    server, app = make_keel(backend, tmp, mock, request, **overrides)
    return Keel(server, app, backend)


def gateway_client(k: Keel) -> httpx.AsyncClient:
    """What a ScorerContext's ``http`` is: the keel server's base URL with the bearer key."""
    return httpx.AsyncClient(base_url=k.url, headers={"authorization": f"Bearer {k.master_key}"}, timeout=30)


def admin_key(k: Keel, project: str) -> str:
    """A key of ``project`` that may manage it (queues, rules need the 'admin' scope)."""
    r = k.http.post("/api/keys", json={"project": project, "scopes": ["gateway", "ingest", "read", "admin"]})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])
