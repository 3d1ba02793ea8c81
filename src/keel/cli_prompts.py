"""`keel prompts ...`: the prompt registry from the command line, over keel's REST API (like any client).

The server is ``--url`` (env KEEL_BASE_URL, default http://127.0.0.1:4000) and the key ``--key``
(env KEEL_API_KEY, else KEEL_MASTER_KEY, else ``<data_dir>/master_key``).  Prompt files are YAML::

    name: support-answer
    type: chat
    messages:
      - {role: system, content: "You answer questions about {{ product }}."}
      - {role: user, content: "{{ question }}"}
    variables: {product: {type: string, default: keel}, question: string}
    config: {model: gpt-4o-mini, temperature: 0.2}
    metadata: {owner: support-team}
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
import orjson
import yaml
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table

__all__ = ["prompts"]

console = Console(stderr=True)
out = Console()
FILE_FIELDS = (
    "name",
    "type",
    "template",
    "messages",
    "variables",
    "config",
    "metadata",
    "commit_message",
    "author",
)


def _fail(msg: str, code: int = 1) -> NoReturn:
    console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    sys.exit(code)


class _Api:
    """A small client of /api/prompts; every failure becomes one readable line."""

    def __init__(self, url: str, key: str | None) -> None:
        self.url = url.rstrip("/")
        self.key = key
        self.http: httpx.Client | None = None

    def __call__(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201, 204), **kw: Any) -> Any:
        if self.http is None:  # resolved on first use, so --help works without a key
            self.http = httpx.Client(
                base_url=self.url, headers={"authorization": f"Bearer {_key(self.key)}"}, timeout=30.0
            )
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            _fail(f"cannot reach keel at {self.url}: {type(exc).__name__}: {exc}")
        if r.status_code not in ok:
            try:
                message = r.json()["error"]["message"]
            except Exception:
                message = r.text[:300]
            _fail(f"{r.status_code}: {message}")
        return None if r.status_code == 204 else r.json()


def _key(given: str | None) -> str:
    if given:
        return given
    if os.environ.get("KEEL_MASTER_KEY"):
        return os.environ["KEEL_MASTER_KEY"]
    path = Path(os.environ.get("KEEL_DATA_DIR", ".keel")) / "master_key"
    if path.is_file():
        return path.read_text().strip()
    _fail("no API key: pass --key or set KEEL_API_KEY", 2)


@click.group()
@click.option(
    "--url",
    envvar="KEEL_BASE_URL",
    default="http://127.0.0.1:4000",
    show_default=True,
    help="keel server (env KEEL_BASE_URL).",
)
@click.option(
    "--key",
    envvar="KEEL_API_KEY",
    default=None,
    help="API key (env KEEL_API_KEY; writes need the master key).",
)
@click.pass_context
def prompts(ctx: click.Context, url: str, key: str | None) -> None:
    """Versioned prompts: push, pull, list, show, diff, label, rollback, sync a folder."""
    ctx.obj = _Api(url, key)


def _load_file(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        _fail(f"{path}: cannot read YAML: {exc}")
    if not isinstance(doc, dict):
        _fail(f"{path}: expected a mapping with name, type, messages or template, ...")
    unknown = set(doc) - set(FILE_FIELDS) - {"labels"}
    if unknown:
        _fail(f"{path}: unknown field(s): {', '.join(sorted(unknown))}")
    doc.setdefault("name", path.stem)
    doc.setdefault("type", "text" if "template" in doc else "chat")
    return doc


def _push(api: _Api, doc: dict[str, Any], labels: tuple[str, ...], message: str | None) -> dict[str, Any]:
    body = {k: doc[k] for k in FILE_FIELDS if k in doc}
    all_labels = list(dict.fromkeys([*(doc.get("labels") or []), *labels]))
    if all_labels:
        body["labels"] = all_labels
    if message:
        body["commit_message"] = message
    result: dict[str, Any] = api("POST", "/api/prompts", json=body)
    return result


label_option = click.option(
    "--label", "labels", multiple=True, help="Point this label at the version (repeatable)."
)
message_option = click.option("-m", "--message", default=None, help="Commit message of the new version.")


@prompts.command("push")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@label_option
@message_option
@click.pass_obj
def push(api: _Api, file: Path, labels: tuple[str, ...], message: str | None) -> None:
    """Push a prompt file; a new version is created only when its content changed."""
    v = _push(api, _load_file(file), labels, message)
    state = "[green]created[/]" if v["created"] else "[dim]unchanged[/]"
    console.print(f"{v['name']} version {v['version']} {state}", highlight=False)


@prompts.command("sync")
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@label_option
@message_option
@click.pass_obj
def sync(api: _Api, directory: Path, labels: tuple[str, ...], message: str | None) -> None:
    """Push every *.yaml / *.yml under DIRECTORY (prompts as code, e.g. in CI); creates versions only for changes."""
    files = sorted(p for p in directory.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
    if not files:
        _fail(f"no *.yaml or *.yml files under {directory}")
    docs = [(f, _load_file(f)) for f in files]
    names = [d["name"] for _, d in docs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        _fail(f"several files define the same prompt: {', '.join(dupes)}")
    table = Table("prompt", "version", "status", "file")
    created = 0
    for f, doc in docs:
        v = _push(api, doc, labels, message)
        created += bool(v["created"])
        table.add_row(v["name"], str(v["version"]), "created" if v["created"] else "unchanged", str(f))
    out.print(table)
    console.print(f"{created} created, {len(docs) - created} unchanged", highlight=False)


class _Literal(yaml.SafeDumper):
    """Multi-line strings as YAML block literals, so pulled templates read like the originals."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Literal.add_representer(str, _str)


def _ref(version: int | None, label: str | None) -> str:
    if version is not None and label is not None:
        _fail("give --version or --label, not both", 2)
    return str(version) if version is not None else (label or "latest")


@prompts.command("pull")
@click.argument("name")
@click.option("--version", type=int, default=None, help="Version number (default: latest).")
@click.option("--label", default=None, help="Or the version a label points at.")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write here."
)
@click.pass_obj
def pull(api: _Api, name: str, version: int | None, label: str | None, output: Path | None) -> None:
    """Print (or write) a version as a prompt file; pushing it back creates nothing."""
    v = api("GET", f"/api/prompts/{name}/versions/{_ref(version, label)}")
    doc: dict[str, Any] = {"name": v["name"], "type": v["type"]}
    doc["template" if v["type"] == "text" else "messages"] = v["template"]
    doc["variables"] = {x.pop("name"): x for x in v["variables"]}
    if v["config"]:
        doc["config"] = v["config"]
    if v["metadata"]:
        doc["metadata"] = v["metadata"]
    text = yaml.dump(doc, Dumper=_Literal, sort_keys=False, allow_unicode=True, width=1000)
    if output is None:
        out.print(text, end="", highlight=False, markup=False)
    else:
        output.write_text(text)
        console.print(f"wrote {name} version {v['version']} to {output}", highlight=False)


@prompts.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def list_(api: _Api, as_json: bool) -> None:
    """List prompts with their latest version and labels."""
    rows = api("GET", "/api/prompts")
    if as_json:
        out.print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode(), highlight=False, markup=False)
        return
    table = Table("name", "type", "latest", "labels", "updated")
    for p in rows:
        labels = ", ".join(_label_text(lb) for lb in p["labels"])
        table.add_row(
            p["name"], p["type"], str(p["latest_version"]), labels or "—", (p["updated_at"] or "")[:19]
        )
    out.print(table)


def _label_text(lb: dict[str, Any]) -> str:
    if lb.get("split"):
        parts = "/".join(f"v{x['version']}:{x['weight']:g}" for x in lb["split"])
        return f"{lb['label']}→{parts}"
    return f"{lb['label']}→v{lb['version']}"


@prompts.command("show")
@click.argument("name")
@click.option("--version", type=int, default=None)
@click.option("--label", default=None)
@click.pass_obj
def show(api: _Api, name: str, version: int | None, label: str | None) -> None:
    """Show one version: template, variables, config, and the prompt's labels."""
    v = api("GET", f"/api/prompts/{name}/versions/{_ref(version, label)}")
    p = api("GET", f"/api/prompts/{name}")
    out.print(
        f"[bold]{v['name']}[/] version {v['version']} ({v['type']}) · {v['author'] or '—'} · {v['created_at']}",
        highlight=False,
    )
    if v["commit_message"]:
        out.print(f"  {v['commit_message']}", highlight=False, markup=False)
    out.print("labels: " + (", ".join(_label_text(lb) for lb in p["labels"]) or "—"), highlight=False)
    if v["type"] == "text":
        out.print(Syntax(v["template"], "jinja", word_wrap=True))
    else:
        for m in v["template"]:
            if "placeholder" in m:
                out.print(f"[dim]{{placeholder: {m['placeholder']}}}[/]")
            else:
                out.print(f"[bold cyan]{m['role']}[/]")
                out.print(Syntax(m["content"], "jinja", word_wrap=True))
    table = Table("variable", "type", "required", "default")
    for x in v["variables"]:
        table.add_row(x["name"], x["type"], "yes" if x["required"] else "no", repr(x.get("default", None)))
    out.print(table)
    out.print(Syntax(orjson.dumps(v["config"], option=orjson.OPT_INDENT_2).decode(), "json"))


@prompts.command("diff")
@click.argument("name")
@click.argument("a")
@click.argument("b", required=False, default="latest")
@click.pass_obj
def diff(api: _Api, name: str, a: str, b: str) -> None:
    """Diff template and config between two versions or labels (B defaults to latest)."""
    d = api("GET", f"/api/prompts/{name}/diff", params={"from": a, "to": b})
    if not d["template"] and not d["config"]:
        console.print(f"versions {d['from']} and {d['to']} are the same", highlight=False)
        return
    for part in ("template", "config"):
        if d[part]:
            out.print(f"[bold]{part}[/]")
            out.print(Syntax(d[part], "diff"))


@prompts.command("label")
@click.argument("name")
@click.argument("label")
@click.argument("version", type=int)
@click.option("--canary", type=int, default=None, help="A second version to send part of the traffic to.")
@click.option(
    "--weight", type=float, default=10.0, show_default=True, help="Percent of traffic for --canary."
)
@click.option("--eval-run", default=None, help="Evaluation run approving the move (protected labels).")
@click.pass_obj
def label(
    api: _Api, name: str, label: str, version: int, canary: int | None, weight: float, eval_run: str | None
) -> None:
    """Point LABEL at VERSION (a deploy), optionally canarying another version at --weight percent."""
    body: dict[str, Any] = {"eval_run": eval_run} if eval_run else {}
    if canary is not None:
        if not 0 < weight < 100:
            _fail("--weight must be between 0 and 100", 2)
        body["split"] = [{"version": version, "weight": 100 - weight}, {"version": canary, "weight": weight}]
    else:
        body["version"] = version
    state = api("PUT", f"/api/prompts/{name}/labels/{label}", json=body)
    console.print(f"{name}: {_label_text(state)}", highlight=False)


@prompts.command("rollback")
@click.argument("name")
@click.argument("label")
@click.option(
    "--to", "to_version", type=int, default=None, help="Version to move to (default: the previous one)."
)
@click.pass_obj
def rollback(api: _Api, name: str, label: str, to_version: int | None) -> None:
    """Move LABEL back to where it pointed before its last move."""
    body = {"to_version": to_version} if to_version is not None else None
    state = api("POST", f"/api/prompts/{name}/labels/{label}/rollback", json=body)
    console.print(f"{name}: rolled back, {_label_text(state)}", highlight=False)


@prompts.command("history")
@click.argument("name")
@click.option("--label", default=None, help="Only this label's moves.")
@click.pass_obj
def history(api: _Api, name: str, label: str | None) -> None:
    """The audit log: versions created, label moves and rollbacks, with who and when."""
    events = api("GET", f"/api/prompts/{name}/history", params={"label": label} if label else None)
    table = Table("when", "action", "label", "version", "actor")
    for e in events:
        table.add_row(
            (e["created_at"] or "")[:19],
            e["action"],
            e["label"] or "",
            str(e["version"] or ""),
            e["actor"] or "",
        )
    out.print(table)
