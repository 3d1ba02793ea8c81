"""Human review: annotation queues of traces, reviewing an item (a ``human`` score on its trace), and
sending reviewed items to a dataset.

A queue scores one thing (``score_name``), on a 1-5 scale (``score_type: scale``, stored as a
numeric score) or yes/no (``boolean``).  Items come in picked by hand (API, trace page) or sampled
by an online rule with a ``queue_id``.  Functions are synchronous (callers in async code run them in
a thread) and take the :class:`~keel.store.Store`; ``project_id`` None means the master key's view
(every project).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, case, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from keel.errors import KeelError, NotFound
from keel.store import Store, iso, utcnow
from keel.store.models import Trace
from keel.store.models_review import AnnotationItem, AnnotationQueue
from keel.store.scores import add_score, delete_score

__all__ = [
    "SCORE_TYPES",
    "STATUSES",
    "add_item_once",
    "add_items",
    "create_queue",
    "delete_queue",
    "first_item",
    "get_item",
    "get_queue",
    "list_items",
    "list_queues",
    "neighbours",
    "review_item",
    "score_value",
    "send_to_dataset",
]

SCORE_TYPES = ("scale", "boolean")
STATUSES = ("pending", "done", "skipped")
MAX_BATCH = 1000


def _queue_dict(q: AnnotationQueue, counts: dict[str, int] | None = None) -> dict[str, Any]:
    counts = counts or {}
    return {
        "id": q.id,
        "project_id": q.project_id,
        "name": q.name,
        "description": q.description,
        "score_name": q.score_name,
        "score_type": q.score_type,
        "created_at": iso(q.created_at),
        "pending": counts.get("pending", 0),
        "done": counts.get("done", 0),
        "skipped": counts.get("skipped", 0),
    }


def _item_dict(i: AnnotationItem) -> dict[str, Any]:
    return {
        "id": i.id,
        "queue_id": i.queue_id,
        "trace_id": i.trace_id,
        "status": i.status,
        "value": i.value,
        "comment": i.comment,
        "reviewer": i.reviewer,
        "score_id": i.score_id,
        "source": i.source,
        "created_at": iso(i.created_at),
        "reviewed_at": iso(i.reviewed_at),
    }


def _visible(q: AnnotationQueue | None, project_id: str | None) -> bool:
    return q is not None and (project_id is None or q.project_id == project_id)


def create_queue(
    store: Store,
    *,
    name: str,
    score_name: str,
    score_type: str = "scale",
    description: str | None = None,
    project_id: str | None = None,
) -> dict[str, Any]:
    """A new, empty queue."""
    if score_type not in SCORE_TYPES:
        raise KeelError(
            f"score_type must be one of {', '.join(SCORE_TYPES)}", status=400, code="invalid_request"
        )
    q = AnnotationQueue(
        id="aq_" + uuid.uuid4().hex[:20],
        project_id=project_id,
        name=name,
        description=description,
        score_name=score_name,
        score_type=score_type,
        created_at=utcnow(),
    )
    with Session(store.engine) as s, s.begin():
        s.add(q)
        s.flush()
        return _queue_dict(q)


def _counts(s: Session, queue_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    if not queue_ids:
        return out
    stmt = (
        select(AnnotationItem.queue_id, AnnotationItem.status, func.count())
        .where(AnnotationItem.queue_id.in_(list(queue_ids)))
        .group_by(AnnotationItem.queue_id, AnnotationItem.status)
    )
    for qid, status, n in s.execute(stmt):
        out.setdefault(qid, {})[status] = int(n)
    return out


def list_queues(store: Store, project_id: str | None = None) -> list[dict[str, Any]]:
    """Queues (newest first) with their pending/done/skipped counts."""
    with Session(store.engine) as s:
        stmt = select(AnnotationQueue).order_by(AnnotationQueue.created_at.desc(), AnnotationQueue.id)
        if project_id is not None:
            stmt = stmt.where(AnnotationQueue.project_id == project_id)
        queues = list(s.scalars(stmt))
        counts = _counts(s, [q.id for q in queues])
        return [_queue_dict(q, counts.get(q.id)) for q in queues]


def get_queue(store: Store, queue_id: str, project_id: str | None = None) -> dict[str, Any] | None:
    with Session(store.engine) as s:
        q = s.get(AnnotationQueue, queue_id)
        if q is None or not _visible(q, project_id):
            return None
        return _queue_dict(q, _counts(s, [q.id]).get(q.id))


def delete_queue(store: Store, queue_id: str, project_id: str | None = None) -> bool:
    """Delete a queue and its items (the scores reviewers gave stay on their traces)."""
    with Session(store.engine) as s, s.begin():
        q = s.get(AnnotationQueue, queue_id)
        if q is None or not _visible(q, project_id):
            return False
        s.execute(delete(AnnotationItem).where(AnnotationItem.queue_id == queue_id))
        s.delete(q)
        return True


def add_items(
    store: Store,
    queue_id: str,
    trace_ids: Sequence[str],
    *,
    source: str = "manual",
    project_id: str | None = None,
) -> dict[str, Any]:
    """Put traces in a queue. Traces already there, unknown, or of another project are skipped."""
    if len(trace_ids) > MAX_BATCH:
        raise KeelError(f"at most {MAX_BATCH} traces at once", status=400, code="invalid_request")
    wanted = list(dict.fromkeys(trace_ids))
    with Session(store.engine) as s, s.begin():
        q = s.get(AnnotationQueue, queue_id)
        if q is None or not _visible(q, project_id):
            raise NotFound(f"queue {queue_id!r} not found", code="queue_not_found")
        scope = q.project_id
        known = {
            tid
            for tid, pid in s.execute(
                select(Trace.trace_id, Trace.project_id).where(Trace.trace_id.in_(wanted))
            )
            if scope is None or pid == scope
        }
        present = set(
            s.scalars(
                select(AnnotationItem.trace_id).where(
                    AnnotationItem.queue_id == queue_id, AnnotationItem.trace_id.in_(wanted)
                )
            )
        )
        now = utcnow()
        fresh = [t for t in wanted if t in known and t not in present]
        for tid in fresh:
            s.add(
                AnnotationItem(
                    queue_id=queue_id, trace_id=tid, status="pending", source=source[:64], created_at=now
                )
            )
    return {
        "added": len(fresh),
        "already_queued": sorted(present),
        "not_found": sorted(t for t in wanted if t not in known),
    }


def add_item_once(store: Store, queue_id: str, trace_id: str, source: str) -> bool:
    """Queue one trace unless it is there already (online rules; safe against a concurrent insert)."""
    try:
        with Session(store.engine) as s, s.begin():
            if s.get(AnnotationQueue, queue_id) is None:
                return False
            s.add(
                AnnotationItem(
                    queue_id=queue_id,
                    trace_id=trace_id,
                    status="pending",
                    source=source[:64],
                    created_at=utcnow(),
                )
            )
        return True
    except IntegrityError:
        return False


def list_items(
    store: Store,
    queue_id: str,
    *,
    status: str | None = None,
    limit: int = 100,
    after: int | None = None,
) -> list[dict[str, Any]]:
    """A queue's items in queue order (oldest first), with their trace's model, name and start."""
    conds = [AnnotationItem.queue_id == queue_id]
    if status is not None:
        conds.append(AnnotationItem.status == status)
    if after is not None:
        conds.append(AnnotationItem.id > after)
    stmt = (
        select(AnnotationItem, Trace.name, Trace.model, Trace.start_time, Trace.status)
        .outerjoin(Trace, Trace.trace_id == AnnotationItem.trace_id)
        .where(and_(*conds))
        .order_by(AnnotationItem.id)
        .limit(limit)
    )
    with Session(store.engine) as s:
        out = []
        for item, name, model, start, tstatus in s.execute(stmt):
            d = _item_dict(item)
            d["trace"] = {"name": name, "model": model, "start_time": iso(start), "status": tstatus}
            out.append(d)
        return out


def get_item(store: Store, item_id: int, project_id: str | None = None) -> dict[str, Any] | None:
    """One item with its queue, or None (also when the queue is in another project)."""
    with Session(store.engine) as s:
        item = s.get(AnnotationItem, item_id)
        if item is None:
            return None
        q = s.get(AnnotationQueue, item.queue_id)
        if q is None or not _visible(q, project_id):
            return None
        return {**_item_dict(item), "queue": _queue_dict(q)}


def neighbours(store: Store, item: dict[str, Any]) -> dict[str, Any]:
    """Previous and next item ids in the queue, the next pending one, and the item's position."""
    qid, iid = item["queue_id"], item["id"]
    with Session(store.engine) as s:
        base = select(AnnotationItem.id).where(AnnotationItem.queue_id == qid)
        prev_id = s.scalar(base.where(AnnotationItem.id < iid).order_by(AnnotationItem.id.desc()).limit(1))
        next_id = s.scalar(base.where(AnnotationItem.id > iid).order_by(AnnotationItem.id).limit(1))
        pending = base.where(AnnotationItem.status == "pending", AnnotationItem.id != iid)
        next_pending = s.scalar(pending.where(AnnotationItem.id > iid).order_by(AnnotationItem.id).limit(1))
        if next_pending is None:
            next_pending = s.scalar(pending.order_by(AnnotationItem.id).limit(1))
        position = s.scalar(
            select(func.count())
            .select_from(AnnotationItem)
            .where(AnnotationItem.queue_id == qid, AnnotationItem.id <= iid)
        )
        total = s.scalar(
            select(func.count()).select_from(AnnotationItem).where(AnnotationItem.queue_id == qid)
        )
    return {
        "prev": prev_id,
        "next": next_id,
        "next_pending": next_pending,
        "position": int(position or 0),
        "total": int(total or 0),
    }


def first_item(store: Store, queue_id: str) -> int | None:
    """The first pending item of a queue, else its first item."""
    with Session(store.engine) as s:
        order = case((AnnotationItem.status == "pending", 0), else_=1)
        return s.scalar(
            select(AnnotationItem.id)
            .where(AnnotationItem.queue_id == queue_id)
            .order_by(order, AnnotationItem.id)
            .limit(1)
        )


def score_value(score_type: str, value: Any) -> tuple[str, float | bool]:
    """(data_type, value) of a reviewer's answer; ValueError when it does not fit the queue."""
    if score_type == "boolean":
        if isinstance(value, bool):
            return "boolean", value
        if isinstance(value, str) and value.lower() in ("y", "yes", "true", "1", "n", "no", "false", "0"):
            return "boolean", value.lower() in ("y", "yes", "true", "1")
        if isinstance(value, int | float) and value in (0, 1):
            return "boolean", bool(value)
        raise ValueError("this queue takes yes or no")
    try:
        num = float(value)
    except (TypeError, ValueError):
        raise ValueError("this queue takes a score from 1 to 5") from None
    if isinstance(value, bool) or num not in (1.0, 2.0, 3.0, 4.0, 5.0):
        raise ValueError("this queue takes a score from 1 to 5")
    return "numeric", num


def review_item(
    store: Store,
    item_id: int,
    *,
    value: Any = None,
    comment: str | None = None,
    reviewer: str | None = None,
    skip: bool = False,
    project_id: str | None = None,
) -> dict[str, Any]:
    """Record a review: a ``human`` score named after the queue on the item's trace (a re-review
    replaces the earlier score), or ``skip``. Raises NotFound / KeelError(400)."""
    item = get_item(store, item_id, project_id)
    if item is None:
        raise NotFound(f"item {item_id} not found", code="item_not_found")
    queue = item["queue"]
    if item["score_id"]:
        delete_score(store, item["score_id"])
    score_id: str | None = None
    num: float | None = None
    if not skip:
        try:
            dtype, typed = score_value(queue["score_type"], value)
        except ValueError as exc:
            raise KeelError(str(exc), status=400, code="invalid_value") from None
        score = add_score(
            store,
            trace_id=item["trace_id"],
            name=queue["score_name"],
            data_type=dtype,
            value=typed,
            source="human",
            comment=comment or None,
            author=reviewer,
        )
        if score is None:
            raise NotFound(f"trace {item['trace_id']} is no longer stored", code="trace_not_found")
        score_id = score["id"]
        num = float(typed)
    with Session(store.engine) as s, s.begin():
        row = s.get(AnnotationItem, item_id)
        assert row is not None
        row.status = "skipped" if skip else "done"
        row.value = num
        row.comment = comment or None
        row.reviewer = reviewer
        row.score_id = score_id
        row.reviewed_at = utcnow()
        s.flush()
        return _item_dict(row)


def send_to_dataset(
    store: Store,
    queue_id: str,
    dataset: str,
    *,
    item_ids: Sequence[int] | None = None,
    expected_from_output: bool = True,
    project_id: str | None = None,
) -> dict[str, Any]:
    """Add reviewed items' traces to a dataset (created when missing) through the evaluation core's
    dataset store; each item's metadata carries the review (score, comment, reviewer)."""
    from keel.evals.datasets import DatasetFormatError, item_from_trace
    from keel.store.evals import EvalStore

    queue = get_queue(store, queue_id, project_id)
    if queue is None:
        raise NotFound(f"queue {queue_id!r} not found", code="queue_not_found")
    items = [i for i in list_items(store, queue_id, status="done", limit=100_000)]
    if item_ids is not None:
        wanted = set(item_ids)
        items = [i for i in items if i["id"] in wanted]
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    target_project = queue["project_id"]
    for it in items:
        trace = store.get_trace(it["trace_id"])
        if trace is None:
            skipped.append(it["trace_id"])
            continue
        try:
            row = item_from_trace(trace, expected_from_output=expected_from_output)
        except DatasetFormatError:
            skipped.append(it["trace_id"])
            continue
        meta = dict(row.get("metadata") or {})
        meta["review"] = {
            "queue": queue["name"],
            queue["score_name"]: it["value"],
            "comment": it["comment"],
            "reviewer": it["reviewer"],
        }
        row["metadata"] = meta
        rows.append(row)
        target_project = target_project or trace.get("project_id")
    if not rows:
        raise KeelError("no reviewed item with a stored LLM call to send", status=400, code="nothing_to_send")
    evals = EvalStore(store.engine)
    ds = evals.ensure_dataset(target_project or store.ensure_project("default"), dataset)
    result = evals.add_items(ds["id"], rows)
    return {**result, "skipped_traces": skipped}
