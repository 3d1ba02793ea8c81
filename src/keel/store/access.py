"""Users, their roles per project, and UI sessions.

Passwords are hashed with Argon2id (``argon2-cffi``); session tokens are random and only their
SHA-256 is stored, so a database dump signs nobody in.  Disabling a user, or changing their
password, revokes their sessions.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from keel.errors import BadRequest, KeelError, NotFound
from keel.store.models import Project
from keel.store.models_access import Membership, User, UserSession
from keel.store.repo import Store, iso, utcnow

__all__ = [
    "ROLES",
    "SessionInfo",
    "add_membership",
    "authenticate",
    "create_session",
    "create_user",
    "get_user",
    "hash_password",
    "list_members",
    "list_users",
    "remove_membership",
    "revoke_session",
    "session_info",
    "set_disabled",
    "set_owner",
    "set_password",
    "switch_project",
    "verify_password",
]

ROLES = ("admin", "developer", "viewer")
MIN_PASSWORD = 8
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,199}$")
_hasher = PasswordHasher()  # Argon2id with the library's RFC 9106 defaults
# a hash to verify against when the user is unknown, so both answers take the same time
_DUMMY = _hasher.hash(secrets.token_urlsafe(16))


def hash_password(password: str) -> str:
    """The Argon2id hash of a password (the PHC string: algorithm, parameters, salt, digest)."""
    if len(password) < MIN_PASSWORD:
        raise BadRequest(
            f"the password must have at least {MIN_PASSWORD} characters",
            code="weak_password",
            param="password",
        )
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise BadRequest(f"role must be one of {', '.join(ROLES)}", code="invalid_role", param="role")
    return role


def _user_dict(s: Session, u: User) -> dict[str, Any]:
    rows = s.execute(
        select(Membership.project_id, Project.name, Membership.role)
        .join(Project, Project.id == Membership.project_id)
        .where(Membership.user_id == u.id)
        .order_by(Project.name)
    ).all()
    return {
        "id": u.id,
        "name": u.name,
        "email": u.email,
        "owner": bool(u.is_owner),
        "disabled": bool(u.disabled),
        "created_at": iso(u.created_at),
        "memberships": [{"project_id": pid, "project": pname, "role": role} for pid, pname, role in rows],
    }


def _find(s: Session, ref: str) -> User | None:
    return s.scalar(select(User).where(or_(User.id == ref, User.name == ref)))


def _require(s: Session, ref: str) -> User:
    u = _find(s, ref)
    if u is None:
        raise NotFound(f"user {ref!r} not found", code="user_not_found", param="user")
    return u


def create_user(
    store: Store, name: str, password: str, *, email: str | None = None, owner: bool = False
) -> dict[str, Any]:
    """Create a user; a name or email already taken is a 409."""
    if not _NAME.match(name or ""):
        raise BadRequest(
            "a user name has letters, digits and . _ @ + - (at most 200)", code="invalid_name", param="name"
        )
    digest = hash_password(password)
    try:
        with Session(store.engine) as s, s.begin():
            u = User(
                id="usr_" + uuid.uuid4().hex[:16],
                name=name,
                email=email or None,
                password_hash=digest,
                is_owner=owner,
                disabled=False,
                created_at=utcnow(),
            )
            s.add(u)
            s.flush()
            return _user_dict(s, u)
    except IntegrityError:
        raise KeelError(
            f"user {name!r} (or that email) exists already", status=409, code="conflict"
        ) from None


def get_user(store: Store, ref: str) -> dict[str, Any] | None:
    """A user by id or name, with memberships; None when missing."""
    with Session(store.engine) as s:
        u = _find(s, ref)
        return None if u is None else _user_dict(s, u)


def list_users(store: Store, project_id: str | None = None) -> list[dict[str, Any]]:
    """Every user, or the members of one project."""
    stmt = select(User).order_by(User.name)
    if project_id is not None:
        stmt = stmt.join(Membership, Membership.user_id == User.id).where(Membership.project_id == project_id)
    with Session(store.engine) as s:
        return [_user_dict(s, u) for u in s.scalars(stmt)]


def list_members(store: Store, project_id: str) -> list[dict[str, Any]]:
    with Session(store.engine) as s:
        rows = s.execute(
            select(User, Membership.role)
            .join(Membership, Membership.user_id == User.id)
            .where(Membership.project_id == project_id)
            .order_by(User.name)
        ).all()
        return [
            {"user_id": u.id, "user": u.name, "role": role, "disabled": bool(u.disabled)} for u, role in rows
        ]


def _revoke_all(s: Session, user_id: str) -> None:
    s.execute(
        update(UserSession)
        .where(UserSession.user_id == user_id, UserSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )


def set_password(store: Store, ref: str, password: str) -> dict[str, Any]:
    """Change a password; the user's sessions end."""
    digest = hash_password(password)
    with Session(store.engine) as s, s.begin():
        u = _require(s, ref)
        u.password_hash = digest
        _revoke_all(s, u.id)
        return _user_dict(s, u)


def set_disabled(store: Store, ref: str, disabled: bool = True) -> dict[str, Any]:
    """Disable (or re-enable) a user; disabling ends their sessions at once."""
    with Session(store.engine) as s, s.begin():
        u = _require(s, ref)
        u.disabled = disabled
        if disabled:
            _revoke_all(s, u.id)
        return _user_dict(s, u)


def set_owner(store: Store, ref: str, owner: bool) -> dict[str, Any]:
    with Session(store.engine) as s, s.begin():
        u = _require(s, ref)
        u.is_owner = owner
        return _user_dict(s, u)


def set_email(store: Store, ref: str, email: str | None) -> dict[str, Any]:
    try:
        with Session(store.engine) as s, s.begin():
            u = _require(s, ref)
            u.email = email or None
            s.flush()
            return _user_dict(s, u)
    except IntegrityError:
        raise KeelError("that email belongs to another user", status=409, code="conflict") from None


def delete_user(store: Store, ref: str) -> dict[str, Any]:
    with Session(store.engine) as s, s.begin():
        u = _require(s, ref)
        out = _user_dict(s, u)
        s.execute(delete(UserSession).where(UserSession.user_id == u.id))
        s.execute(delete(Membership).where(Membership.user_id == u.id))
        s.delete(u)
        return out


def add_membership(store: Store, ref: str, project_id: str, role: str) -> tuple[dict[str, Any], str | None]:
    """Give a user ``role`` in a project; returns (user, previous role or None)."""
    _check_role(role)
    with Session(store.engine) as s, s.begin():
        u = _require(s, ref)
        if s.get(Project, project_id) is None:
            raise NotFound(f"project {project_id!r} not found", param="project")
        m = s.get(Membership, (u.id, project_id))
        previous = m.role if m is not None else None
        if m is None:
            s.add(Membership(user_id=u.id, project_id=project_id, role=role, created_at=utcnow()))
        else:
            m.role = role
        s.flush()
        return _user_dict(s, u), previous


def remove_membership(store: Store, ref: str, project_id: str) -> str | None:
    """Take a user out of a project; returns the role they had (None: they were not a member)."""
    with Session(store.engine) as s, s.begin():
        u = _require(s, ref)
        m = s.get(Membership, (u.id, project_id))
        if m is None:
            return None
        role = m.role
        s.delete(m)
        s.execute(
            update(UserSession)
            .where(UserSession.user_id == u.id, UserSession.project_id == project_id)
            .values(project_id=None)
        )
        return role


def authenticate(store: Store, name: str, password: str) -> dict[str, Any] | None:
    """The user whose name (or email) and password match, unless disabled; else None (same cost)."""
    with Session(store.engine) as s:
        u = s.scalar(select(User).where(or_(User.name == name, User.email == name)))
        if u is None:
            verify_password(_DUMMY, password)
            return None
        if not verify_password(u.password_hash, password) or u.disabled:
            return None
        return _user_dict(s, u)


# -- sessions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionInfo:
    """A live session: its user and the project they are looking at (with their role there)."""

    user_id: str
    user_name: str
    is_owner: bool
    project_id: str | None
    role: str | None
    projects: tuple[tuple[str, str, str], ...]  # (id, name, role) the user may switch to


def create_session(store: Store, user_id: str, ttl: timedelta) -> str:
    """Start a session and return its token (shown to the browser only; its hash is stored)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with Session(store.engine) as s, s.begin():
        s.add(
            UserSession(
                token_hash=_token_hash(token),
                user_id=user_id,
                project_id=None,
                created_at=now,
                expires_at=now + ttl,
            )
        )
    info = session_info(store, token)
    if info is not None and info.projects and info.project_id is None:
        switch_project(store, token, info.projects[0][0])
    return token


def _projects_of(s: Session, u: User) -> tuple[tuple[str, str, str], ...]:
    if u.is_owner:
        rows = s.execute(select(Project.id, Project.name).order_by(Project.name)).all()
        return tuple((pid, name, "admin") for pid, name in rows)
    return tuple(
        (pid, name, role)
        for pid, name, role in s.execute(
            select(Project.id, Project.name, Membership.role)
            .join(Membership, Membership.project_id == Project.id)
            .where(Membership.user_id == u.id)
            .order_by(Project.name)
        ).all()
    )


def session_info(store: Store, token: str, now: datetime | None = None) -> SessionInfo | None:
    """The session of a token when it is live (not revoked or expired, its user enabled); else None."""
    if not token:
        return None
    now = now or utcnow()
    with Session(store.engine) as s:
        row = s.execute(
            select(UserSession, User)
            .join(User, User.id == UserSession.user_id)
            .where(UserSession.token_hash == _token_hash(token))
        ).first()
        if row is None:
            return None
        sess, u = row
        if sess.revoked_at is not None or sess.expires_at <= now or u.disabled:
            return None
        projects = _projects_of(s, u)
        current = next((p for p in projects if p[0] == sess.project_id), None)
        return SessionInfo(
            user_id=u.id,
            user_name=u.name,
            is_owner=bool(u.is_owner),
            project_id=current[0] if current else None,
            role=current[2] if current else None,
            projects=projects,
        )


def switch_project(store: Store, token: str, project_id: str) -> bool:
    """Point a session at another project the user may see; False when they may not."""
    info = session_info(store, token)
    if info is None or project_id not in {p[0] for p in info.projects}:
        return False
    with Session(store.engine) as s, s.begin():
        s.execute(
            update(UserSession)
            .where(UserSession.token_hash == _token_hash(token))
            .values(project_id=project_id)
        )
    return True


def revoke_session(store: Store, token: str) -> None:
    with Session(store.engine) as s, s.begin():
        s.execute(
            update(UserSession)
            .where(UserSession.token_hash == _token_hash(token), UserSession.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
