"""`keel prompts ...` as a real process talking to a real keel over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import yaml

KEEL = [sys.executable, "-m", "keel.cli"]


def cli(keel: Any, *args: str, cwd: Path, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEEL_BASE_URL": keel.url, "KEEL_API_KEY": key or keel.master_key, "COLUMNS": "200"}
    env.pop("KEEL_CONFIG", None)
    return subprocess.run(
        [*KEEL, "prompts", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def write_prompts(
    folder: Path, run: str, answer_system: str = "You answer questions about {{ product }}."
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "answer.yaml").write_text(
        f"""name: answer-{run}
type: chat
messages:
  - role: system
    content: "{answer_system}"
  - role: user
    content: |
      Question: {{{{ question }}}}
      {{% if urgent %}}This is urgent.{{% endif %}}
variables:
  product: {{type: string, default: keel}}
  question: string
  urgent: {{type: boolean, default: false}}
config: {{model: gpt-4o-mini, temperature: 0.2}}
metadata: {{owner: support-team, use_case: answers}}
"""
    )
    (folder / "nested").mkdir(exist_ok=True)
    (folder / "nested" / f"summary-{run}.yml").write_text(
        "type: text\ntemplate: 'Summarise in {{ words }} words: {{ text }}'\n"
        "variables: {words: integer, text: string}\nconfig: {model: cheap}\n"
    )
    (folder / "README.md").write_text("not a prompt")


def test_sync_is_idempotent_and_pushes_only_changes(keel: Any, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    repo = tmp_path / "prompts"
    write_prompts(repo, run)
    r = cli(keel, "sync", str(repo), "--label", "staging", "-m", "from CI", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "2 created, 0 unchanged" in r.stderr
    assert keel.http.get(f"/api/prompts/summary-{run}").json()["latest_version"] == 1  # name from the file

    r = cli(keel, "sync", str(repo), "--label", "staging", cwd=tmp_path)  # the second run creates nothing
    assert r.returncode == 0, r.stderr
    assert "0 created, 2 unchanged" in r.stderr
    history = keel.http.get(f"/api/prompts/answer-{run}/history").json()
    assert [e["action"] for e in history] == ["label", "create"]

    write_prompts(repo, run, answer_system="Be brief about {{ product }}.")
    r = cli(keel, "sync", str(repo), cwd=tmp_path)
    assert "1 created, 1 unchanged" in r.stderr, r.stderr
    got = keel.http.get(f"/api/prompts/answer-{run}").json()
    assert got["latest_version"] == 2
    assert next(lb for lb in got["labels"] if lb["label"] == "staging")["version"] == 1

    v1 = keel.http.get(f"/api/prompts/answer-{run}/versions/1").json()
    assert v1["commit_message"] == "from CI" and v1["metadata"]["owner"] == "support-team"
    rendered = keel.http.post(
        f"/api/prompts/answer-{run}/render",
        json={"version": 1, "variables": {"question": "Why?", "urgent": True}},
    ).json()
    assert rendered["messages"][1]["content"] == "Question: Why?\nThis is urgent.\n"


def test_push_pull_round_trip_list_show_diff(keel: Any, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    write_prompts(tmp_path / "src", run)
    f = tmp_path / "src" / "answer.yaml"
    r = cli(keel, "push", str(f), "--label", "production", cwd=tmp_path)
    assert r.returncode == 0 and f"answer-{run} version 1 created" in r.stderr, r.stderr

    pulled = tmp_path / "pulled.yaml"
    r = cli(keel, "pull", f"answer-{run}", "--label", "production", "-o", str(pulled), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(pulled.read_text())
    assert doc["name"] == f"answer-{run}" and doc["variables"]["urgent"] == {
        "type": "boolean",
        "required": False,
        "default": False,
    }
    assert "|" in pulled.read_text()  # multi-line template stays readable
    r = cli(keel, "push", str(pulled), cwd=tmp_path)
    assert f"answer-{run} version 1 unchanged" in r.stderr, r.stderr

    write_prompts(tmp_path / "src", run, answer_system="Answer like a pirate about {{ product }}.")
    assert cli(keel, "push", str(f), "-m", "pirate", cwd=tmp_path).returncode == 0

    r = cli(keel, "list", cwd=tmp_path)
    assert r.returncode == 0 and f"answer-{run}" in r.stdout and "production→v1" in r.stdout
    r = cli(keel, "list", "--json", cwd=tmp_path)
    rows = {p["name"]: p for p in orjson.loads(r.stdout)}
    assert rows[f"answer-{run}"]["latest_version"] == 2

    r = cli(keel, "show", f"answer-{run}", cwd=tmp_path)
    assert r.returncode == 0 and "version 2" in r.stdout and "pirate" in r.stdout and "urgent" in r.stdout

    r = cli(keel, "diff", f"answer-{run}", "1", "2", cwd=tmp_path)
    assert r.returncode == 0
    assert "-You answer questions about {{ product }}." in r.stdout
    assert "+Answer like a pirate about {{ product }}." in r.stdout
    r = cli(keel, "diff", f"answer-{run}", "production", "production", cwd=tmp_path)
    assert "are the same" in r.stderr


def test_label_canary_rollback_and_errors(keel: Any, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:6]
    write_prompts(tmp_path, run)
    cli(keel, "push", str(tmp_path / "answer.yaml"), "--label", "production", cwd=tmp_path)
    write_prompts(tmp_path, run, answer_system="v2 {{ product }}")
    cli(keel, "push", str(tmp_path / "answer.yaml"), cwd=tmp_path)
    name = f"answer-{run}"

    r = cli(keel, "label", name, "production", "1", "--canary", "2", "--weight", "10", cwd=tmp_path)
    assert r.returncode == 0 and "production→v1:90/v2:10" in r.stderr, r.stderr
    r = cli(keel, "label", name, "production", "2", cwd=tmp_path)
    assert "production→v2" in r.stderr
    r = cli(keel, "rollback", name, "production", cwd=tmp_path)
    assert r.returncode == 0 and "production→v1:90/v2:10" in r.stderr, r.stderr
    r = cli(keel, "rollback", name, "production", "--to", "1", cwd=tmp_path)
    assert "production→v1" in r.stderr
    assert keel.http.get(f"/api/prompts/{name}/versions/production").json()["version"] == 1
    r = cli(keel, "history", name, "--label", "production", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.count("rollback") == 2 and "master" in r.stdout

    # errors: one clear line, non-zero exit
    r = cli(keel, "label", name, "production", "9", cwd=tmp_path)
    assert r.returncode == 1 and "404: prompt" in r.stderr and "no version 9" in r.stderr
    r = cli(keel, "show", f"nope-{run}", cwd=tmp_path)
    assert r.returncode == 1 and "not found" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntype: chat\nmesages: []\n")
    r = cli(keel, "push", str(bad), cwd=tmp_path)
    assert r.returncode == 1 and "unknown field(s): mesages" in r.stderr
    key = keel.create_key(project="default")["key"]  # the master's prompts are in the default project
    r = cli(keel, "label", name, "production", "2", cwd=tmp_path, key=key)
    assert r.returncode == 1 and "403" in r.stderr and "master key" in r.stderr
    r = cli(keel, "list", cwd=tmp_path, key=key)
    assert r.returncode == 0 and name in r.stdout  # any key reads
    env_url = {**os.environ, "KEEL_BASE_URL": "http://127.0.0.1:9", "KEEL_API_KEY": "k"}
    r = subprocess.run([*KEEL, "prompts", "list"], env=env_url, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot reach keel at http://127.0.0.1:9" in r.stderr
