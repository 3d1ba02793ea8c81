"""`keel users`: the people who sign in to the UI, their roles per project, and their passwords.

Passwords are read from a prompt (typed twice) or, with ``--password-stdin``, from standard input;
never from an argument, which would land in shell history and ``ps``.  Every change is in the audit
log with the actor ``cli``.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

__all__ = ["users"]

console = Console(stderr=True)
out = Console()

config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), default=None, help="YAML config file."
)
stdin_option = click.option(
    "--password-stdin",
    is_flag=True,
    help="Read the password from standard input (one line) instead of a prompt.",
)


def _fail(msg: str, code: int = 1) -> NoReturn:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _store(config: str | None) -> Any:
    from keel.config import load_settings
    from keel.errors import ConfigError
    from keel.server.app import database_url
    from keel.store import Store

    try:
        settings = load_settings(config, overrides={"config": config})
        return Store.from_url(database_url(settings))
    except ConfigError as exc:
        _fail(str(exc), 2)
    except Exception as exc:
        _fail(f"cannot open the database: {exc}", 2)


def _password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            _fail("no password on standard input")
        return line
    value: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return value


def _audit(store: Any, action: str, target: str, project_id: str | None, details: dict[str, Any]) -> None:
    from keel.store import audit

    audit.record(store, actor="cli", action=action, target=target, project_id=project_id, details=details)


def _run(fn: Any, *args: Any, **kw: Any) -> Any:
    from keel.errors import KeelError

    try:
        return fn(*args, **kw)
    except KeelError as err:
        _fail(err.message)


def _project(store: Any, ref: str) -> str:
    found = store.get_project(ref)
    if found is None:
        _fail(f"project {ref!r} not found (keel keys create --project {ref} makes it)")
    return str(found["id"])


@click.group("users")
def users() -> None:
    """People who sign in to the UI, and their roles (admin, developer, viewer) per project."""


@users.command("create")
@config_option
@click.argument("name")
@click.option("--email", default=None, help="Email (also accepted as the sign-in name).")
@click.option("--project", default=None, help="Project id or name to add the user to.")
@click.option(
    "--role", type=click.Choice(["admin", "developer", "viewer"]), default="viewer", show_default=True
)
@click.option("--owner", is_flag=True, help="An organisation owner: every project, every action.")
@stdin_option
def users_create(
    config: str | None,
    name: str,
    email: str | None,
    project: str | None,
    role: str,
    owner: bool,
    password_stdin: bool,
) -> None:
    """Create a user (the password is asked for twice, or read from stdin)."""
    from keel.store import access

    store = _store(config)
    pid = _project(store, project) if project else None
    password = _password(password_stdin)
    user = _run(access.create_user, store, name, password, email=email, owner=owner)
    if pid:
        user, _ = _run(access.add_membership, store, user["id"], pid, role)
    _audit(
        store,
        "user.create",
        user["id"],
        None,
        {"name": name, "owner": owner, "memberships": user["memberships"]},
    )
    out.print(f"created user {name} ({user['id']})", highlight=False)


@users.command("list")
@config_option
@click.option("--project", default=None, help="Only the members of this project.")
def users_list(config: str | None, project: str | None) -> None:
    """Users, their roles per project, and whether they are disabled."""
    from keel.store import access

    store = _store(config)
    rows = access.list_users(store, _project(store, project) if project else None)
    table = Table("id", "name", "email", "owner", "status", "roles")
    for u in rows:
        roles = ", ".join(f"{m['project']}: {m['role']}" for m in u["memberships"]) or "-"
        table.add_row(
            u["id"],
            u["name"],
            u["email"] or "-",
            "yes" if u["owner"] else "",
            "disabled" if u["disabled"] else "active",
            roles,
        )
    out.print(table)


@users.command("set-role")
@config_option
@click.argument("name")
@click.argument("project")
@click.argument("role", type=click.Choice(["admin", "developer", "viewer", "none"]))
def users_set_role(config: str | None, name: str, project: str, role: str) -> None:
    """Give NAME a ROLE in PROJECT (`none` takes them out of it)."""
    from keel.store import access

    store = _store(config)
    pid = _project(store, project)
    if role == "none":
        previous = _run(access.remove_membership, store, name, pid)
        if previous is None:
            _fail(f"{name} is not a member of {project}")
        _audit(store, "membership.remove", name, pid, {"user": name, "previous": previous})
        out.print(f"{name} removed from {project}", highlight=False)
        return
    user, previous = _run(access.add_membership, store, name, pid, role)
    _audit(store, "membership.set", user["id"], pid, {"user": name, "role": role, "previous": previous})
    out.print(f"{name} is {role} in {project}", highlight=False)


@users.command("disable")
@config_option
@click.argument("name")
@click.option("--enable", is_flag=True, help="Re-enable the user instead.")
def users_disable(config: str | None, name: str, enable: bool) -> None:
    """Disable a user: their sessions end at once and they cannot sign in."""
    from keel.store import access

    store = _store(config)
    user = _run(access.set_disabled, store, name, not enable)
    _audit(store, "user.update", user["id"], None, {"name": user["name"], "disabled": not enable})
    out.print(f"{user['name']} {'enabled' if enable else 'disabled'}", highlight=False)


@users.command("passwd")
@config_option
@click.argument("name")
@stdin_option
def users_passwd(config: str | None, name: str, password_stdin: bool) -> None:
    """Set a user's password (their sessions end)."""
    from keel.store import access

    store = _store(config)
    if access.get_user(store, name) is None:
        _fail(f"user {name!r} not found")
    user = _run(access.set_password, store, name, _password(password_stdin))
    _audit(store, "user.update", user["id"], None, {"name": user["name"], "password": "changed"})
    out.print(f"password of {user['name']} changed", highlight=False)
