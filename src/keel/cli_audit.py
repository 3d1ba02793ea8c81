"""`keel audit`: read the hash-chained audit log and verify it has not been tampered with."""

from __future__ import annotations

import sys
from typing import Any

import click
from rich.console import Console
from rich.table import Table

__all__ = ["audit_group"]

console = Console(stderr=True)
out = Console()


def _store(config: str | None) -> Any:
    from keel.config import load_settings
    from keel.errors import ConfigError
    from keel.server.app import database_url
    from keel.store import Store

    try:
        settings = load_settings(config, overrides={"config": config})
        return Store.from_url(database_url(settings))
    except ConfigError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)
    except Exception as exc:
        console.print(f"[bold red]error:[/] cannot open the database: {exc}", highlight=False)
        sys.exit(2)


config_option = click.option(
    "--config", "config", type=click.Path(dir_okay=False), default=None, help="YAML config file."
)


@click.group("audit")
def audit_group() -> None:
    """The audit log of administrative actions (append-only, hash-chained)."""


@audit_group.command("verify")
@config_option
def audit_verify(config: str | None) -> None:
    """Recompute the hash chain; exit 1 and name the first bad record if anything was altered."""
    from keel.store import audit

    with console.status("verifying the audit chain..."):
        v = audit.verify(_store(config))
    if v.ok:
        out.print(f"audit log OK: {v.checked} records, head {v.head_seq}", highlight=False)
        return
    out.print(
        f"[bold red]audit log TAMPERED[/]: record {v.first_bad_seq}: {v.problem} "
        f"({v.checked} records checked, head {v.head_seq})",
        highlight=False,
    )
    sys.exit(1)


@audit_group.command("list")
@config_option
@click.option("--action", default=None, help="Only this action, e.g. key.create.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def audit_list(config: str | None, action: str | None, limit: int, as_json: bool) -> None:
    """The newest records first."""
    import orjson

    from keel.store import audit

    rows = audit.list_records(_store(config), action=action, limit=limit)
    if as_json:
        for r in rows:
            out.print(orjson.dumps(r).decode(), highlight=False, soft_wrap=True)
        return
    table = Table("seq", "at", "actor", "action", "target", "project")
    for r in rows:
        table.add_row(
            str(r["seq"]), r["at"] or "", r["actor"], r["action"], r["target"] or "", r["project_id"] or ""
        )
    out.print(table)
