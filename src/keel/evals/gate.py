"""CI outputs of a gate: JUnit XML (one test case per variant x scorer) and a Markdown summary.

Both are rendered from the comparison :func:`keel.evals.compare.compare_runs` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from xml.etree import ElementTree as ET

__all__ = ["gate_failures", "junit_xml", "markdown_summary"]


def _fmt(v: Any, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def _ci(s: Mapping[str, Any]) -> str:
    if s.get("ci_low") is None:
        return "-"
    return f"[{s['ci_low']:+.3f}, {s['ci_high']:+.3f}]"


def gate_failures(comparison: Mapping[str, Any]) -> list[str]:
    """One line per failing (variant, scorer); empty when the gate passes."""
    out: list[str] = []
    if not comparison.get("pairs"):
        return [comparison.get("note") or "nothing to compare"]
    for p in comparison["pairs"]:
        for name, s in p["scorers"].items():
            if s.get("passed") is False:
                if s.get("n"):
                    why = (
                        f"CI lower bound {s['ci_low']:+.4f} < threshold {s['threshold']:+.4f} "
                        f"(delta {s['delta']:+.4f}, {round(s['confidence'] * 100)}% CI {_ci(s)}, n={s['n']})"
                    )
                else:
                    why = s.get("note") or "no paired items"
                out.append(f"{p['head_variant']} · {name}: {why}")
    return out


def junit_xml(comparison: Mapping[str, Any], suite_name: str | None = None) -> str:
    """JUnit XML: a testsuite per run comparison, a testcase per (variant, scorer)."""
    name = suite_name or (comparison.get("head") or {}).get("suite") or "keel-eval"
    cases: list[ET.Element] = []
    failures = 0
    for p in comparison.get("pairs") or []:
        for scorer, s in p["scorers"].items():
            case = ET.Element(
                "testcase",
                {"classname": f"keel.eval.{name}.{p['head_variant']}", "name": scorer, "time": "0"},
            )
            props = ET.SubElement(case, "properties")
            for key in ("base_mean", "head_mean", "delta", "ci_low", "ci_high", "threshold", "n"):
                if s.get(key) is not None:
                    ET.SubElement(props, "property", {"name": key, "value": repr(s[key])})
            if s.get("passed") is False:
                failures += 1
                msg = (
                    f"CI lower bound {s['ci_low']:+.4f} below threshold {s['threshold']:+.4f}"
                    if s.get("n")
                    else str(s.get("note") or "no paired items")
                )
                fail = ET.SubElement(case, "failure", {"message": msg, "type": "regression"})
                fail.text = (
                    f"{scorer}: base {_fmt(s.get('base_mean'))} -> head {_fmt(s.get('head_mean'))}, "
                    f"delta {_fmt(s.get('delta'), True)}, CI {_ci(s)}"
                )
            elif s.get("passed") is None:
                ET.SubElement(case, "skipped", {"message": str(s.get("note") or "not compared")})
            cases.append(case)
    if not cases:
        case = ET.Element("testcase", {"classname": f"keel.eval.{name}", "name": "comparison", "time": "0"})
        ET.SubElement(case, "failure", {"message": str(comparison.get("note") or "nothing to compare")})
        cases.append(case)
        failures = 1
    suites = ET.Element(
        "testsuites", {"name": "keel eval gate", "tests": str(len(cases)), "failures": str(failures)}
    )
    suite = ET.SubElement(
        suites,
        "testsuite",
        {
            "name": f"keel eval gate: {name}",
            "tests": str(len(cases)),
            "failures": str(failures),
            "errors": "0",
        },
    )
    suite.extend(cases)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"


def markdown_summary(comparison: Mapping[str, Any], run: Mapping[str, Any] | None = None) -> str:
    """A Markdown report: verdict, runs compared, and the deltas with their intervals."""
    head, base = comparison.get("head") or {}, comparison.get("base") or {}
    ok = comparison.get("passed")
    conf = round(float(comparison.get("confidence") or 0.95) * 100)
    lines = [
        f"## keel eval gate: {'✅ passed' if ok else '❌ failed'}",
        "",
        f"Suite **{head.get('suite')}** · run `{head.get('id')}` vs baseline `{base.get('id')}`"
        + (f" (label `{base.get('label')}`)" if base.get("label") else ""),
    ]
    if run is not None and run.get("cost_usd") is not None:
        lines.append(f"Run cost: ${run['cost_usd']:.6f}")
    lines += [
        "",
        f"| variant | scorer | baseline | run | Δ | {conf}% CI | threshold | result |",
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for p in comparison.get("pairs") or []:
        for name, s in p["scorers"].items():
            verdict = {True: "pass", False: "**FAIL**", None: "skipped"}[s.get("passed")]
            lines.append(
                f"| {p['head_variant']} | {name} | {_fmt(s.get('base_mean'))} | {_fmt(s.get('head_mean'))} | "
                f"{_fmt(s.get('delta'), True)} | {_ci(s)} | {_fmt(s.get('threshold'), True)} | {verdict} |"
            )
    failures = gate_failures(comparison)
    if failures and not ok:
        lines += ["", "Failures:", *(f"- {f}" for f in failures)]
    return "\n".join(lines) + "\n"
