"""Queries of the prompt registry: versions, labels (with canary splits), the audit log, per-version metrics.

Rows come back as plain dicts; the service (:mod:`keel.prompts`) turns them into its types.
Every write records an audit event (actor and time) in the same transaction.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, case, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from keel.errors import BadRequest, KeelError, NotFound
from keel.store import audit
from keel.store.models import Project, Score, Span
from keel.store.models_prompts import Prompt, PromptEvent, PromptLabel, PromptVersion
from keel.store.repo import iso, utcnow

__all__ = ["PromptStore"]


def _version_dict(name: str, ptype: str, v: PromptVersion) -> dict[str, Any]:
    return {
        "name": name,
        "version": v.version,
        "type": ptype,
        "template": v.template,
        "variables": v.variables or [],
        "config": v.config or {},
        "metadata": v.metadata_ or {},
        "commit_message": v.commit_message,
        "author": v.author,
        "created_at": iso(v.created_at),
        "content_hash": v.content_hash,
    }


def _label_dict(lb: PromptLabel) -> dict[str, Any]:
    return {
        "label": lb.label,
        "version": lb.version,
        "split": lb.split,
        "updated_at": iso(lb.updated_at),
        "updated_by": lb.updated_by,
        "eval_run": lb.eval_run,
    }


def _state(lb: PromptLabel | None) -> dict[str, Any] | None:
    return None if lb is None else {"version": lb.version, "split": lb.split}


def _not_found(name: str) -> NotFound:
    return NotFound(f"prompt '{name}' not found", code="prompt_not_found", param="name")


class PromptStore:
    """All database access of the prompt registry."""

    def __init__(self, engine: Engine, project_id: str | None = None) -> None:
        self.engine = engine
        # every read and write is of this project's prompts (load_all alone spans every project)
        self.project_id = project_id

    def _named(self, name: str) -> Any:
        return and_(Prompt.name == name, Prompt.project_id == self.project_id)

    # -- reads ------------------------------------------------------------------------------------

    def list_prompts(self) -> list[dict[str, Any]]:
        with Session(self.engine) as s:
            prompts = list(
                s.scalars(select(Prompt).where(Prompt.project_id == self.project_id).order_by(Prompt.name))
            )
            ids = [p.id for p in prompts]
            labels: dict[str, list[dict[str, Any]]] = {}
            for lb in s.scalars(
                select(PromptLabel).where(PromptLabel.prompt_id.in_(ids)).order_by(PromptLabel.label)
            ):
                labels.setdefault(lb.prompt_id, []).append(_label_dict(lb))
            latest = {
                (v.prompt_id): v
                for v in s.scalars(
                    select(PromptVersion)
                    .join(
                        Prompt,
                        and_(
                            Prompt.id == PromptVersion.prompt_id,
                            Prompt.latest_version == PromptVersion.version,
                        ),
                    )
                    .where(Prompt.project_id == self.project_id)
                )
            }
            out = []
            for p in prompts:
                lv = latest.get(p.id)
                out.append(
                    {
                        **self._prompt_dict(p),
                        "labels": labels.get(p.id, []),
                        "metadata": (lv.metadata_ or {}) if lv else {},
                        "commit_message": lv.commit_message if lv else None,
                        "author": lv.author if lv else None,
                    }
                )
            return out

    @staticmethod
    def _prompt_dict(p: Prompt) -> dict[str, Any]:
        return {
            "name": p.name,
            "type": p.type,
            "latest_version": p.latest_version,
            "protected_labels": p.protected_labels or [],
            "created_at": iso(p.created_at),
            "updated_at": iso(p.updated_at),
        }

    def get_prompt(self, name: str) -> dict[str, Any] | None:
        """The prompt with its labels, or None."""
        with Session(self.engine) as s:
            p = s.scalar(select(Prompt).where(self._named(name)))
            if p is None:
                return None
            labels = s.scalars(
                select(PromptLabel).where(PromptLabel.prompt_id == p.id).order_by(PromptLabel.label)
            )
            return {**self._prompt_dict(p), "labels": [_label_dict(lb) for lb in labels]}

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every version of a prompt, newest first (NotFound when there is no such prompt)."""
        with Session(self.engine) as s:
            p = s.scalar(select(Prompt).where(self._named(name)))
            if p is None:
                raise _not_found(name)
            rows = s.scalars(
                select(PromptVersion)
                .where(PromptVersion.prompt_id == p.id)
                .order_by(PromptVersion.version.desc())
            )
            return [_version_dict(p.name, p.type, v) for v in rows]

    def version(self, name: str, version: int) -> dict[str, Any] | None:
        with Session(self.engine) as s:
            row = s.execute(
                select(Prompt, PromptVersion)
                .join(PromptVersion, PromptVersion.prompt_id == Prompt.id)
                .where(self._named(name), PromptVersion.version == version)
            ).first()
            return None if row is None else _version_dict(row[0].name, row[0].type, row[1])

    def default_project_id(self) -> str | None:
        """The id of the project named ``default`` (where the master key's prompts live), if any."""
        with Session(self.engine) as s:
            found: str | None = s.scalar(select(Project.id).where(Project.name == "default"))
            return found

    def load_all(self) -> list[dict[str, Any]]:
        """Every prompt with all its versions and labels (what the gateway's cache holds)."""
        with Session(self.engine) as s:
            prompts = {p.id: p for p in s.scalars(select(Prompt))}
            out: dict[str, dict[str, Any]] = {
                pid: {**self._prompt_dict(p), "project_id": p.project_id, "versions": [], "labels": []}
                for pid, p in prompts.items()
            }
            for v in s.scalars(select(PromptVersion)):
                p = prompts.get(v.prompt_id)
                if p is not None:
                    out[p.id]["versions"].append(_version_dict(p.name, p.type, v))
            for lb in s.scalars(select(PromptLabel)):
                if lb.prompt_id in out:
                    out[lb.prompt_id]["labels"].append(_label_dict(lb))
            return list(out.values())

    def history(self, name: str, label: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
        """Audit events of a prompt (optionally one label's moves), newest first."""
        with Session(self.engine) as s:
            p = s.scalar(select(Prompt).where(self._named(name)))
            if p is None:
                raise _not_found(name)
            stmt = select(PromptEvent).where(PromptEvent.prompt_id == p.id)
            if label is not None:
                stmt = stmt.where(PromptEvent.label == label)
            stmt = stmt.order_by(PromptEvent.created_at.desc(), PromptEvent.id.desc()).limit(limit)
            return [
                {
                    "id": e.id,
                    "prompt": e.prompt_name,
                    "action": e.action,
                    "label": e.label,
                    "version": e.version,
                    "detail": e.detail or {},
                    "actor": e.actor,
                    "created_at": iso(e.created_at),
                }
                for e in s.scalars(stmt)
            ]

    # -- writes -----------------------------------------------------------------------------------

    def push(
        self,
        name: str,
        ptype: str,
        *,
        template: Any,
        variables: list[dict[str, Any]],
        config: dict[str, Any],
        metadata: dict[str, Any],
        content_hash: str,
        commit_message: str | None,
        author: str | None,
        labels: list[str] | None = None,
        actor: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Store a new version unless it equals the newest one; returns (version, created).

        ``labels`` are moved onto the version (a created or the unchanged newest one) when they
        point elsewhere.
        """
        for attempt in range(3):
            try:
                return self._push(
                    name,
                    ptype,
                    template,
                    variables,
                    config,
                    metadata,
                    content_hash,
                    commit_message,
                    author,
                    labels,
                    actor or author,
                )
            except IntegrityError:  # a concurrent push created the prompt or took the version number
                if attempt == 2:
                    raise KeelError(
                        f"prompt '{name}' is being pushed concurrently; retry", status=409, code="conflict"
                    ) from None
        raise AssertionError("unreachable")

    def _push(
        self,
        name: str,
        ptype: str,
        template: Any,
        variables: list[dict[str, Any]],
        config: dict[str, Any],
        metadata: dict[str, Any],
        content_hash: str,
        commit_message: str | None,
        author: str | None,
        labels: list[str] | None,
        actor: str | None,
    ) -> tuple[dict[str, Any], bool]:
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            if self.project_id is None:
                raise BadRequest(
                    "prompts belong to a project: name one", code="invalid_request", param="project"
                )
            p = s.scalar(select(Prompt).where(self._named(name)).with_for_update())
            created_prompt = p is None
            if p is None:
                p = Prompt(
                    id="prm_" + uuid.uuid4().hex[:16],
                    project_id=self.project_id,
                    name=name,
                    type=ptype,
                    latest_version=0,
                    protected_labels=None,
                    created_at=now,
                    updated_at=now,
                )
                s.add(p)
                s.flush()
            elif p.type != ptype:
                raise BadRequest(
                    f"prompt '{name}' is a {p.type} prompt; a {ptype} version cannot be added",
                    code="invalid_prompt",
                    param="type",
                )
            latest = (
                s.scalar(
                    select(PromptVersion).where(
                        PromptVersion.prompt_id == p.id, PromptVersion.version == p.latest_version
                    )
                )
                if p.latest_version
                else None
            )
            created = latest is None or latest.content_hash != content_hash
            if created:
                row = PromptVersion(
                    prompt_id=p.id,
                    version=p.latest_version + 1,
                    template=template,
                    variables=variables or None,
                    config=config or None,
                    metadata_=metadata or None,
                    commit_message=commit_message,
                    author=author,
                    content_hash=content_hash,
                    created_at=now,
                )
                s.add(row)
                p.latest_version = row.version
                p.updated_at = now
                self._event(
                    s,
                    p,
                    "create" if created_prompt else "version",
                    actor,
                    now,
                    version=row.version,
                    detail={"commit_message": commit_message} if commit_message else None,
                )
                s.flush()
            else:
                assert latest is not None
                row = latest
            for label in labels or ():
                cur = s.get(PromptLabel, (p.id, label))
                if cur is not None and cur.version == row.version and not cur.split:
                    continue
                if label in (p.protected_labels or []):
                    raise KeelError(
                        f"label '{label}' of prompt '{name}' is protected: move it with an evaluation run",
                        status=409,
                        code="protected_label",
                    )
                self._move(s, p, label, row.version, None, actor, None, "label", now)
            return _version_dict(p.name, p.type, row), created

    def set_label(
        self,
        name: str,
        label: str,
        *,
        version: int | None = None,
        split: list[tuple[int, float]] | None = None,
        actor: str | None,
        eval_run: str | None = None,
    ) -> dict[str, Any]:
        """Point ``label`` at one version, or split its traffic (the heaviest version is its primary)."""
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            p = self._prompt_for_update(s, name)
            if label in (p.protected_labels or []):
                why = _failing_run(s, p.project_id, eval_run)
                if why:
                    raise KeelError(
                        f"label '{label}' of prompt '{name}' is protected: moving it needs a linked passing "
                        f"evaluation run ('eval_run'); {why}",
                        status=409,
                        code="protected_label",
                        param="eval_run",
                    )
            wanted = [v for v, _ in split] if split else [version]
            for v in wanted:
                if v is None or not (1 <= v <= p.latest_version):
                    raise NotFound(
                        f"prompt '{name}' has no version {v} (latest is {p.latest_version})",
                        code="version_not_found",
                        param="version",
                    )
            primary = max(split, key=lambda x: x[1])[0] if split else version
            assert primary is not None
            split_json = [{"version": v, "weight": w} for v, w in split] if split and len(split) > 1 else None
            lb = self._move(s, p, label, primary, split_json, actor, eval_run, "label", now)
            return _label_dict(lb)

    def rollback(
        self, name: str, label: str, *, actor: str | None, to_version: int | None = None
    ) -> dict[str, Any]:
        """Move ``label`` back to where it pointed before its last move (or to ``to_version``)."""
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            p = self._prompt_for_update(s, name)
            if to_version is not None:
                if not (1 <= to_version <= p.latest_version):
                    raise NotFound(
                        f"prompt '{name}' has no version {to_version}",
                        code="version_not_found",
                        param="to_version",
                    )
                lb = self._move(s, p, label, to_version, None, actor, None, "rollback", now)
                return _label_dict(lb)
            last = s.scalar(
                select(PromptEvent)
                .where(
                    PromptEvent.prompt_id == p.id,
                    PromptEvent.label == label,
                    PromptEvent.action.in_(("label", "rollback", "unlabel")),
                )
                .order_by(PromptEvent.created_at.desc(), PromptEvent.id.desc())
                .limit(1)
            )
            previous = (last.detail or {}).get("previous") if last is not None else None
            if not previous:
                raise KeelError(
                    f"label '{label}' of prompt '{name}' has no earlier position to roll back to",
                    status=409,
                    code="nothing_to_rollback",
                )
            lb = self._move(
                s, p, label, int(previous["version"]), previous.get("split"), actor, None, "rollback", now
            )
            return _label_dict(lb)

    def remove_label(self, name: str, label: str, *, actor: str | None) -> None:
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            p = self._prompt_for_update(s, name)
            lb = s.get(PromptLabel, (p.id, label))
            if lb is None:
                raise NotFound(f"prompt '{name}' has no label '{label}'", code="label_not_found")
            if label in (p.protected_labels or []):
                raise KeelError(
                    f"label '{label}' is protected and cannot be removed", status=409, code="protected_label"
                )
            self._event(
                s, p, "unlabel", actor, now, label=label, detail={"previous": _state(lb), "current": None}
            )
            s.delete(lb)

    def set_protected(self, name: str, labels: list[str], *, actor: str | None) -> dict[str, Any]:
        now = utcnow()
        with Session(self.engine) as s, s.begin():
            p = self._prompt_for_update(s, name)
            before = p.protected_labels or []
            p.protected_labels = sorted(set(labels)) or None
            p.updated_at = now
            self._event(
                s, p, "protect", actor, now, detail={"previous": before, "current": p.protected_labels or []}
            )
            return self._prompt_dict(p)

    # -- helpers ----------------------------------------------------------------------------------

    def _prompt_for_update(self, s: Session, name: str) -> Prompt:
        p = s.scalar(select(Prompt).where(self._named(name)).with_for_update())
        if p is None:
            raise _not_found(name)
        return p

    def _move(
        self,
        s: Session,
        p: Prompt,
        label: str,
        version: int,
        split: list[dict[str, Any]] | None,
        actor: str | None,
        eval_run: str | None,
        action: str,
        now: datetime,
    ) -> PromptLabel:
        lb = s.get(PromptLabel, (p.id, label))
        previous = _state(lb)
        if lb is None:
            lb = PromptLabel(prompt_id=p.id, label=label)
            s.add(lb)
        lb.version, lb.split, lb.eval_run = version, split, eval_run
        lb.updated_at, lb.updated_by = now, actor
        detail: dict[str, Any] = {"previous": previous, "current": {"version": version, "split": split}}
        if eval_run:
            detail["eval_run"] = eval_run
        self._event(s, p, action, actor, now, label=label, version=version, detail=detail)
        s.flush()
        return lb

    @staticmethod
    def _event(
        s: Session,
        p: Prompt,
        action: str,
        actor: str | None,
        now: datetime,
        *,
        label: str | None = None,
        version: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        s.add(
            PromptEvent(
                prompt_id=p.id,
                prompt_name=p.name,
                action=action,
                label=label,
                version=version,
                detail=detail,
                actor=actor,
                created_at=now,
            )
        )
        # and in the deployment-wide hash-chained audit log, in the same transaction
        audit.append(
            s.connection(),
            actor=actor or "unknown",
            action=f"prompt.{action}",
            target=p.name,
            project_id=p.project_id,
            details={"label": label, "version": version, **(detail or {})},
        )

    # -- metrics ----------------------------------------------------------------------------------

    def metrics(
        self,
        name: str,
        *,
        project_id: str | None = None,
        start: datetime | None = None,
        end: datetime | None = None,
        max_samples: int = 50_000,
    ) -> list[dict[str, Any]]:
        """Per version of a prompt: requests, errors, latency (mean, p50, p95), tokens, cost, mean scores."""
        conds: list[Any] = [Span.prompt_name == name, Span.kind == "llm"]
        if project_id is not None:
            conds.append(Span.project_id == project_id)
        if start is not None:
            conds.append(Span.start_time >= start)
        if end is not None:
            conds.append(Span.start_time < end)
        where = and_(*conds)
        errors = func.sum(case((Span.status == "error", 1), else_=0))
        stmt = (
            select(
                Span.prompt_version,
                func.count().label("requests"),
                errors.label("errors"),
                func.avg(Span.latency_ms).label("latency"),
                func.coalesce(func.sum(Span.input_tokens), 0).label("input_tokens"),
                func.coalesce(func.sum(Span.output_tokens), 0).label("output_tokens"),
                func.coalesce(func.sum(Span.cost_usd), 0.0).label("cost"),
            )
            .where(where)
            .group_by(Span.prompt_version)
            .order_by(Span.prompt_version)
        )
        with self.engine.connect() as conn:
            rows = {
                r.prompt_version: {
                    "version": r.prompt_version,
                    "requests": int(r.requests),
                    "errors": int(r.errors or 0),
                    "error_rate": (int(r.errors or 0) / int(r.requests)) if r.requests else 0.0,
                    "latency_ms_mean": round(float(r.latency or 0.0), 3),
                    "input_tokens": int(r.input_tokens or 0),
                    "output_tokens": int(r.output_tokens or 0),
                    "cost_usd": float(r.cost or 0.0),
                    "scores": {},
                }
                for r in conn.execute(stmt)
            }
            samples: dict[int | None, list[float]] = {}
            for v, lat in conn.execute(
                select(Span.prompt_version, Span.latency_ms)
                .where(where)
                .order_by(Span.start_time.desc())
                .limit(max_samples)
            ):
                samples.setdefault(v, []).append(float(lat))
            scores = (
                select(
                    Span.prompt_version,
                    Score.name,
                    func.avg(Score.value).label("mean"),
                    func.count().label("n"),
                )
                .select_from(Score)
                .join(Span, and_(Span.trace_id == Score.trace_id))
                .where(where, Score.value.is_not(None))
                .group_by(Span.prompt_version, Score.name)
            )
            for v, sname, mean, n in conn.execute(scores):
                if v in rows:
                    rows[v]["scores"][sname] = {"mean": round(float(mean), 6), "count": int(n)}
        for v, row in rows.items():
            lat = sorted(samples.get(v, []))
            row["latency_ms_p50"] = _pct(lat, 0.50)
            row["latency_ms_p95"] = _pct(lat, 0.95)
        return list(rows.values())


def _pct(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return round(sorted_values[i], 3)


def _failing_run(s: Session, project_id: str, ref: str | None) -> str | None:
    """Why ``ref`` cannot authorise a protected label move (None: it can).

    It must be an evaluation run of the same project that completed and whose gate, computed and
    recorded by the server (``keel eval run --baseline ... --gate``), passed.
    """
    if not ref:
        return "none was given"
    from keel.store.models_evals import EvalRun

    run = s.scalar(
        select(EvalRun)
        .where(EvalRun.project_id == project_id, or_(EvalRun.id == ref, EvalRun.label == ref))
        .order_by(EvalRun.created_at.desc())
        .limit(1)
    )
    if run is None:
        return f"run {ref!r} does not exist in this project"
    if run.status != "completed":
        return f"run {ref!r} is {run.status}"
    gate = (run.summary or {}).get("gate")
    if not isinstance(gate, dict):
        return f"run {ref!r} was never gated against a baseline"
    if not gate.get("passed"):
        return f"run {ref!r} failed its gate against {gate.get('baseline')!r}"
    return None
