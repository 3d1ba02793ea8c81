"""`keel eval judge-agreement DATASET --judge MODEL --rubric ...`: how far to trust an LLM judge.

Grades a dataset's labelled items with the judge (through the keel server's gateway, so every call
is traced and costed) and prints accuracy and Cohen's kappa against the human labels, with the
confusion matrix.  ``--min-kappa`` makes it a CI check (exit 1 below it).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

__all__ = ["judge_agreement_cmd"]

console = Console(stderr=True)
out = Console()


def _rubric(value: str) -> str:
    """The rubric text, or a file's content with ``@path``."""
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise click.BadParameter(f"no file {path}", param_hint="--rubric")
        return path.read_text()
    return value


def _kappa_words(k: float) -> str:
    """Landis & Koch's reading of a kappa."""
    for bound, word in (
        (0.8, "almost perfect"),
        (0.6, "substantial"),
        (0.4, "moderate"),
        (0.2, "fair"),
        (0.0, "slight"),
    ):
        if k > bound:
            return word
    return "no better than chance"


@click.command("judge-agreement")
@click.argument("dataset")
@click.option("--judge", "judge_model", required=True, help="Gateway model name of the judge.")
@click.option("--rubric", required=True, help="The judge's criteria, or @FILE to read them from a file.")
@click.option("--scale", default="1-5", show_default=True, help="The judge's integer scale, e.g. 1-5 or 0-1.")
@click.option("--steps", default=None, help="Evaluation steps, one per line ('auto': the judge writes them).")
@click.option(
    "--label-field", default="label", show_default=True, help="Dotted path of the human label in metadata."
)
@click.option(
    "--output-field",
    default="output",
    show_default=True,
    help="Path in metadata of the output to grade (else the item's expected).",
)
@click.option("--threshold", type=float, default=None, help="Compare pass/fail: score >= THRESHOLD passes.")
@click.option("--version", type=int, default=None, help="Dataset version (default: the latest).")
@click.option("--concurrency", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--max-retries", type=click.IntRange(0, 10), default=2, show_default=True)
@click.option("--min-kappa", type=float, default=None, help="Exit 1 when kappa is below this.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_obj
def judge_agreement_cmd(
    conn: Any,
    dataset: str,
    judge_model: str,
    rubric: str,
    scale: str,
    steps: str | None,
    label_field: str,
    output_field: str,
    threshold: float | None,
    version: int | None,
    concurrency: int,
    max_retries: int,
    min_kappa: float | None,
    as_json: bool,
) -> None:
    """Measure a judge's agreement with the human labels of DATASET (accuracy and Cohen's kappa)."""
    from keel.evals import EvalApiError
    from keel.evals.agreement import judge_agreement
    from keel.evals.scorers.base import ScorerConfigError

    options: dict[str, Any] = {
        "model": judge_model,
        "rubric": _rubric(rubric),
        "scale": scale,
        "max_retries": max_retries,
    }
    if steps:
        options["steps"] = steps

    async def go() -> Any:
        async with conn.client(concurrency) as client:
            if await client.get_dataset(dataset) is None:
                raise EvalApiError(f"dataset {dataset!r} not found", 404)
            items = await client.dataset_items(dataset, version)
            with Progress(
                TextColumn("judging"),
                BarColumn(),
                MofNCompleteColumn(),
                console=console,
                transient=True,
                disable=as_json or not console.is_terminal,
            ) as bar:
                task = bar.add_task("judge", total=len(items))
                return await judge_agreement(
                    items,
                    client.http,
                    options,
                    label_field=label_field,
                    output_field=output_field,
                    threshold=threshold,
                    concurrency=concurrency,
                    progress=lambda: bar.advance(task),
                )

    try:
        report = asyncio.run(go())
    except (EvalApiError, ScorerConfigError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(2)

    if as_json:
        sys.stdout.write(orjson.dumps(report.as_dict(), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.print(
            f"judge [bold]{judge_model}[/] on [bold]{dataset}[/]: {report.n} items compared"
            f" ({report.unlabelled} without a label, {report.judge_errors} judge_error)",
            highlight=False,
        )
        out.print(f"accuracy      {report.accuracy:.3f}", highlight=False)
        out.print(f"Cohen's kappa {report.kappa:.3f}  ({_kappa_words(report.kappa)})", highlight=False)
        table = Table(title="confusion (rows: human, columns: judge)")
        table.add_column("human \\ judge")
        for lb in report.labels:
            table.add_column(lb, justify="right")
        for h in report.labels:
            table.add_row(h, *(str(report.confusion[h][j]) for j in report.labels))
        out.print(table)
        s = report.judge_stats
        out.print(
            f"judge calls {s.get('calls', 0)}, retries {s.get('retries', 0)}, malformed answers "
            f"{s.get('malformed', 0)}",
            highlight=False,
        )
    if min_kappa is not None and report.kappa < min_kappa:
        console.print(f"[bold red]kappa {report.kappa:.3f} is below {min_kappa}[/]", highlight=False)
        sys.exit(1)
