"""Judge quality: `keel eval judge-agreement` against a real keel (both backends) with a scripted judge,
and Cohen's kappa / label handling on known data."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from keel.cli import main
from keel.evals.agreement import cohen_kappa, label_of, measure
from keel.testing import MockProvider
from tests.conftest import BACKENDS, Keel
from tests.eval_judges_support import JUDGES, start_keel

ITEMS = [
    ("good answer one", 5),
    ("good answer two", 5),
    ("bad answer", 1),
    ("bad but not awful", 2),
    ("meh answer", 3),
    ("good enough", 4),
    ("unlabelled good", None),
    ("BROKEN output", 5),
]


def grader(req: dict[str, Any]) -> str:
    """A judge that reads the output it is shown: good -> 5, bad -> 1, meh -> 3; BROKEN -> not JSON."""
    prompt = req["messages"][1]["content"]
    output = prompt.split("Output to evaluate:\n", 1)[1].split("\n\n", 1)[0]
    if "BROKEN" in output:
        return "no idea"
    score = 5 if "good" in output else 1 if "bad" in output else 3
    return orjson.dumps({"reasoning": f"looks {score}", "score": score}).decode()


@pytest.fixture(scope="module", params=BACKENDS)
def ak(
    request: pytest.FixtureRequest, mock_upstream: MockProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Keel]:
    k = start_keel(request.param, tmp_path_factory.mktemp("agreement"), mock_upstream, request)
    yield k
    k.http.close()
    k.server.stop()


def cli(k: Keel, *args: str) -> Any:
    return CliRunner().invoke(
        main, ["eval", "--url", k.url, "--key", k.master_key, *args], catch_exceptions=False
    )


@pytest.fixture
def dataset(ak: Keel, tmp_path: Path, mock_upstream: MockProvider) -> str:
    mock_upstream.script(JUDGES["judge"], grader)
    name = "labels-" + uuid.uuid4().hex[:6]
    rows = []
    for i, (output, label) in enumerate(ITEMS):
        meta: dict[str, Any] = {"output": output}
        if label is not None:
            meta["label"] = label
        rows.append({"id": f"i{i}", "input": f"question {i}", "metadata": meta})
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(orjson.dumps(r).decode() + "\n" for r in rows))
    r = cli(ak, "datasets", "push", str(path))
    assert r.exit_code == 0, r.output
    return name


def test_categorical_agreement(ak: Keel, dataset: str) -> None:
    r = cli(
        ak,
        "judge-agreement",
        dataset,
        "--judge",
        "judge",
        "--rubric",
        "Is it good?",
        "--max-retries",
        "1",
        "--json",
    )
    assert r.exit_code == 0, r.output
    report = orjson.loads(r.stdout)
    assert (report["n"], report["unlabelled"], report["judge_errors"]) == (6, 1, 1)
    assert report["accuracy"] == pytest.approx(4 / 6)
    # p_o = 4/6, p_e = (2*3 + 1*2 + 1*1) / 36 = 1/4  ->  kappa = (2/3 - 1/4) / (3/4) = 5/9
    assert report["kappa"] == pytest.approx(5 / 9)
    assert report["confusion"]["4"]["5"] == 1 and report["confusion"]["2"]["1"] == 1
    assert report["judge_stats"]["malformed"] == 2 and report["judge_stats"]["errors"] == 1
    assert {(d["human"], d["judge"]) for d in report["disagreements"]} == {("2", "1"), ("4", "5")}


def test_pass_fail_agreement_and_table(ak: Keel, dataset: str, tmp_path: Path) -> None:
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("Is the answer good?")
    r = cli(ak, "judge-agreement", dataset, "--judge", "judge", "--rubric", f"@{rubric}", "--threshold", "4")
    assert r.exit_code == 0, r.output
    assert re.search(r"accuracy\s+1\.000", r.stdout) and re.search(
        r"kappa 1\.000\s+\(almost perfect\)", r.stdout
    )
    assert "6 items compared (1 without a label, 1 judge_error)" in " ".join(r.stdout.split())
    assert "confusion" in r.stdout


def test_min_kappa_gate_and_errors(ak: Keel, dataset: str) -> None:
    r = cli(ak, "judge-agreement", dataset, "--judge", "judge", "--rubric", "x", "--min-kappa", "0.9")
    assert r.exit_code == 1 and "below 0.9" in r.output
    r = cli(ak, "judge-agreement", "no-such-dataset", "--judge", "judge", "--rubric", "x")
    assert r.exit_code == 2 and "not found" in r.output
    r = cli(ak, "judge-agreement", dataset, "--judge", "judge", "--rubric", "x", "--label-field", "nothing")
    assert r.exit_code == 2 and "no item has a human label" in r.output
    r = cli(ak, "judge-agreement", dataset, "--judge", "judge", "--rubric", "x", "--scale", "5-1")
    assert r.exit_code == 2 and "maximum must be above" in r.output


def test_cohen_kappa_known_values() -> None:
    # 2x2 table [[20, 5], [10, 15]]: p_o = 0.7, p_e = 0.5 -> kappa 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["a", "b", "a"], ["a", "b", "a"]) == 1.0
    assert cohen_kappa(["a", "a"], ["a", "a"]) == 1.0  # chance agreement is total: not NaN
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        cohen_kappa([], [])
    acc, _, labels, confusion = measure([("1", "1"), ("2", "1")])
    assert (acc, labels, confusion["2"]["1"]) == (0.5, ["1", "2"], 1)


def test_label_of() -> None:
    assert label_of(4, None) == "4" and label_of(4.0, None) == "4" and label_of(3.5, None) == "3.5"
    assert label_of(4, 4) == "pass" and label_of(3, 4) == "fail"
    assert label_of(True, None) == "pass" and label_of("no", None) == "fail" and label_of("Yes", 3) == "pass"
    assert label_of("5", None) == "5" and label_of("great", None) == "great"
    assert label_of(None, None) is None and label_of("", 3) is None
