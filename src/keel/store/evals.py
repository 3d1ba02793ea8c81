"""Queries of the evaluation core: versioned datasets and items, eval runs and their results.

Rows come back as plain dicts (the API's wire shape).  Items arrive already normalised by
:mod:`keel.evals.datasets` (each with a stable ``id``); this module only stores them.

Versioning: every change to a dataset's items bumps ``eval_datasets.version`` by one; an item
row lives from ``version_added`` up to (not including) ``version_removed``.  Adding an item whose
id is live with identical content changes nothing, so pushing the same file twice makes no new
version.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from sqlalchemy import Engine, and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from keel.errors import KeelError, NotFound
from keel.store.models import Trace
from keel.store.models_evals import EvalDataset, EvalDatasetItem, EvalResult, EvalRun
from keel.store.repo import iso, utcnow

__all__ = ["EvalStore"]

_ITEM_FIELDS = ("input", "expected", "contexts", "metadata")


def _dataset_dict(d: EvalDataset, item_count: int | None = None) -> dict[str, Any]:
    out = {
        "id": d.id,
        "project_id": d.project_id,
        "name": d.name,
        "description": d.description,
        "version": d.version,
        "created_at": iso(d.created_at),
        "updated_at": iso(d.updated_at),
    }
    if item_count is not None:
        out["item_count"] = item_count
    return out


def _item_dict(i: EvalDatasetItem) -> dict[str, Any]:
    return {
        "id": i.item_id,
        "input": i.input,
        "expected": i.expected,
        "contexts": i.contexts or [],
        "metadata": i.metadata_ or {},
        "source_trace_id": i.source_trace_id,
        "version_added": i.version_added,
    }


def _run_dict(r: EvalRun) -> dict[str, Any]:
    return {
        "id": r.id,
        "project_id": r.project_id,
        "suite": r.suite,
        "label": r.label,
        "dataset_id": r.dataset_id,
        "dataset": r.dataset_name,
        "dataset_version": r.dataset_version,
        "status": r.status,
        "config": r.config or {},
        "summary": r.summary or {},
        "item_count": r.item_count,
        "result_count": r.result_count,
        "cost_usd": r.cost_usd,
        "created_at": iso(r.created_at),
        "finished_at": iso(r.finished_at),
    }


def _result_dict(r: EvalResult) -> dict[str, Any]:
    return {
        "variant": r.variant,
        "item_id": r.item_id,
        "repeat": r.repeat,
        "output": r.output,
        "error": r.error,
        "trace_id": r.trace_id,
        "latency_ms": r.latency_ms,
        "cost_usd": r.cost_usd,
        "cached": r.cached,
        "scores": r.scores or {},
    }


def _content(item: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            k: item.get(k) or ([] if k == "contexts" else {} if k == "metadata" else None)
            for k in _ITEM_FIELDS
        },
        option=orjson.OPT_SORT_KEYS,
    )


def _live(version: int) -> Any:
    return and_(
        EvalDatasetItem.version_added <= version,
        or_(EvalDatasetItem.version_removed.is_(None), EvalDatasetItem.version_removed > version),
    )


class EvalStore:
    """All database access of the evaluation core."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- datasets ---------------------------------------------------------------------------------

    def list_datasets(self, project_id: str | None) -> list[dict[str, Any]]:
        """Datasets (of one project, or all), by name, with their live item counts."""
        with Session(self.engine) as s:
            q = select(EvalDataset).order_by(EvalDataset.name)
            if project_id is not None:
                q = q.where(EvalDataset.project_id == project_id)
            sets = list(s.scalars(q))
            counts: dict[str, int] = dict(
                s.execute(  # type: ignore[arg-type]
                    select(EvalDatasetItem.dataset_id, func.count())
                    .where(EvalDatasetItem.version_removed.is_(None))
                    .group_by(EvalDatasetItem.dataset_id)
                ).all()
            )
            return [_dataset_dict(d, int(counts.get(d.id, 0))) for d in sets]

    def find_dataset(self, project_id: str | None, ref: str) -> dict[str, Any] | None:
        """A dataset by id or name (names are unique within a project), or None."""
        with Session(self.engine) as s:
            d = self._find(s, project_id, ref)
            if d is None:
                return None
            n = s.scalar(
                select(func.count())
                .select_from(EvalDatasetItem)
                .where(EvalDatasetItem.dataset_id == d.id, EvalDatasetItem.version_removed.is_(None))
            )
            return _dataset_dict(d, int(n or 0))

    @staticmethod
    def _find(s: Session, project_id: str | None, ref: str) -> EvalDataset | None:
        d = s.get(EvalDataset, ref)
        if d is not None and (project_id is None or d.project_id == project_id):
            return d
        q = select(EvalDataset).where(EvalDataset.name == ref)
        if project_id is not None:
            q = q.where(EvalDataset.project_id == project_id)
        found = list(s.scalars(q.order_by(EvalDataset.created_at).limit(2)))
        if len(found) > 1:
            raise KeelError(
                f"dataset name {ref!r} exists in several projects: pass its id or a project",
                status=409,
                code="ambiguous_dataset",
            )
        return found[0] if found else None

    def create_dataset(self, project_id: str, name: str, description: str | None = None) -> dict[str, Any]:
        """A new empty dataset (version 0); 409 when the name is taken in the project."""
        now = utcnow()
        d = EvalDataset(
            id="ds_" + uuid.uuid4().hex[:20],
            project_id=project_id,
            name=name,
            description=description,
            version=0,
            created_at=now,
            updated_at=now,
        )
        out = _dataset_dict(d, 0)
        try:
            with Session(self.engine) as s, s.begin():
                s.add(d)
        except IntegrityError:
            raise KeelError(f"dataset {name!r} already exists", status=409, code="dataset_exists") from None
        return out

    def ensure_dataset(self, project_id: str, name: str, description: str | None = None) -> dict[str, Any]:
        found = self.find_dataset(project_id, name)
        if found is not None:
            return found
        try:
            return self.create_dataset(project_id, name, description)
        except KeelError:  # created concurrently
            again = self.find_dataset(project_id, name)
            if again is None:
                raise
            return again

    def update_dataset(self, dataset_id: str, description: str | None) -> None:
        with Session(self.engine) as s, s.begin():
            s.execute(update(EvalDataset).where(EvalDataset.id == dataset_id).values(description=description))

    def delete_dataset(self, dataset_id: str) -> bool:
        with Session(self.engine) as s, s.begin():
            s.execute(delete(EvalDatasetItem).where(EvalDatasetItem.dataset_id == dataset_id))
            n = s.execute(delete(EvalDataset).where(EvalDataset.id == dataset_id)).rowcount  # type: ignore[attr-defined]
        return bool(n)

    def add_items(
        self, dataset_id: str, items: Sequence[dict[str, Any]], *, replace: bool = False
    ) -> dict[str, Any]:
        """Upsert normalised items by ``id``; with ``replace`` the items not given are removed.

        Makes one new version when anything changed.  Returns the dataset plus
        ``added``/``updated``/``removed``/``unchanged`` counts.
        """
        with Session(self.engine) as s, s.begin():
            d = s.get(EvalDataset, dataset_id, with_for_update=True)
            if d is None:
                raise NotFound(f"dataset {dataset_id!r} not found", code="dataset_not_found")
            live = {
                i.item_id: i
                for i in s.scalars(
                    select(EvalDatasetItem).where(
                        EvalDatasetItem.dataset_id == dataset_id, EvalDatasetItem.version_removed.is_(None)
                    )
                )
            }
            new_version = d.version + 1
            now = utcnow()
            added = updated = unchanged = removed = 0
            seen: set[str] = set()
            for item in items:
                iid = str(item["id"])
                if iid in seen:
                    continue  # a repeated id: the first occurrence wins
                seen.add(iid)
                old = live.get(iid)
                if old is not None:
                    if _content(_item_dict(old)) == _content(item):
                        unchanged += 1
                        continue
                    old.version_removed = new_version
                    updated += 1
                else:
                    added += 1
                s.add(
                    EvalDatasetItem(
                        dataset_id=dataset_id,
                        item_id=iid,
                        version_added=new_version,
                        input=item.get("input"),
                        expected=item.get("expected"),
                        contexts=item.get("contexts") or None,
                        metadata_=item.get("metadata") or None,
                        source_trace_id=item.get("source_trace_id"),
                        created_at=now,
                    )
                )
            if replace:
                for iid, old in live.items():
                    if iid not in seen:
                        old.version_removed = new_version
                        removed += 1
            if added or updated or removed:
                d.version = new_version
                d.updated_at = now
            out = _dataset_dict(d, len(live) + added - removed)
        return {**out, "added": added, "updated": updated, "removed": removed, "unchanged": unchanged}

    def remove_items(self, dataset_id: str, item_ids: Iterable[str]) -> dict[str, Any]:
        """Remove live items (a new version when any was live); NotFound for an unknown dataset."""
        ids = list(dict.fromkeys(item_ids))
        with Session(self.engine) as s, s.begin():
            d = s.get(EvalDataset, dataset_id, with_for_update=True)
            if d is None:
                raise NotFound(f"dataset {dataset_id!r} not found", code="dataset_not_found")
            n = s.execute(
                update(EvalDatasetItem)
                .where(
                    EvalDatasetItem.dataset_id == dataset_id,
                    EvalDatasetItem.item_id.in_(ids),
                    EvalDatasetItem.version_removed.is_(None),
                )
                .values(version_removed=d.version + 1)
            ).rowcount  # type: ignore[attr-defined]
            if n:
                d.version += 1
                d.updated_at = utcnow()
            return {**_dataset_dict(d), "removed": int(n or 0)}

    def items(
        self, dataset_id: str, version: int | None = None, *, limit: int | None = None, offset: int = 0
    ) -> list[dict[str, Any]]:
        """The items live at ``version`` (default: the current one), in insertion order."""
        with Session(self.engine) as s:
            if version is None:
                cond: Any = EvalDatasetItem.version_removed.is_(None)
            else:
                cond = _live(version)
            q = (
                select(EvalDatasetItem)
                .where(EvalDatasetItem.dataset_id == dataset_id, cond)
                .order_by(EvalDatasetItem.id)
                .offset(offset)
            )
            if limit is not None:
                q = q.limit(limit)
            return [_item_dict(i) for i in s.scalars(q)]

    # -- runs -------------------------------------------------------------------------------------

    def create_run(
        self,
        project_id: str,
        *,
        suite: str,
        label: str | None,
        dataset: dict[str, Any] | None,
        config: dict[str, Any],
        item_count: int,
    ) -> dict[str, Any]:
        r = EvalRun(
            id="run_" + uuid.uuid4().hex[:20],
            project_id=project_id,
            suite=suite,
            label=label,
            dataset_id=dataset["id"] if dataset else None,
            dataset_name=dataset["name"] if dataset else None,
            dataset_version=dataset["version"] if dataset else None,
            status="running",
            config=config,
            summary=None,
            item_count=item_count,
            result_count=0,
            cost_usd=0.0,
            created_at=utcnow(),
            finished_at=None,
        )
        out = _run_dict(r)
        with Session(self.engine) as s, s.begin():
            s.add(r)
        return out

    def add_results(self, run_id: str, rows: Sequence[dict[str, Any]]) -> int:
        """Append results to a running run (NotFound / 409 when it is unknown or finished)."""
        with Session(self.engine) as s, s.begin():
            r = s.get(EvalRun, run_id, with_for_update=True)
            if r is None:
                raise NotFound(f"eval run {run_id!r} not found", code="run_not_found")
            if r.status != "running":
                raise KeelError(f"eval run {run_id!r} is {r.status}", status=409, code="run_finished")
            s.add_all(
                EvalResult(
                    run_id=run_id,
                    variant=row["variant"],
                    item_id=row["item_id"],
                    repeat=int(row.get("repeat") or 0),
                    output=row.get("output"),
                    error=row.get("error"),
                    trace_id=row.get("trace_id"),
                    latency_ms=row.get("latency_ms"),
                    cost_usd=row.get("cost_usd"),
                    cached=bool(row.get("cached")),
                    scores=row.get("scores") or {},
                )
                for row in rows
            )
            r.result_count += len(rows)
            return r.result_count

    def missing_traces(self, run_id: str) -> int:
        """How many fresh (uncached) results name a trace the writer has not stored yet."""
        with Session(self.engine) as s:
            n = s.scalar(
                select(func.count())
                .select_from(EvalResult)
                .outerjoin(Trace, Trace.trace_id == EvalResult.trace_id)
                .where(
                    EvalResult.run_id == run_id,
                    EvalResult.trace_id.is_not(None),
                    EvalResult.cached.is_(False),
                    Trace.trace_id.is_(None),
                )
            )
            return int(n or 0)

    def finish_run(
        self, run_id: str, *, status: str, summary: dict[str, Any], extra_cost_usd: float
    ) -> dict[str, Any]:
        """Close a run: copy each fresh result's cost from its trace, total the run's cost."""
        with Session(self.engine) as s, s.begin():
            r = s.get(EvalRun, run_id, with_for_update=True)
            if r is None:
                raise NotFound(f"eval run {run_id!r} not found", code="run_not_found")
            costs: dict[int, float | None] = dict(
                s.execute(  # type: ignore[arg-type]
                    select(EvalResult.id, Trace.cost_usd)
                    .join(Trace, Trace.trace_id == EvalResult.trace_id)
                    .where(EvalResult.run_id == run_id, EvalResult.cached.is_(False))
                ).all()
            )
            for rid, cost in costs.items():
                s.execute(update(EvalResult).where(EvalResult.id == rid).values(cost_usd=cost))
            generation = sum(c for c in costs.values() if c)
            r.cost_usd = round(generation + extra_cost_usd, 10)
            r.status = status
            r.summary = {**summary, "generation_cost_usd": generation, "scoring_cost_usd": extra_cost_usd}
            r.finished_at = utcnow()
            return _run_dict(r)

    def record_gate(self, run_id: str, gate: dict[str, Any]) -> dict[str, Any]:
        """Keep the server's gate verdict on the run (protected prompt labels move only on a pass)."""
        with Session(self.engine) as s, s.begin():
            r = s.get(EvalRun, run_id, with_for_update=True)
            if r is None:
                raise NotFound(f"eval run {run_id!r} not found", code="run_not_found")
            r.summary = {**(r.summary or {}), "gate": gate}
            return _run_dict(r)

    def list_runs(
        self, project_id: str | None, *, suite: str | None = None, label: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            q = select(EvalRun).order_by(EvalRun.created_at.desc(), EvalRun.id.desc()).limit(limit)
            if project_id is not None:
                q = q.where(EvalRun.project_id == project_id)
            if suite is not None:
                q = q.where(EvalRun.suite == suite)
            if label is not None:
                q = q.where(EvalRun.label == label)
            return [_run_dict(r) for r in s.scalars(q)]

    def get_run(self, project_id: str | None, ref: str) -> dict[str, Any] | None:
        """A run by id, else the newest completed run carrying ``ref`` as its label."""
        with Session(self.engine) as s:
            r = s.get(EvalRun, ref)
            if r is not None and (project_id is None or r.project_id == project_id):
                return _run_dict(r)
            q = (
                select(EvalRun)
                .where(EvalRun.label == ref, EvalRun.status == "completed")
                .order_by(EvalRun.created_at.desc(), EvalRun.id.desc())
                .limit(1)
            )
            if project_id is not None:
                q = q.where(EvalRun.project_id == project_id)
            r = s.scalar(q)
            return None if r is None else _run_dict(r)

    def results(self, run_id: str) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            rows = s.scalars(
                select(EvalResult)
                .where(EvalResult.run_id == run_id)
                .order_by(EvalResult.variant, EvalResult.id)
            )
            return [_result_dict(r) for r in rows]

    def delete_run(self, run_id: str) -> bool:
        with Session(self.engine) as s, s.begin():
            s.execute(delete(EvalResult).where(EvalResult.run_id == run_id))
            res = s.execute(delete(EvalRun).where(EvalRun.id == run_id))
            return bool(res.rowcount)  # type: ignore[attr-defined]
