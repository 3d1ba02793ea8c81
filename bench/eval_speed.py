"""keel eval runner benchmark: a 1,000-item run end to end, and how model calls scale with concurrency.

Starts, each as its own subprocess on 127.0.0.1: keel's mock upstream (``python -m keel.testing``)
and ``keel serve`` (fresh SQLite in a temp dir) with two models — ``mock`` (answers at once) and
``slow`` (the mock's ``slow:<s>`` fault: every answer takes ``--slow`` seconds).  Then:

1. **1,000 items, deterministic scorers**: a dataset of ``--items`` items is pushed and a suite with
   exact / contains / regex / levenshtein / json_valid runs through the gateway (every call traced,
   the run and its results stored through the REST API), without the output cache.  Target: under
   10 s end to end.  A rerun with the cache on shows the cached path.
2. **Concurrency scaling**: ``--scale-items`` items against ``slow`` at concurrency 1, 2, 4, 8, 16,
   32.  With calls that each wait ``s`` seconds, n items take about ``n * s / c`` at concurrency c
   when the runner really keeps c calls in flight; the table prints the wall time, the speed-up over
   concurrency 1 measured in the same run, and the efficiency (speed-up / c).

Usage::

    .venv/bin/python bench/eval_speed.py                  # 1000 items; scaling with 64 items x 0.2 s
    .venv/bin/python bench/eval_speed.py --items 5000 --json /tmp/eval-bench.json

Exit status 0 when the 1,000-item run meets its target and concurrency 8 is at least 4x faster than
concurrency 1; 1 otherwise; 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from keel.evals import EvalClient, execute_suite, parse_suite

TARGET_S = 10.0
SCALE_LEVELS = (1, 2, 4, 8, 16, 32)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: process exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")


def suite(dataset: str, model: str, concurrency: int, cache: bool, scorers: list[Any]) -> Any:
    return parse_suite(
        {
            "name": f"bench-{model}",
            "dataset": dataset,
            "prompts": [{"name": "p", "messages": [{"role": "user", "content": "{{ q }}"}]}],
            "models": [model],
            "scorers": scorers,
            "concurrency": concurrency,
            "cache": cache,
            "retries": 0,
        }
    )


async def timed_run(url: str, key: str, s: Any, cache_dir: Path | None) -> tuple[float, Any]:
    async with EvalClient(url, key, max_connections=max(16, s.concurrency + 8)) as client:
        t0 = time.perf_counter()
        report = await execute_suite(s, client, cache_dir=cache_dir)
        return time.perf_counter() - t0, report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32, help="for the 1,000-item run")
    ap.add_argument("--scale-items", type=int, default=64)
    ap.add_argument("--slow", type=float, default=0.2, help="seconds each slow call takes")
    ap.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="keel-eval-bench-"))
    mock_port, keel_port = free_port(), free_port()
    key = "sk-keel-bench-" + secrets.token_hex(8)
    (tmp / "keel.yaml").write_text(
        f"""models:
  - name: mock
    provider: openai-compatible
    model: gpt-4o-mini
    api_base: http://127.0.0.1:{mock_port}/v1
    input_cost_per_mtok: 1.0
    output_cost_per_mtok: 2.0
  - name: slow
    provider: openai-compatible
    model: "fault:slow:{args.slow}"
    api_base: http://127.0.0.1:{mock_port}/v1
    input_cost_per_mtok: 1.0
    output_cost_per_mtok: 2.0
"""
    )
    env = {
        **os.environ,
        "KEEL_DATABASE_URL": f"sqlite:///{tmp}/keel.db",
        "KEEL_MASTER_KEY": key,
        "KEEL_DATA_DIR": str(tmp),
    }
    env.pop("KEEL_REDIS_URL", None)
    bindir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "keel.testing", "--host", "127.0.0.1", "--port", str(mock_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [str(bindir / "keel"), "serve", "--config", str(tmp / "keel.yaml"), "--port", str(keel_port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    ]
    url = f"http://127.0.0.1:{keel_port}"
    try:
        wait_ready(f"http://127.0.0.1:{mock_port}", procs[0])
        wait_ready(url, procs[1])
        return run(url, key, tmp, args)
    except Exception as exc:
        print(f"benchmark could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def run(url: str, key: str, tmp: Path, args: argparse.Namespace) -> int:
    http = httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}, timeout=120)
    items = [
        {"id": f"i{n}", "input": {"q": f"question {n}"}, "expected": f"Mock reply to: question {n}"}
        for n in range(args.items)
    ]
    r = http.post("/api/datasets", json={"name": "bench-big", "items": items})
    r.raise_for_status()
    scorers: list[Any] = [
        "exact",
        {"type": "contains", "value": "Mock"},
        {"type": "regex", "pattern": r"question \d+$"},
        "levenshtein",
        "json_valid",
    ]
    print(f"keel eval runner benchmark · {os.cpu_count()} CPUs · mock upstream and keel as subprocesses\n")

    big_s, big = asyncio.run(
        timed_run(url, key, suite("bench-big", "mock", args.concurrency, False, scorers), None)
    )
    v = big.run["summary"]["variants"]["p/mock"]
    ok_big = big_s < TARGET_S and v["errors"] == 0 and v["scores"]["exact"]["mean"] == 1.0
    print(
        f"1. {args.items} items x {len(scorers)} deterministic scorers, concurrency {args.concurrency}, no cache:\n"
        f"   {big_s:.2f} s end to end ({args.items / big_s:.0f} items/s) · {big.calls} gateway calls · "
        f"errors {v['errors']} · exact {v['scores']['exact']['mean']:.3f} · run cost ${big.run['cost_usd']:.6f}"
        f" · target < {TARGET_S:.0f} s: {'PASS' if ok_big else 'FAIL'}"
    )
    cache_dir = tmp / "cache"
    asyncio.run(timed_run(url, key, suite("bench-big", "mock", args.concurrency, True, scorers), cache_dir))
    cached_s, cached = asyncio.run(
        timed_run(url, key, suite("bench-big", "mock", args.concurrency, True, scorers), cache_dir)
    )
    print(
        f"   rerun from the output cache: {cached_s:.2f} s · {cached.cache_hits} cache hits, {cached.calls} calls\n"
    )

    small = items[: args.scale_items]
    http.post("/api/datasets", json={"name": "bench-scale", "items": small}).raise_for_status()
    print(f"2. concurrency scaling: {args.scale_items} items, each call {args.slow:.2f} s at the upstream")
    print(
        f"   {'concurrency':>11} {'wall s':>8} {'ideal s':>8} {'speed-up':>9} {'efficiency':>10} {'peak in flight':>15}"
    )
    rows = []
    base_s = None
    for c in SCALE_LEVELS:
        wall, rep = asyncio.run(timed_run(url, key, suite("bench-scale", "slow", c, False, ["exact"]), None))
        base_s = base_s or wall
        ideal = args.scale_items * args.slow / c
        speedup = base_s / wall
        rows.append(
            {
                "concurrency": c,
                "wall_s": wall,
                "ideal_s": ideal,
                "speedup": speedup,
                "efficiency": speedup / c,
                "max_in_flight": rep.summary["max_in_flight"],
            }
        )
        print(
            f"   {c:>11} {wall:>8.2f} {ideal:>8.2f} {speedup:>8.1f}x {speedup / c:>10.0%} "
            f"{rep.summary['max_in_flight']:>15}"
        )
    by_c = {r["concurrency"]: r for r in rows}
    ok_scale = by_c[8]["speedup"] >= 4.0
    print(
        f"   concurrency 8 vs 1: {by_c[8]['speedup']:.1f}x (target >= 4x): {'PASS' if ok_scale else 'FAIL'}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "items": args.items,
                    "big_run_s": big_s,
                    "cached_rerun_s": cached_s,
                    "scaling": rows,
                    "cpus": os.cpu_count(),
                },
                indent=2,
            )
        )
    return 0 if ok_big and ok_scale else 1


if __name__ == "__main__":
    sys.exit(main())
