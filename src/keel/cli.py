"""The `keel` command line."""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click
from rich.console import Console
from rich.table import Table

import keel
from keel.cli_audit import audit_group
from keel.cli_eval import eval_group
from keel.cli_judge import judge_agreement_cmd
from keel.cli_prompts import prompts
from keel.cli_secrets import secrets
from keel.cli_traces import traces
from keel.cli_users import users
from keel.config import SETTINGS, Settings, load_settings
from keel.errors import ConfigError

__all__ = ["main"]

console = Console(stderr=True)
out = Console()


def _fail(msg: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _settings(config: str | None, **overrides: Any) -> Settings:
    try:
        return load_settings(config, overrides={"config": config, **overrides})
    except ConfigError as exc:
        _fail(str(exc))


def _store(settings: Settings) -> Any:
    from keel.server.app import database_url
    from keel.store import Store

    try:
        return Store.from_url(database_url(settings))
    except Exception as exc:  # connection refused, bad credentials, ...
        _fail(
            f"cannot open the database {settings.database_url}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        )


def _db_label(settings: Settings) -> str:
    """The database in use, without credentials."""
    from keel.server.app import database_url

    return database_url(settings).split("@")[-1]


def _notify_keys_changed(settings: Settings) -> None:
    """Tell running replicas to reload their key cache (they also refresh every key_refresh_s)."""
    if not settings.redis_url:
        return
    import redis

    from keel.gateway.auth import keys_channel

    try:
        r = redis.Redis.from_url(settings.redis_url)
        n = r.publish(keys_channel(settings.redis_prefix), b"1")
        r.close()
        console.print(f"Notified {n} running keel process(es) through Redis.", highlight=False)
    except Exception as exc:
        console.print(f"[yellow]warning:[/] could not notify replicas through Redis: {exc}")


def _audit(store: Any, action: str, target: str, project_id: str | None, details: dict[str, Any]) -> None:
    """Record a CLI administrative action in the audit log (actor ``cli:<os user>``)."""
    import getpass

    from keel.store import audit

    try:
        who = getpass.getuser()
    except Exception:
        who = "unknown"
    audit.record(
        store, actor=f"cli:{who}", action=action, target=target, project_id=project_id, details=details
    )


config_option = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config file (env KEEL_CONFIG; default ./keel.yaml).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(keel.__version__, "--version", prog_name="keel")
def main() -> None:
    """keel — LLM gateway, tracing and LLMOps platform.

    Start with `keel serve`; manage virtual keys with `keel keys`.
    """


@main.command()
@config_option
@click.option("--host", default=None, help="Bind address (env KEEL_HOST; default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (env KEEL_PORT; default 4000).")
@click.option("--workers", type=int, default=None, help="Server processes (env KEEL_WORKERS; default 1).")
def serve(config: str | None, host: str | None, port: int | None, workers: int | None) -> None:
    """Run the gateway, API and UI."""
    import uvicorn

    from keel.server.app import create_app, effective_models
    from keel.server.masterkey import resolve_master_key

    settings = _settings(config, host=host, port=port, workers=workers)
    key, created = resolve_master_key(settings)
    store = _store(settings)  # runs migrations once, before any worker starts
    try:
        create_app(settings, store=store)  # validates models and providers; errors name the key
    except ConfigError as exc:
        _fail(str(exc))
    finally:
        store.close()
    if created:
        console.print(
            f"[bold green]Generated master key[/] (saved to {settings.data_dir}/master_key, shown once):"
        )
        console.print(f"  {key}", highlight=False)
    names = sorted({m.name for m in effective_models(settings)})
    console.print(
        f"keel {keel.__version__} on [bold]http://{settings.host}:{settings.port}[/] · "
        f"db {_db_label(settings)} · models: {', '.join(names) or '(none configured)'}",
        highlight=False,
    )
    # workers rebuild settings from the environment: pass the CLI's choices down
    env = {"KEEL_HOST": settings.host, "KEEL_PORT": str(settings.port), "KEEL_WORKERS": str(settings.workers)}
    if settings.config:
        env["KEEL_CONFIG"] = os.path.abspath(settings.config)
    os.environ.update(env)
    os.environ["KEEL_SKIP_MIGRATIONS"] = "1"
    uvicorn.run(
        "keel.server.factory:app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )


@main.group()
def keys() -> None:
    """Create, list and revoke virtual keys."""


@keys.command("create")
@config_option
@click.option("--project", default="default", show_default=True, help="Project name (created when missing).")
@click.option("--name", default="default", show_default=True, help="A label for the key.")
@click.option("--models", default=None, help="Comma-separated model names the key may use (default: all).")
@click.option("--team", default=None, help="Team in the project (created when missing).")
@click.option("--user", "end_user", default=None, help="End user the key's requests are attributed to.")
@click.option("--public", is_flag=True, help="A pk-keel- key that may only post end-user feedback.")
def keys_create(
    config: str | None,
    project: str,
    name: str,
    models: str | None,
    team: str | None,
    end_user: str | None,
    public: bool,
) -> None:
    """Create a key; the secret is printed once and only its hash is stored."""
    settings = _settings(config)
    store = _store(settings)
    allowed = [m.strip() for m in models.split(",") if m.strip()] if models else None
    if public and (allowed or team or end_user):
        _fail("a public key takes no --models, --team or --user")
    kind = "public" if public else "secret"
    secret, row = store.create_key(project, name, allowed, team=team, end_user=end_user, kind=kind)
    _audit(
        store,
        "key.create",
        row.id,
        row.project_id,
        {"name": name, "kind": kind, "models": allowed, "team": team},
    )
    _notify_keys_changed(settings)
    console.print(
        f"Created key [bold]{row.id}[/] in project {row.project_name} (shown once):", highlight=False
    )
    out.print(secret, highlight=False)


@keys.command("list")
@config_option
@click.option("--project", default=None, help="Only this project's keys.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keys_list(config: str | None, project: str | None, as_json: bool) -> None:
    """List keys (never their secrets)."""
    settings = _settings(config)
    store = _store(settings)
    pid = None
    if project:
        p = store.get_project(project)
        if p is None:
            _fail(f"project {project!r} not found")
        pid = p["id"]
    rows = [r.public() for r in store.list_keys(project_id=pid)]
    if as_json:
        import orjson

        out.print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode(), highlight=False)
        return
    table = Table("id", "project", "name", "prefix", "models", "status", "created")
    for r in rows:
        table.add_row(
            r["id"],
            r["project"],
            r["name"],
            r["key_prefix"] + "…",
            ",".join(r["models"] or ["*"]),
            r["status"],
            r["created_at"][:19],
        )
    out.print(table)


@keys.command("revoke")
@config_option
@click.argument("key_id")
def keys_revoke(config: str | None, key_id: str) -> None:
    """Revoke a key by id."""
    settings = _settings(config)
    store = _store(settings)
    row = store.revoke_key(key_id)
    if row is None:
        _fail(f"key {key_id!r} not found", 1)
    _audit(store, "key.revoke", row.id, row.project_id, {"name": row.name})
    _notify_keys_changed(settings)
    console.print(f"Revoked {row.id} ({row.name}, project {row.project_name}).", highlight=False)


@main.group()
def db() -> None:
    """Database maintenance."""


@db.command("migrate")
@config_option
def db_migrate(config: str | None) -> None:
    """Apply the schema migrations shipped with keel."""
    settings = _settings(config)
    _store(settings)
    console.print(f"Database {_db_label(settings)} is at the newest schema.", highlight=False)


@main.command("settings")
def settings_cmd() -> None:
    """Document every setting: environment variable, default, meaning."""
    table = Table("env", "config key", "default", "meaning")
    for s in SETTINGS:
        table.add_row(s.env, s.name, repr(s.default), s.doc)
    out.print(table)


main.add_command(traces)
main.add_command(prompts)
main.add_command(eval_group)
eval_group.add_command(judge_agreement_cmd)
main.add_command(audit_group)
main.add_command(secrets)
main.add_command(users)

if __name__ == "__main__":
    main()
