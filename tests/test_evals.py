"""The evaluation core without a server: scorers, the paired bootstrap, suites, dataset formats, gates."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from keel.evals import (
    DatasetFormatError,
    SuiteError,
    compare_runs,
    dump_items,
    item_from_trace,
    junit_xml,
    load_suite,
    markdown_summary,
    paired_bootstrap,
    parse_items,
    parse_suite,
    summarise,
)
from keel.evals.scorers.base import ScoreInput, ScorerConfigError, ScorerContext, ScoreResult
from keel.evals.scorers.registry import build_scorer, scorer_factories


def score(type_: str, output: str, expected: Any = None, **options: Any) -> ScoreResult:
    scorer = build_scorer(type_, options, ScorerContext())
    return asyncio.run(scorer.score(ScoreInput(output=output, expected=expected)))


# -- scorers ------------------------------------------------------------------------------------------


def test_builtin_scorers_are_registered_through_the_plugin_hook() -> None:
    names = set(scorer_factories())
    assert {"exact", "contains", "regex", "json_valid", "json_schema", "numeric", "levenshtein"} <= names
    assert {"bleu", "rouge_l", "embedding"} <= names


def test_exact() -> None:
    assert score("exact", " Paris\n", "Paris").value == 1.0
    assert score("exact", "paris", "Paris").value == 0.0
    assert score("exact", "paris", "Paris", ignore_case=True).passed is True
    assert score("exact", "a  b", "a b", normalise_whitespace=True).value == 1.0
    assert score("exact", '{"a": 1}', {"a": 1}).value == 0.0  # JSON expected is compared as compact JSON
    assert score("exact", '{"a":1}', {"a": 1}).value == 1.0
    missing = score("exact", "x", None)
    assert missing.value is None and missing.error == "missing_expected"


def test_contains_and_regex() -> None:
    assert score("contains", "The capital is Paris.", "paris", ignore_case=True).value == 1.0
    assert score("contains", "The capital is Paris.", "Lyon").value == 0.0
    assert score("contains", "red and blue", None, value=["red", "green"], mode="any").value == 1.0
    r = score("contains", "red and blue", None, value=["red", "green"])
    assert r.value == 0.0 and "green" in (r.explanation or "")
    assert score("regex", "order #12345 shipped", pattern=r"#\d{5}\b").value == 1.0
    assert score("regex", "ORDER 1", pattern="order", ignore_case=True).value == 1.0
    assert score("regex", "abc", pattern="b", full_match=True).value == 0.0
    assert score("regex", "2024-01-02", r"\d{4}-\d\d-\d\d").value == 1.0  # expected as the pattern
    with pytest.raises(ScorerConfigError, match="invalid regular expression"):
        build_scorer("regex", {"pattern": "("}, ScorerContext())


def test_json_scorers() -> None:
    assert score("json_valid", '{"a": [1, 2]}').value == 1.0
    assert score("json_valid", 'Here:\n```json\n{"a": 1}\n```').value == 1.0
    assert score("json_valid", 'Here:\n```json\n{"a": 1}\n```', fenced=False).value == 0.0
    assert score("json_valid", "{a: 1}").value == 0.0
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert score("json_schema", '{"n": 3}', schema=schema).value == 1.0
    bad = score("json_schema", '{"n": "three"}', schema=schema)
    assert bad.value == 0.0 and "n:" in (bad.explanation or "")
    assert score("json_schema", "not json", schema=schema).value == 0.0
    with pytest.raises(ScorerConfigError, match="invalid schema"):
        build_scorer("json_schema", {"schema": {"type": "no-such-type"}}, ScorerContext())
    with pytest.raises(ScorerConfigError, match="required"):
        build_scorer("json_schema", {}, ScorerContext())


def test_numeric_tolerance() -> None:
    assert score("numeric", "The answer is 42.", 42).value == 1.0
    assert score("numeric", "about 3.14159", "3.14", tolerance=0.01).value == 1.0
    assert score("numeric", "1,050", 1000, tolerance=0.1, relative=True).value == 1.0
    assert score("numeric", "1,200", 1000, tolerance=0.1, relative=True).value == 0.0
    assert score("numeric", "no digits here", 5).value == 0.0
    assert score("numeric", "5", "n/a").error == "missing_expected"
    with pytest.raises(ScorerConfigError):
        build_scorer("numeric", {"tolerance": -1}, ScorerContext())


def test_levenshtein_bleu_rouge() -> None:
    assert score("levenshtein", "kitten", "sitting").value == pytest.approx(1 - 3 / 7)
    assert score("levenshtein", "same", "same").value == 1.0
    assert score("bleu", "the cat sat on the mat", "the cat sat on the mat").value == pytest.approx(1.0)
    low = score("bleu", "a dog ran", "the cat sat on the mat").value
    assert low is not None and 0 <= low < 0.2
    assert score("rouge_l", "the cat sat on the mat", "the cat sat on the mat").value == pytest.approx(1.0)
    # LCS "the cat the mat" = 4 of 6 tokens each way
    part = score("rouge_l", "the cat lay on a mat", "the cat sat on the mat").value
    assert part == pytest.approx(4 / 6)
    # several references: the best one counts
    assert score("rouge_l", "hello world", ["nothing alike", "hello world"]).value == pytest.approx(1.0)


def test_embedding_similarity_with_the_local_minilm() -> None:
    from keel.providers.local_embeddings import local_embeddings_available

    assert local_embeddings_available(), "the embeddings extra is installed by make install"
    ctx = ScorerContext()
    scorer = build_scorer("embedding", {}, ctx)

    async def run() -> tuple[ScoreResult, ScoreResult, ScoreResult]:
        same = await scorer.score(
            ScoreInput(output="The capital of France is Paris.", expected="Paris is France's capital.")
        )
        far = await scorer.score(ScoreInput(output="I like turtles.", expected="Paris is France's capital."))
        exact = await scorer.score(ScoreInput(output="Paris", expected="Paris"))
        return same, far, exact

    same, far, exact = asyncio.run(run())
    assert same.value is not None and far.value is not None
    assert same.value > 0.7 > far.value
    assert exact.value == pytest.approx(1.0, abs=1e-5)


def test_unknown_scorers_and_custom_python_scorers() -> None:
    with pytest.raises(ScorerConfigError, match="unknown scorer type 'nope'"):
        build_scorer("nope", {}, ScorerContext())
    s = build_scorer("tests.test_evals:StartsWith", {"prefix": "Hi"}, ScorerContext(), name="greets")
    assert s.name == "greets"
    assert asyncio.run(s.score(ScoreInput(output="Hi there"))).value == 1.0
    with pytest.raises(ScorerConfigError, match="cannot import"):
        build_scorer("no_such_module_xyz:Thing", {}, ScorerContext())


class StartsWith:
    """A user's scorer, referenced from a suite as ``module:attr`` (no plugin needed)."""

    name = "starts_with"

    def __init__(self, options: dict[str, Any], ctx: ScorerContext) -> None:
        self.prefix = options["prefix"]

    async def score(self, inp: ScoreInput) -> ScoreResult:
        return ScoreResult.of(inp.output.startswith(self.prefix))


def test_score_results_are_never_nan() -> None:
    with pytest.raises(ValueError):
        ScoreResult(value=math.nan)
    with pytest.raises(ValueError):
        ScoreResult(value=None)  # an error code is required
    assert ScoreResult.failed("judge_error").value is None


# -- the paired bootstrap ---------------------------------------------------------------------------


def test_bootstrap_on_known_data() -> None:
    rng = np.random.default_rng(7)
    base = rng.normal(0.5, 0.1, 400)
    head = base + 0.1 + rng.normal(0, 0.05, 400)  # a true improvement of 0.1, paired noise sd 0.05
    d = paired_bootstrap(base.tolist(), head.tolist(), resamples=4000, seed=1)
    assert d.n == 400 and d.delta == pytest.approx(float((head - base).mean()))
    # the CI of a mean of 400 diffs with sd 0.05 is about +-1.96 * 0.05 / 20 = +-0.0049
    assert d.ci_low < d.delta < d.ci_high
    assert d.ci_high - d.ci_low == pytest.approx(2 * 1.96 * 0.05 / 20, rel=0.2)
    assert d.ci_low > 0.08 and d.p_worse == 0.0  # clearly better than no change
    # reproducible with a seed
    assert paired_bootstrap(base.tolist(), head.tolist(), resamples=4000, seed=1) == d


def test_bootstrap_pairing_beats_unpaired_noise() -> None:
    # large item-to-item variance, identical shift: pairing removes the item variance entirely
    base = [0.0, 1.0, 0.2, 0.9, 0.5, 0.1, 0.7, 0.3]
    head = [b - 0.25 for b in base]
    d = paired_bootstrap(base, head)
    assert d.ci_low == pytest.approx(-0.25) and d.ci_high == pytest.approx(-0.25) and d.p_worse == 1.0


def test_bootstrap_coverage_of_a_zero_change() -> None:
    rng = np.random.default_rng(3)
    covered = 0
    for trial in range(60):
        base = rng.integers(0, 2, 80).astype(float)
        head = rng.integers(0, 2, 80).astype(float)  # same distribution: the true delta is 0
        d = paired_bootstrap(base.tolist(), head.tolist(), resamples=1000, seed=trial)
        covered += d.ci_low <= 0 <= d.ci_high
    assert covered >= 51  # ~95 % nominal; a binomial 60-trial lower tail well below 57


def test_bootstrap_input_errors() -> None:
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="no paired items"):
        paired_bootstrap([], [])


# -- comparison and gate files ---------------------------------------------------------------------


def _rows(variant: str, values: dict[str, float | None], name: str = "exact") -> list[dict[str, Any]]:
    return [
        {
            "variant": variant,
            "item_id": iid,
            "repeat": 0,
            "output": f"out {iid} {v}",
            "scores": {name: {"value": v, "passed": None if v is None else v >= 1}}
            if v is not None
            else {name: {"value": None, "error": "judge_error"}},
        }
        for iid, v in values.items()
    ]


def test_compare_runs_pairs_items_and_applies_thresholds() -> None:
    base_run = {"id": "b", "suite": "s", "config": {}}
    head_run = {
        "id": "h",
        "suite": "s",
        "config": {"gate": {"threshold": -0.1}, "scorers": [{"type": "exact", "gate": -0.5}]},
    }
    base = _rows("p/m", {f"i{i}": 1.0 for i in range(10)})
    head = _rows("p/m", {**{f"i{i}": 1.0 for i in range(7)}, "i7": 0.0, "i8": 0.0, "i9": None})
    cmp = compare_runs(base_run, base, head_run, head)
    s = cmp["pairs"][0]["scorers"]["exact"]
    assert s["n"] == 9  # i9 errored in the head run: not paired
    assert s["delta"] == pytest.approx(-2 / 9) and s["threshold"] == -0.5
    assert s["ci_low"] <= s["delta"] <= s["ci_high"] and s["passed"] is (s["ci_low"] >= -0.5)
    items = cmp["pairs"][0]["items"]
    assert [r["item_id"] for r in items[:2]] == ["i7", "i8"]  # worst regressions first
    assert items[0]["delta"]["exact"] == -1.0
    strict = compare_runs(base_run, base, {**head_run, "config": {"gate": {"threshold": -0.1}}}, head)
    assert strict["passed"] is False


def test_summaries_count_errors_and_repeats() -> None:
    rows = _rows("p/m", {"a": 1.0, "b": 0.0, "c": None})
    rows += [{**rows[0], "repeat": 1, "scores": {"exact": {"value": 0.0, "passed": False}}}]
    s = summarise(rows)["variants"]["p/m"]["scores"]["exact"]
    assert s["n"] == 2 and s["errors"] == 1
    assert s["mean"] == pytest.approx((0.5 + 0.0) / 2)  # item a: mean of its two repeats
    assert s["repeat_stdev"] == pytest.approx(0.5)


def test_junit_and_markdown() -> None:
    base_run = {"id": "b", "suite": "s", "label": "main", "config": {}}
    head_run = {"id": "h", "suite": "s", "config": {}}
    cmp = compare_runs(base_run, _rows("v", {"a": 1.0, "b": 1.0}), head_run, _rows("v", {"a": 0.0, "b": 0.0}))
    xml = junit_xml(cmp)
    assert 'failures="1"' in xml and "<failure" in xml and 'name="exact"' in xml
    md = markdown_summary(cmp)
    assert "❌ failed" in md and "[-1.000, -1.000]" in md and "`main`" in md
    nothing = compare_runs(
        base_run,
        _rows("v1", {"a": 1.0}) + _rows("v2", {"a": 1.0}),
        head_run,
        _rows("x", {"a": 1.0}) + _rows("y", {"a": 1.0}),
    )
    assert nothing["passed"] is False and "no variant in common" in nothing["note"]
    assert 'failures="1"' in junit_xml(nothing)


# -- suites -------------------------------------------------------------------------------------------


def _suite(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "s",
        "dataset": "d",
        "prompts": [{"messages": [{"role": "user", "content": "{{ q }}"}]}],
        "models": ["m"],
        "scorers": ["exact"],
    }
    doc.update(over)
    return doc


def test_suite_parsing() -> None:
    s = parse_suite(_suite(models=["a", {"name": "b", "params": {"temperature": 0}, "alias": "bee"}]))
    assert s.variant_names() == ["prompt1/a", "prompt1/bee"]
    assert s.dataset.name == "d" and s.concurrency == 8 and s.repeats == 1 and s.gate.threshold == -0.05
    reg = parse_suite(
        _suite(prompts=[{"prompt": "support/answer@staging"}], scorers=[{"type": "contains", "gate": -0.2}])
    )
    assert reg.prompts[0].ref == ("support/answer", "staging") and reg.variant_names() == ["answer/m"]
    assert reg.scorers[0].options() == {}  # gate is the runner's, not the scorer's


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"prompts": [{"name": "x"}]}, "prompts[0]: give exactly one of"),
        ({"prompts": [{"prompt": "bad ref!"}]}, "must look like name"),
        ({"models": []}, "models: List should have at least 1 item"),
        ({"scorers": ["exact", "exact"]}, "scorer names must be unique"),
        ({"concurrency": 0}, "concurrency: Input should be greater than or equal to 1"),
        ({"repeats": "many"}, "repeats: Input should be a valid integer"),
        ({"dataset": {"version": 3}}, "needs 'name'"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
        ({"prompts": [{"name": "a", "template": "x"}, {"name": "a", "template": "y"}]}, "share a name"),
    ],
)
def test_suite_errors_name_the_field(over: dict[str, Any], message: str) -> None:
    with pytest.raises(SuiteError) as err:
        parse_suite(_suite(**over))
    assert message in str(err.value)


def test_suite_files(tmp_path: Path) -> None:
    p = tmp_path / "suite.yaml"
    p.write_text(
        "dataset: {file: missing.jsonl}\nprompts: [{template: '{{ q }}'}]\nmodels: [m]\nscorers: [exact]\n"
    )
    with pytest.raises(SuiteError, match="does not exist"):
        load_suite(p)
    (tmp_path / "missing.jsonl").write_text('{"input": "x"}\n')
    s = load_suite(p)
    assert s.name == "suite" and s.resolve("missing.jsonl") == tmp_path / "missing.jsonl"
    p.write_text("name: [unclosed\n")
    with pytest.raises(SuiteError, match="invalid YAML"):
        load_suite(p)


# -- datasets -----------------------------------------------------------------------------------------


def test_dataset_formats_round_trip() -> None:
    items = parse_items(
        '{"id": "a", "input": {"q": "one"}, "expected": "1", "contexts": ["c1"], "metadata": {"k": 1}}\n'
        '{"q": "two", "expected": {"n": 2}}\n',
        "jsonl",
    )
    assert items[0]["contexts"] == ["c1"] and items[1]["input"] == {"q": "two"}
    assert len(items[1]["id"]) == 16  # derived from the content: stable across imports
    assert parse_items('{"q": "two", "expected": {"n": 2}}', "jsonl")[0]["id"] == items[1]["id"]
    for fmt in ("jsonl", "csv", "yaml"):
        back = parse_items(dump_items(items, fmt), fmt)
        assert [(i["id"], i["input"], i["contexts"], i["metadata"]) for i in back] == [
            (i["id"], i["input"], i["contexts"], i["metadata"]) for i in items
        ], fmt
    csv_items = parse_items('question,expected,contexts\nWhat?,42,"[""doc""]"\n', "csv")
    assert csv_items[0]["input"] == {"question": "What?"} and csv_items[0]["contexts"] == ["doc"]


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        ('{"input": "a"}\n{bad\n', "jsonl", "line 2: invalid JSON"),
        ('{"expected": "x"}\n', "jsonl", "needs 'input'"),
        ('{"input": "a", "contexts": [1]}\n', "jsonl", "contexts: must be a list of strings"),
        ("- 1\n- 2\n", "yaml", "an item must be an object"),
        ("a,b\n1,2,3\n", "csv", "row 2: more cells"),
        ("x", "xml", "unknown format"),
    ],
)
def test_dataset_errors_name_the_line(text: str, fmt: str, message: str) -> None:
    with pytest.raises(DatasetFormatError, match=message):
        parse_items(text, fmt)


def test_items_from_a_trace() -> None:
    trace = {
        "trace_id": "ab" * 16,
        "model": "gpt-4o-mini",
        "tags": ["prod"],
        "spans": [
            {
                "kind": "llm",
                "model": "gpt-4o-mini",
                "input": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                "output": {"choices": [{"message": {"role": "assistant", "content": "hello!"}}]},
            }
        ],
    }
    item = item_from_trace(trace)
    assert item["input"] == {"messages": [{"role": "user", "content": "hi"}]}
    assert item["expected"] == "hello!" and item["source_trace_id"] == "ab" * 16
    assert item["metadata"] == {"model": "gpt-4o-mini", "tags": ["prod"]}
    with pytest.raises(DatasetFormatError, match="no LLM call"):
        item_from_trace({"trace_id": "x", "spans": [{"kind": "tool", "input": {}}]})
