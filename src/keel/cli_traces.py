"""`keel traces ...`: export a filtered set of traces from the store to a JSONL or CSV file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

__all__ = ["traces"]

console = Console(stderr=True)


def _when(value: str | None, name: str) -> datetime | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time", param_hint=f"--{name}") from None
    return dt.astimezone(UTC).replace(tzinfo=None) if dt.tzinfo is not None else dt


@click.group()
def traces() -> None:
    """Work with stored traces."""


@traces.command("export")
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False),
    default=None,
    help="YAML config file (env KEEL_CONFIG).",
)
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--out", "out_path", required=True, help="File to write ('-' for standard output).")
@click.option(
    "--include", default=None, help="JSONL only: comma-separated spans,scores to embed in each trace."
)
@click.option("--project", default=None, help="Project name or id (default: every project).")
@click.option("--model", default=None)
@click.option("--status", type=click.Choice(["ok", "error"]), default=None)
@click.option("--user", default=None)
@click.option("--session", default=None)
@click.option("--tag", default=None)
@click.option("--prompt", default=None, help="Registry prompt name.")
@click.option("--prompt-version", type=click.IntRange(min=1), default=None, help="Version of --prompt.")
@click.option("--start", default=None, help="ISO 8601: traces starting at or after.")
@click.option("--end", default=None, help="ISO 8601: traces starting before.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Export at most this many traces.")
def export_cmd(
    config: str | None,
    fmt: str,
    out_path: str,
    include: str | None,
    project: str | None,
    model: str | None,
    status: str | None,
    user: str | None,
    session: str | None,
    tag: str | None,
    prompt: str | None,
    prompt_version: int | None,
    start: str | None,
    end: str | None,
    limit: int | None,
) -> None:
    """Export traces (newest first) as JSON Lines or CSV, in constant memory."""
    from keel.cli import _fail, _settings, _store
    from keel.store import TraceFilter
    from keel.store.export import INCLUDES, csv_chunks, iter_trace_batches, jsonl_chunks

    wanted = {x.strip() for x in (include or "").split(",") if x.strip()}
    if wanted - set(INCLUDES):
        _fail(
            f"--include: unknown {', '.join(sorted(wanted - set(INCLUDES)))} (known: {', '.join(INCLUDES)})"
        )
    if wanted and fmt != "jsonl":
        _fail("--include needs --format jsonl (CSV rows are flat)")
    f = TraceFilter(
        model=model,
        status=status,
        user=user,
        session=session,
        tag=tag,
        prompt_name=prompt,
        prompt_version=prompt_version,
        start=_when(start, "start"),
        end=_when(end, "end"),
    )
    store = _store(_settings(config))
    if project:
        proj = store.get_project(project)
        if proj is None:
            _fail(f"project {project!r} not found")
        f.project_id = proj["id"]
    plain = all(v is None for k, v in vars(f).items() if k != "project_id")
    total = store.count_traces(f.project_id) if plain else None  # filtered counts would cost a full scan
    if total is not None and limit is not None:
        total = min(total, limit)

    written = 0
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]exporting traces"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )

    def counted() -> Iterator[list[dict[str, Any]]]:
        nonlocal written
        for rows in iter_trace_batches(
            store, f, limit=limit, spans="spans" in wanted, scores="scores" in wanted
        ):
            written += len(rows)
            progress.update(task, completed=written)
            yield rows

    sink: IO[bytes]
    with progress:
        task = progress.add_task("export", total=total)
        sink = sys.stdout.buffer if out_path == "-" else open(out_path, "wb")
        try:
            chunks = jsonl_chunks(counted()) if fmt == "jsonl" else csv_chunks(counted())
            for chunk in chunks:
                sink.write(chunk)
        finally:
            if sink is not sys.stdout.buffer:
                sink.close()
        progress.update(task, total=written, completed=written)
    store.close()
    where = "standard output" if out_path == "-" else out_path
    console.print(f"Exported {written} traces to {where} ({fmt}).", highlight=False)
