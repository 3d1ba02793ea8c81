"""`keel eval ...`: run suites, gate on a baseline, manage datasets, compare runs — over keel's HTTP API.

The server is ``--url`` (env KEEL_BASE_URL, default http://127.0.0.1:4000) and the key ``--key``
(env KEEL_API_KEY, else KEEL_MASTER_KEY, else ``<data_dir>/master_key``).  Model calls go through
that server's gateway, so each is traced and costed; runs are stored by its API.

Exit status: 0 success, 1 the gate failed, 2 a usage, suite or server error.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from keel.evals import (
    DatasetFormatError,
    EvalApiError,
    EvalClient,
    SuiteError,
    dump_items,
    execute_suite,
    gate_failures,
    junit_xml,
    load_suite,
    markdown_summary,
    parse_items,
)

__all__ = ["eval_group"]

console = Console(stderr=True)
out = Console()


def _fail(msg: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {msg}", highlight=False)
    sys.exit(code)


def _key(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("KEEL_MASTER_KEY"):
        return os.environ["KEEL_MASTER_KEY"]
    path = Path(os.environ.get("KEEL_DATA_DIR", ".keel")) / "master_key"
    if path.is_file():
        return path.read_text().strip()
    _fail("no API key: pass --key or set KEEL_API_KEY")


class _Conn:
    def __init__(self, url: str, key: str | None) -> None:
        self.url = url
        self.key = key

    def client(self, concurrency: int = 8, timeout_s: float = 120.0) -> EvalClient:
        return EvalClient(
            self.url, _key(self.key), timeout_s=timeout_s, max_connections=max(16, concurrency + 8)
        )


def _run_async(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except (SuiteError, DatasetFormatError) as exc:
        _fail(str(exc))
    except EvalApiError as exc:
        _fail(str(exc))


@click.group("eval")
@click.option(
    "--url", envvar="KEEL_BASE_URL", default="http://127.0.0.1:4000", show_default=True, help="keel server."
)
@click.option("--key", envvar="KEEL_API_KEY", default=None, help="API key (env KEEL_API_KEY).")
@click.pass_context
def eval_group(ctx: click.Context, url: str, key: str | None) -> None:
    """Evaluations: run suites, gate against a baseline, datasets, comparisons."""
    ctx.obj = _Conn(url, key)


# -- rendering ----------------------------------------------------------------------------------------


def _f(v: Any, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _summary_table(run: dict[str, Any]) -> Table:
    summary = run.get("summary") or {}
    variants = summary.get("variants") or {}
    names = sorted({s for v in variants.values() for s in v.get("scores", {})})
    t = Table(title=f"{run['suite']} · run {run['id']}" + (f" ({run['label']})" if run.get("label") else ""))
    t.add_column("variant")
    for n in names:
        t.add_column(n, justify="right")
    for col in ("errors", "cached", "p50 ms"):
        t.add_column(col, justify="right")
    for vname, v in sorted(variants.items()):
        cells = []
        for n in names:
            s = v["scores"].get(n) or {}
            cell = _f(s.get("mean"))
            if s.get("pass_rate") is not None:
                cell += f" ({s['pass_rate'] * 100:.0f}%)"
            if s.get("errors"):
                cell += f" [red]{s['errors']} err[/]"
            if s.get("repeat_stdev"):
                cell += f" ±{s['repeat_stdev']:.3f}"
            cells.append(cell)
        p50 = v.get("latency_ms_p50")
        t.add_row(
            vname,
            *cells,
            str(v.get("errors", 0)),
            str(v.get("cached", 0)),
            "-" if p50 is None else f"{p50:.0f}",
        )
    return t


def _compare_table(cmp: dict[str, Any]) -> Table:
    conf = round(float(cmp.get("confidence") or 0.95) * 100)
    base = cmp["base"]
    t = Table(title=f"vs baseline {base.get('label') or base.get('id')} ({base.get('id')})")
    for col, just in (
        ("variant", "left"),
        ("scorer", "left"),
        ("baseline", "right"),
        ("run", "right"),
        ("Δ", "right"),
        (f"{conf}% CI", "left"),
        ("threshold", "right"),
        ("result", "left"),
    ):
        t.add_column(col, justify=just, no_wrap=col.endswith("CI"))  # type: ignore[arg-type]
    for p in cmp["pairs"]:
        for name, s in p["scorers"].items():
            ci = "-" if s.get("ci_low") is None else f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"
            verdict = {True: "[green]pass[/]", False: "[bold red]FAIL[/]", None: "[dim]skipped[/]"}[
                s.get("passed")
            ]
            t.add_row(
                p["head_variant"],
                name,
                _f(s.get("base_mean")),
                _f(s.get("head_mean")),
                _f(s.get("delta"), True),
                ci,
                _f(s.get("threshold"), True),
                verdict,
            )
    return t


def _run_markdown(run: dict[str, Any]) -> str:
    variants = (run.get("summary") or {}).get("variants") or {}
    names = sorted({s for v in variants.values() for s in v.get("scores", {})})
    lines = [
        f"## keel eval: {run['suite']}",
        "",
        f"Run `{run['id']}` · {run.get('result_count')} results · cost ${run.get('cost_usd') or 0:.6f}",
        "",
        "| variant | " + " | ".join(names) + " | errors |",
        "|---|" + "---:|" * len(names) + "---:|",
    ]
    for vname, v in sorted(variants.items()):
        cells = [_f((v["scores"].get(n) or {}).get("mean")) for n in names]
        lines.append(f"| {vname} | " + " | ".join(cells) + f" | {v.get('errors', 0)} |")
    return "\n".join(lines) + "\n"


# -- keel eval run ------------------------------------------------------------------------------------


@eval_group.command("run")
@click.argument("suite_path", metavar="SUITE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--label", default=None, help="Name this run (later runs can gate against it).")
@click.option("--baseline", default=None, help="Run id or label to compare with.")
@click.option("--gate", is_flag=True, help="Exit 1 when a scorer's CI lower bound falls below its threshold.")
@click.option(
    "--junit", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write JUnit XML."
)
@click.option(
    "--markdown",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write a Markdown summary.",
)
@click.option(
    "--concurrency", type=click.IntRange(1, 512), default=None, help="Override the suite's concurrency."
)
@click.option("--no-cache", is_flag=True, help="Do not reuse cached model outputs.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Output cache folder (default <KEEL_DATA_DIR or .keel>/eval-cache).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the stored run (and comparison) as JSON.")
@click.pass_obj
def run_cmd(
    conn: _Conn,
    suite_path: Path,
    label: str | None,
    baseline: str | None,
    gate: bool,
    junit: Path | None,
    markdown: Path | None,
    concurrency: int | None,
    no_cache: bool,
    cache_dir: Path | None,
    as_json: bool,
) -> None:
    """Run SUITE (YAML) through the gateway, store the run and print its summary."""
    if gate and not baseline:
        _fail("--gate needs --baseline RUN_OR_LABEL")
    if junit and not baseline:
        _fail("--junit needs --baseline RUN_OR_LABEL (the test cases are the comparisons)")
    try:
        suite = load_suite(suite_path)
    except SuiteError as exc:
        _fail(str(exc))
    cache = None if no_cache else (cache_dir or Path(os.environ.get("KEEL_DATA_DIR", ".keel")) / "eval-cache")

    async def go() -> tuple[Any, dict[str, Any] | None]:
        async with conn.client(concurrency or suite.concurrency, suite.timeout_s) as client:
            if baseline:  # fail before spending money on a run that cannot be gated
                await client.get_run(baseline)
            progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=False,
                disable=as_json,
            )
            task_id: Any = None

            def on_start(run: dict[str, Any], total: int) -> None:
                nonlocal task_id
                task_id = progress.add_task(f"{suite.name} ({run['id']})", total=total)

            def on_progress(done: int, total: int) -> None:
                progress.update(task_id, completed=done)

            with progress:
                report = await execute_suite(
                    suite,
                    client,
                    label=label,
                    concurrency=concurrency,
                    cache_dir=cache,
                    on_start=on_start,
                    on_progress=on_progress,
                )
            cmp = await client.compare(baseline, report.run["id"], items=False) if baseline else None
            if gate and baseline and report.run.get("status") == "completed":
                # the server's verdict is what protected prompt labels check before they move
                cmp["recorded_gate"] = await client.gate(report.run["id"], baseline)  # type: ignore[index]
            return report, cmp

    report, cmp = _run_async(go())
    run = report.run
    if as_json:
        out.print_json(orjson.dumps({"run": run, "comparison": cmp}).decode())
    else:
        out.print(_summary_table(run))
        s = run.get("summary") or {}
        out.print(
            f"{run['result_count']} results · {s.get('calls', 0)} model calls · {s.get('cache_hits', 0)} cache hits · "
            f"{s.get('retries', 0)} retries · cost ${run['cost_usd']:.6f}",
            highlight=False,
        )
        if cmp is not None:
            out.print(_compare_table(cmp))
    if markdown:
        markdown.write_text(markdown_summary(cmp, run) if cmp is not None else _run_markdown(run))
    if junit and cmp is not None:
        junit.write_text(junit_xml(cmp, suite.name))
    if gate and cmp is not None:
        failures = gate_failures(cmp)
        if not cmp["passed"]:
            for f in failures:
                console.print(f"[bold red]gate:[/] {f}", highlight=False)
            console.print("[bold red]gate failed[/]")
            sys.exit(1)
        console.print("[bold green]gate passed[/]")


# -- keel eval compare --------------------------------------------------------------------------------


@eval_group.command("compare")
@click.argument("base")
@click.argument("head")
@click.option(
    "--items", "n_items", type=int, default=10, show_default=True, help="Item diffs shown per variant."
)
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@click.pass_obj
def compare_cmd(conn: _Conn, base: str, head: str, n_items: int, as_json: bool) -> None:
    """Compare run HEAD with run BASE (ids or labels): per scorer deltas with CIs, then item diffs."""

    async def go() -> dict[str, Any]:
        async with conn.client() as client:
            return await client.compare(base, head, items=True)

    cmp = _run_async(go())
    if as_json:
        out.print_json(orjson.dumps(cmp).decode())
        return
    out.print(_compare_table(cmp))
    for p in cmp["pairs"]:
        rows = [r for r in p.get("items", []) if any((d or 0) != 0 for d in r["delta"].values())][:n_items]
        if not rows:
            continue
        t = Table(title=f"{p['head_variant']}: items that changed")
        t.add_column("item")
        t.add_column("baseline output", overflow="fold", max_width=50)
        t.add_column("run output", overflow="fold", max_width=50)
        t.add_column("Δ")
        for r in rows:
            deltas = ", ".join(f"{k} {v:+.2f}" for k, v in r["delta"].items() if v)
            t.add_row(r["item_id"], str(r["base_output"] or ""), str(r["head_output"] or ""), deltas)
        out.print(t)


# -- keel eval datasets -------------------------------------------------------------------------------


@eval_group.group("datasets")
def datasets() -> None:
    """Versioned datasets: list, push a file, pull a version."""


@datasets.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def datasets_list(conn: _Conn, as_json: bool) -> None:
    """List datasets with their latest version and item count."""

    async def go() -> list[dict[str, Any]]:
        async with conn.client() as client:
            return await client.list_datasets()

    rows = _run_async(go())
    if as_json:
        out.print_json(orjson.dumps(rows).decode())
        return
    t = Table()
    for col in ("name", "version", "items", "updated", "id"):
        t.add_column(col)
    for d in rows:
        t.add_row(
            d["name"], str(d["version"]), str(d.get("item_count", "")), d.get("updated_at") or "", d["id"]
        )
    out.print(t)


@datasets.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="Dataset name (default: the file name without extension).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv", "yaml", "json"]),
    default=None,
    help="Default: by extension.",
)
@click.option(
    "--merge", is_flag=True, help="Keep items not in the file (default: the file is the whole dataset)."
)
@click.option("--description", default=None)
@click.pass_obj
def datasets_push(
    conn: _Conn, file: Path, name: str | None, fmt: str | None, merge: bool, description: str | None
) -> None:
    """Push FILE (JSONL, CSV or YAML) as a new version of a dataset (nothing changes if it is equal)."""
    fmt = fmt or (file.suffix.lstrip(".") or "jsonl")
    try:
        items = parse_items(file.read_bytes(), "yaml" if fmt == "yml" else fmt)
    except DatasetFormatError as exc:
        _fail(f"{file}: {exc}")

    async def go() -> dict[str, Any]:
        async with conn.client() as client:
            return await client.push_items(
                name or file.stem, items, replace=not merge, description=description
            )

    res = _run_async(go())
    console.print(
        f"{res['name']} v{res['version']}: {res['added']} added, {res['updated']} updated, "
        f"{res['removed']} removed, {res['unchanged']} unchanged ({res.get('item_count')} items)",
        highlight=False,
    )


@datasets.command("pull")
@click.argument("name")
@click.option("--version", type=int, default=None, help="Default: the latest.")
@click.option(
    "--format", "fmt", type=click.Choice(["jsonl", "csv", "yaml"]), default="jsonl", show_default=True
)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Default: stdout."
)
@click.pass_obj
def datasets_pull(conn: _Conn, name: str, version: int | None, fmt: str, output: Path | None) -> None:
    """Write a dataset version as JSONL, CSV or YAML."""

    async def go() -> list[dict[str, Any]]:
        async with conn.client() as client:
            if await client.get_dataset(name) is None:
                raise EvalApiError(f"dataset {name!r} not found", 404)
            return await client.dataset_items(name, version)

    items = _run_async(go())
    text = dump_items(items, fmt)
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        console.print(f"wrote {len(items)} items to {output}", highlight=False)
