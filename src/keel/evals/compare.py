"""Run summaries and run-to-run comparison (per scorer, per item), with paired bootstrap CIs.

A result row is ``{variant, item_id, repeat, output, error, scores: {name: {value, passed, error}}}``.
An item's score in a run is its mean over repeats of the values that exist; errors (value None)
are counted, never averaged in.  Two runs are compared variant by variant (same variant names; or
the only variant of each), scorer by scorer, over the items both runs scored.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from keel.evals.stats import paired_bootstrap

__all__ = ["DEFAULT_GATE_THRESHOLD", "compare_runs", "item_scores", "pair_variants", "summarise"]

DEFAULT_GATE_THRESHOLD = -0.05


def _value(score: Any) -> float | None:
    if isinstance(score, Mapping):
        v = score.get("value")
    else:
        v = score
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def item_scores(results: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """variant -> scorer -> item id -> mean value over repeats (None when every repeat errored)."""
    acc: dict[str, dict[str, dict[str, list[float | None]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for r in results:
        for name, s in (r.get("scores") or {}).items():
            acc[r["variant"]][name][r["item_id"]].append(_value(s))
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for variant, scorers in acc.items():
        out[variant] = {}
        for name, items in scorers.items():
            out[variant][name] = {}
            for iid, vals in items.items():
                got = [v for v in vals if v is not None]
                out[variant][name][iid] = sum(got) / len(got) if got else None
    return out


def summarise(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per variant: counts, latency, cost, and per scorer mean / pass rate / errors / repeat spread."""
    by_variant: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for r in results:
        by_variant[r["variant"]].append(r)
    variants: dict[str, Any] = {}
    for variant, rows in by_variant.items():
        latencies = sorted(r["latency_ms"] for r in rows if r.get("latency_ms") is not None)
        scorers: dict[str, Any] = {}
        per_item: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        counts: dict[str, dict[str, int]] = defaultdict(lambda: {"errors": 0, "passed": 0, "verdicts": 0})
        for r in rows:
            for name, s in (r.get("scores") or {}).items():
                v = _value(s)
                c = counts[name]
                if v is None:
                    c["errors"] += 1
                    continue
                per_item[name][r["item_id"]].append(v)
                passed = s.get("passed") if isinstance(s, Mapping) else None
                if passed is not None:
                    c["verdicts"] += 1
                    c["passed"] += int(bool(passed))
        for name, c in counts.items():
            items = per_item.get(name, {})
            means = [sum(v) / len(v) for v in items.values()]
            spreads = [statistics.pstdev(v) for v in items.values() if len(v) > 1]
            scorers[name] = {
                "mean": sum(means) / len(means) if means else None,
                "n": len(means),
                "errors": c["errors"],
                "pass_rate": c["passed"] / c["verdicts"] if c["verdicts"] else None,
                "repeat_stdev": sum(spreads) / len(spreads) if spreads else None,
            }
        variants[variant] = {
            "results": len(rows),
            "items": len({r["item_id"] for r in rows}),
            "errors": sum(1 for r in rows if r.get("error")),
            "cached": sum(1 for r in rows if r.get("cached")),
            "latency_ms_p50": latencies[len(latencies) // 2] if latencies else None,
            "scores": scorers,
        }
    return {"variants": variants}


def pair_variants(base: Iterable[str], head: Iterable[str]) -> list[tuple[str, str]]:
    """Variants compared: those with the same name; else, when each run has one, those two."""
    b, h = sorted(set(base)), sorted(set(head))
    common = [v for v in h if v in b]
    if common:
        return [(v, v) for v in common]
    if len(b) == 1 and len(h) == 1:
        return [(b[0], h[0])]
    return []


def _thresholds(head_run: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
    cfg = head_run.get("config") or {}
    gate = cfg.get("gate") or {}
    default = float(gate.get("threshold", DEFAULT_GATE_THRESHOLD))
    per: dict[str, float] = {}
    for s in cfg.get("scorers") or []:
        if isinstance(s, Mapping) and s.get("gate") is not None:
            per[str(s.get("name") or s.get("type"))] = float(s["gate"])
    return default, per


def _first_outputs(results: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    out: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in results:
        key = (r["variant"], r["item_id"])
        if key not in out or r.get("repeat", 0) < out[key].get("repeat", 0):
            out[key] = r
    return out


def compare_runs(
    base_run: Mapping[str, Any],
    base_results: Sequence[Mapping[str, Any]],
    head_run: Mapping[str, Any],
    head_results: Sequence[Mapping[str, Any]],
    *,
    confidence: float | None = None,
    resamples: int | None = None,
    seed: int | None = None,
    items: bool = True,
) -> dict[str, Any]:
    """Per paired variant and scorer: means, delta (head - base), its CI and the gate verdict.

    The gate thresholds come from the head run's suite (``gate.threshold``, each scorer's ``gate``):
    a scorer fails when the CI's lower bound is below its threshold, or when no item could be
    paired.  ``items`` adds the per-item diff (outputs and scores side by side).
    """
    gate = (head_run.get("config") or {}).get("gate") or {}
    confidence = confidence if confidence is not None else float(gate.get("confidence", 0.95))
    resamples = resamples if resamples is not None else int(gate.get("resamples", 2000))
    seed = seed if seed is not None else int(gate.get("seed", 0))
    default, per = _thresholds(head_run)
    bs, hs = item_scores(base_results), item_scores(head_results)
    pairs_out: list[dict[str, Any]] = []
    base_first, head_first = _first_outputs(base_results), _first_outputs(head_results)
    for bv, hv in pair_variants({r["variant"] for r in base_results}, {r["variant"] for r in head_results}):
        scorers: dict[str, Any] = {}
        b_sc, h_sc = bs.get(bv, {}), hs.get(hv, {})
        for name in sorted(set(b_sc) | set(h_sc)):
            threshold = per.get(name, default)
            if name not in b_sc or name not in h_sc:
                scorers[name] = {
                    "n": 0,
                    "threshold": threshold,
                    "passed": None,
                    "note": f"only in the {'head' if name in h_sc else 'base'} run",
                }
                continue
            ids = sorted(
                i
                for i in set(b_sc[name]) & set(h_sc[name])
                if b_sc[name][i] is not None and h_sc[name][i] is not None
            )
            if not ids:
                scorers[name] = {
                    "n": 0,
                    "threshold": threshold,
                    "passed": False,
                    "note": "no item was scored in both runs",
                }
                continue
            d = paired_bootstrap(
                [b_sc[name][i] for i in ids],  # type: ignore[misc]
                [h_sc[name][i] for i in ids],  # type: ignore[misc]
                confidence=confidence,
                resamples=resamples,
                seed=seed,
            )
            scorers[name] = {**d.as_dict(), "threshold": threshold, "passed": d.ci_low >= threshold}
        entry: dict[str, Any] = {"base_variant": bv, "head_variant": hv, "scorers": scorers}
        if items:
            entry["items"] = _item_diff(bv, hv, b_sc, h_sc, base_first, head_first)
        pairs_out.append(entry)
    verdicts = [s["passed"] for p in pairs_out for s in p["scorers"].values() if s["passed"] is not None]
    return {
        "base": {k: base_run.get(k) for k in ("id", "label", "suite", "created_at", "dataset_version")},
        "head": {k: head_run.get(k) for k in ("id", "label", "suite", "created_at", "dataset_version")},
        "confidence": confidence,
        "resamples": resamples,
        "pairs": pairs_out,
        "passed": bool(pairs_out) and all(verdicts),
        "note": None if pairs_out else "the runs have no variant in common",
    }


def _item_diff(
    bv: str,
    hv: str,
    b_sc: Mapping[str, Mapping[str, float | None]],
    h_sc: Mapping[str, Mapping[str, float | None]],
    base_first: Mapping[tuple[str, str], Mapping[str, Any]],
    head_first: Mapping[tuple[str, str], Mapping[str, Any]],
) -> list[dict[str, Any]]:
    ids = sorted({i for (v, i) in base_first if v == bv} | {i for (v, i) in head_first if v == hv})
    names = sorted(set(b_sc) | set(h_sc))
    rows: list[dict[str, Any]] = []
    worst: dict[str, float] = {}
    for iid in ids:
        b, h = base_first.get((bv, iid)), head_first.get((hv, iid))
        base_scores = {n: b_sc.get(n, {}).get(iid) for n in names}
        head_scores = {n: h_sc.get(n, {}).get(iid) for n in names}
        deltas = {
            n: (head_scores[n] - base_scores[n])  # type: ignore[operator]
            if base_scores[n] is not None and head_scores[n] is not None
            else None
            for n in names
        }
        worst[iid] = min((d for d in deltas.values() if d is not None), default=0.0)
        rows.append(
            {
                "item_id": iid,
                "base_output": b.get("output") if b else None,
                "head_output": h.get("output") if h else None,
                "base_error": b.get("error") if b else "missing",
                "head_error": h.get("error") if h else "missing",
                "base_scores": base_scores,
                "head_scores": head_scores,
                "delta": deltas,
                "changed": (b.get("output") if b else None) != (h.get("output") if h else None),
            }
        )
    # the worst regressions first, then the rest in id order
    rows.sort(key=lambda r: (worst[r["item_id"]], r["item_id"]))
    return rows
