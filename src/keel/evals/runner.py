"""The eval runner: every (variant, item, repeat) through the gateway, scored, stored as a run.

- Bounded concurrency: ``concurrency`` workers pull tasks from one queue, so at most that many
  model calls are in flight at once (cache hits take no slot time).
- Retries: a call that fails with 408/409/429/5xx or a connection error is retried up to
  ``retries`` times with exponential backoff (honouring ``retry-after``).
- Repeats: each item is generated ``repeats`` times per variant; summaries average over repeats
  and report the spread, so non-determinism is visible.
- Output cache: successful outputs are kept in a SQLite file keyed by model, parameters, the
  rendered messages and the repeat index; a rerun of an unchanged suite makes no model call.

The runner talks to keel only through :class:`~keel.evals.client.EvalClient` (HTTP).
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from keel.errors import KeelError
from keel.evals.client import EvalClient
from keel.evals.compare import summarise
from keel.evals.datasets import DatasetFormatError, parse_items
from keel.evals.scorers.base import ScoreInput, Scorer, ScorerConfigError, ScorerContext, ScoreResult
from keel.evals.scorers.registry import build_scorer
from keel.evals.suite import RUNNER_SCORER_KEYS, Suite, SuiteError
from keel.prompts.model import Version, normalise
from keel.prompts.registry import version_from_dict
from keel.prompts.render import CompiledPrompt

__all__ = [
    "OutputCache",
    "RunReport",
    "Variant",
    "build_scorers",
    "execute_suite",
    "generate_and_score",
    "load_items",
    "resolve_variants",
]

_RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
_RESULT_BATCH = 500
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Variant:
    """One prompt x model combination of a suite."""

    name: str
    prompt: CompiledPrompt
    model: str
    params: dict[str, Any]
    prompt_ref: dict[str, Any]  # {name, version, label?} for registry prompts, {name, inline: true} else


@dataclass
class RunReport:
    run: dict[str, Any]
    results: list[dict[str, Any]]
    summary: dict[str, Any]
    calls: int = 0
    cache_hits: int = 0
    retries: int = 0


class OutputCache:
    """Model outputs on disk (SQLite), keyed by a hash of model, params, messages and repeat."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS outputs (key TEXT PRIMARY KEY, value BLOB, created REAL)"
        )

    @staticmethod
    def key(model: str, params: Mapping[str, Any], messages: Sequence[Mapping[str, Any]], repeat: int) -> str:
        blob = orjson.dumps(
            {"model": model, "params": params, "messages": messages, "repeat": repeat},
            option=orjson.OPT_SORT_KEYS,
        )
        return hashlib.sha256(blob).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM outputs WHERE key = ?", (key,)).fetchone()
        return None if row is None else dict(orjson.loads(row[0]))

    def put(self, key: str, value: Mapping[str, Any]) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO outputs (key, value, created) VALUES (?, ?, ?)",
                (key, orjson.dumps(value), time.time()),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- suite resolution ---------------------------------------------------------------------------------


async def load_items(suite: Suite, client: EvalClient) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The dataset (stored after pushing the suite's file, when it has one) and its items."""
    spec = suite.dataset
    if spec.file is not None:
        path = suite.resolve(spec.file)
        try:
            items = parse_items(path.read_bytes(), path.suffix or "jsonl")
        except OSError as exc:
            raise SuiteError(f"dataset.file: cannot read {path}: {exc.strerror or exc}") from None
        except DatasetFormatError as exc:
            raise SuiteError(f"dataset.file: {path}: {exc}") from None
        if not items:
            raise SuiteError(f"dataset.file: {path} has no items")
        name = spec.name or path.stem
        pushed = await client.push_items(name, items, replace=True)
        return pushed, await client.dataset_items(pushed["id"], pushed["version"])
    assert spec.name is not None
    dataset = await client.get_dataset(spec.name)
    if dataset is None:
        raise SuiteError(f"dataset: no dataset named {spec.name!r} on the server (push it first)")
    version = spec.version if spec.version is not None else dataset["version"]
    if version > dataset["version"]:
        raise SuiteError(
            f"dataset.version: {spec.name!r} has no version {version} (latest {dataset['version']})"
        )
    items = await client.dataset_items(dataset["id"], version)
    if not items:
        raise SuiteError(f"dataset: {spec.name!r} version {version} has no items")
    return {**dataset, "version": version}, items


def _inline_version(name: str, template: str | None, messages: list[dict[str, Any]] | None) -> Version:
    ptype = "text" if template is not None else "chat"
    try:
        ptype, tpl, variables, _config, _metadata = normalise(ptype, template=template, messages=messages)
    except KeelError as exc:
        raise SuiteError(f"prompt {name!r}: {exc.message}") from None
    return Version(name=name, version=0, type=ptype, template=tpl, variables=tuple(variables))


async def resolve_variants(suite: Suite, client: EvalClient | None) -> list[Variant]:
    """Compile every prompt (fetching registry prompts) and cross them with the models."""
    variants: list[Variant] = []
    for name, spec in zip(suite.prompt_names(), suite.prompts, strict=True):
        if spec.prompt is not None:
            pname, ref = spec.ref
            if client is None:
                raise SuiteError(f"prompt {spec.prompt!r}: registry prompts need a keel server")
            try:
                doc = await client.prompt_version(pname, ref)
            except Exception as exc:
                raise SuiteError(f"prompt {spec.prompt!r}: {exc}") from None
            version = version_from_dict(doc)
            prompt_ref: dict[str, Any] = {"name": pname, "version": version.version, "ref": ref}
            base_params = version.request_config()
        else:
            version = _inline_version(name, spec.template, spec.messages)
            prompt_ref = {"name": name, "inline": True}
            base_params = {}
        compiled = CompiledPrompt(version)
        for m in suite.models:
            params = {**base_params, **suite.params, **m.params, **spec.params}
            params.pop("model", None)
            params.pop("stream", None)
            variants.append(Variant(f"{name}/{m.alias or m.name}", compiled, m.name, params, prompt_ref))
    return variants


def build_scorers(suite: Suite, ctx: ScorerContext) -> list[tuple[str, float | None, Scorer]]:
    """(name, pass threshold, scorer) for each scorer of the suite; SuiteError on bad options."""
    out = []
    for i, spec in enumerate(suite.scorers):
        opts = {k: v for k, v in spec.options().items() if k not in RUNNER_SCORER_KEYS}
        try:
            scorer = build_scorer(spec.type, opts, ctx, name=spec.key)
        except ScorerConfigError as exc:
            raise SuiteError(f"scorers[{i}] ({spec.key}): {exc}") from None
        out.append((spec.key, spec.threshold, scorer))
    return out


# -- one generation -----------------------------------------------------------------------------------


def _variables(item: Mapping[str, Any]) -> dict[str, Any]:
    inp = item.get("input")
    if isinstance(inp, Mapping):
        return dict(inp)
    return {"input": inp}


def _tool_calls(message: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for tc in message.get("tool_calls") or []:
        fn = tc.get("function") or {}
        args: Any = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = orjson.loads(args)
            except orjson.JSONDecodeError:
                pass
        out.append({"name": fn.get("name"), "arguments": args, "id": tc.get("id")})
    return out


async def _call_gateway(
    http: httpx.AsyncClient,
    variant: Variant,
    messages: list[dict[str, Any]],
    headers: dict[str, str],
    retries: int,
    backoff_s: float,
) -> tuple[dict[str, Any], int]:
    """(outcome, retries used); outcome has output/tool_calls/trace_id/latency_ms or error."""
    body = {"model": variant.model, "messages": messages, **variant.params}
    attempt = 0
    while True:
        t0 = time.perf_counter()
        retry_after = 0.0
        try:
            r = await http.post("/v1/chat/completions", json=body, headers=headers)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
            status = None
        else:
            latency = (time.perf_counter() - t0) * 1000.0
            trace_id = r.headers.get("x-keel-trace-id")
            if r.status_code == 200:
                try:
                    data = r.json()
                    message = data["choices"][0]["message"]
                except (ValueError, KeyError, IndexError, TypeError):
                    return {"error": "malformed response from the gateway", "trace_id": trace_id}, attempt
                content = message.get("content")
                return {
                    "output": content if isinstance(content, str) else "",
                    "tool_calls": _tool_calls(message),
                    "trace_id": trace_id,
                    "latency_ms": round(latency, 3),
                    "usage": data.get("usage") or {},
                }, attempt
            status = r.status_code
            try:
                err = r.json()["error"]
                error = f"HTTP {status}: {err.get('message')}"
            except Exception:
                error = f"HTTP {status}: {r.text[:200]}"
            try:
                retry_after = float(r.headers.get("retry-after") or 0)
            except ValueError:
                retry_after = 0.0
            if status not in _RETRY_STATUS:
                return {"error": error, "trace_id": trace_id}, attempt
        if attempt >= retries:
            return {"error": error, "trace_id": None}, attempt
        await asyncio.sleep(min(30.0, max(retry_after, backoff_s * (2**attempt))))
        attempt += 1


async def _score_all(
    scorers: Sequence[tuple[str, float | None, Scorer]], inp: ScoreInput
) -> tuple[dict[str, Any], float]:
    scores: dict[str, Any] = {}
    cost = 0.0
    for name, threshold, scorer in scorers:
        try:
            res = await scorer.score(inp)
        except Exception as exc:  # a plugin bug must not sink the run: it becomes that scorer's error
            res = ScoreResult.failed("scorer_error", f"{type(exc).__name__}: {exc}")
        passed = res.passed
        if threshold is not None and res.value is not None:
            passed = res.value >= threshold
        entry: dict[str, Any] = {"value": res.value, "passed": passed}
        for k in ("error", "label", "explanation"):
            v = getattr(res, k)
            if v:
                entry[k] = v if k != "explanation" else str(v)[:2000]
        if res.details:
            entry["details"] = dict(res.details)
        scores[name] = entry
        cost += res.cost_usd
    return scores, cost


@dataclass
class _Counters:
    calls: int = 0
    cache_hits: int = 0
    retries: int = 0
    scoring_cost: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0
    extra: dict[str, int] = field(default_factory=dict)


async def generate_and_score(
    http: httpx.AsyncClient,
    variants: Sequence[Variant],
    items: Sequence[Mapping[str, Any]],
    scorers: Sequence[tuple[str, float | None, Scorer]],
    *,
    concurrency: int,
    repeats: int = 1,
    retries: int = 2,
    backoff_s: float = 0.5,
    cache: OutputCache | None = None,
    tags: Sequence[str] = (),
    on_result: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    on_progress: ProgressFn | None = None,
) -> tuple[list[dict[str, Any]], _Counters]:
    """Run every (variant, item, repeat) with at most ``concurrency`` gateway calls in flight."""
    queue: asyncio.Queue[tuple[Variant, Mapping[str, Any], int]] = asyncio.Queue()
    for v in variants:
        for item in items:
            for rep in range(repeats):
                queue.put_nowait((v, item, rep))
    total = queue.qsize()
    results: list[dict[str, Any]] = []
    counters = _Counters()
    header_tags = ",".join(["keel-eval", *tags])

    async def one(v: Variant, item: Mapping[str, Any], rep: int) -> dict[str, Any]:
        row: dict[str, Any] = {"variant": v.name, "item_id": item["id"], "repeat": rep}
        try:
            rendered = v.prompt.render(_variables(item))
        except KeelError as exc:
            outcome: dict[str, Any] = {"error": f"render_error: {exc.message}"}
            messages: list[dict[str, Any]] = []
        else:
            messages = rendered.messages
            key = OutputCache.key(v.model, v.params, messages, rep) if cache is not None else ""
            hit = cache.get(key) if cache is not None else None
            if hit is not None:
                outcome = {**hit, "cached": True}
                counters.cache_hits += 1
            else:
                headers = {"x-keel-tags": header_tags}
                if rep > 0:  # a repeat wants a fresh sample, not the gateway's cached answer
                    headers["x-keel-cache"] = "no-cache"
                counters.in_flight += 1
                counters.max_in_flight = max(counters.max_in_flight, counters.in_flight)
                try:
                    outcome, used = await _call_gateway(http, v, messages, headers, retries, backoff_s)
                finally:
                    counters.in_flight -= 1
                counters.calls += 1 + used
                counters.retries += used
                if cache is not None and "error" not in outcome:
                    cache.put(key, outcome)
        row["output"] = outcome.get("output")
        row["error"] = outcome.get("error")
        row["trace_id"] = outcome.get("trace_id")
        row["latency_ms"] = None if outcome.get("cached") else outcome.get("latency_ms")
        row["cached"] = bool(outcome.get("cached"))
        if row["error"] is None:
            inp = ScoreInput(
                output=row["output"] or "",
                input=item.get("input"),
                expected=item.get("expected"),
                contexts=tuple(item.get("contexts") or ()),
                metadata=item.get("metadata") or {},
                tool_calls=tuple(outcome.get("tool_calls") or ()),
                prompt=tuple(messages),
                trace_id=row["trace_id"],
            )
            row["scores"], cost = await _score_all(scorers, inp)
            counters.scoring_cost += cost
        else:
            row["scores"] = {name: {"value": None, "error": "generation_error"} for name, _, _ in scorers}
        return row

    async def worker() -> None:
        while True:
            try:
                v, item, rep = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            row = await one(v, item, rep)
            results.append(row)
            if on_result is not None:
                await on_result(row)
            if on_progress is not None:
                on_progress(len(results), total)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, total)))))
    return results, counters


# -- a whole run ------------------------------------------------------------------------------------


async def execute_suite(
    suite: Suite,
    client: EvalClient,
    *,
    label: str | None = None,
    concurrency: int | None = None,
    cache_dir: str | Path | None = None,
    on_progress: ProgressFn | None = None,
    on_start: Callable[[dict[str, Any], int], None] | None = None,
    embed: Any = None,
) -> RunReport:
    """Resolve, run, score and store a suite; returns the stored run with its summary and cost."""
    dataset, items = await load_items(suite, client)
    variants = await resolve_variants(suite, client)
    ctx = ScorerContext(http=client.http, embed=embed, concurrency=concurrency or suite.concurrency)
    scorers = build_scorers(suite, ctx)
    config = suite.model_dump(mode="json", exclude={"base_dir"})
    config["variants"] = [
        {"name": v.name, "model": v.model, "params": v.params, "prompt": v.prompt_ref} for v in variants
    ]
    run = await client.create_run(
        {
            "suite": suite.name,
            "label": label,
            "dataset": dataset["id"] if dataset else None,
            "dataset_version": dataset["version"] if dataset else None,
            "config": config,
            "item_count": len(items),
        }
    )
    total = len(items) * len(variants) * suite.repeats
    if on_start is not None:
        on_start(run, total)
    cache = (
        OutputCache(Path(cache_dir) / "outputs.sqlite") if (suite.cache and cache_dir is not None) else None
    )
    pending: list[dict[str, Any]] = []
    flush_lock = asyncio.Lock()

    async def flush() -> None:
        async with flush_lock:
            if pending:
                batch = pending[:]
                pending.clear()
                await client.add_results(run["id"], batch)

    async def on_result(row: dict[str, Any]) -> None:
        pending.append(row)
        if len(pending) >= _RESULT_BATCH:
            await flush()

    status = "failed"
    try:
        results, counters = await generate_and_score(
            client.http,
            variants,
            items,
            scorers,
            concurrency=concurrency or suite.concurrency,
            repeats=suite.repeats,
            retries=suite.retries,
            backoff_s=suite.retry_backoff_s,
            cache=cache,
            tags=[f"eval:{suite.name}", f"eval-run:{run['id']}"],
            on_result=on_result,
            on_progress=on_progress,
        )
        await flush()
        status = "completed"
    finally:
        if cache is not None:
            cache.close()
        if status != "completed":
            try:
                await client.finish_run(run["id"], status="failed", summary={}, scoring_cost_usd=0.0)
            except Exception:
                pass
    summary = summarise(results)
    summary["calls"] = counters.calls
    summary["cache_hits"] = counters.cache_hits
    summary["retries"] = counters.retries
    summary["max_in_flight"] = counters.max_in_flight
    stored = await client.finish_run(
        run["id"], status="completed", summary=summary, scoring_cost_usd=counters.scoring_cost
    )
    return RunReport(stored, results, summary, counters.calls, counters.cache_hits, counters.retries)
