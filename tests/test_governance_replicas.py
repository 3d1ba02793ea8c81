"""Two `keel serve` processes sharing PostgreSQL and Redis enforce ONE rate limit and ONE budget.

The rate window is shortened to 5 s (KEEL_RATE_LIMIT_WINDOW_S) so the test runs in seconds; the
algorithm is the same as for the 60 s default.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from keel.store import Store
from keel.testing import MockProvider
from tests.conftest import free_port

WINDOW_S = 5.0
RPM = 600


def _serve(tmp: Path, env: dict[str, str], port: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "keel.cli", "serve", "--port", str(port)],
        cwd=tmp,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("keel serve did not start")


def test_two_servers_share_one_rate_limit_and_one_budget(
    tmp_path: Path, mock_upstream: MockProvider, pg_database: str, redis_url: str
) -> None:
    (tmp_path / "keel.yaml").write_text(
        "models:\n"
        f"  - {{name: priced, provider: openai-compatible, model: gpt-4o-mini, api_base: '{mock_upstream.base_url}',"
        " input_cost_per_mtok: 1000, output_cost_per_mtok: 2000, max_retries: 0}\n"
    )
    store = Store.from_url(pg_database)
    project = "replicas-" + uuid.uuid4().hex[:6]
    limited, _ = store.create_key(project, "rpm", limits={"rpm": RPM})
    budgeted, budget_row = store.create_key(
        project, "budget", limits={"budget_usd": 1.0, "budget_period": "total"}
    )
    env = {
        **os.environ,
        "KEEL_DATABASE_URL": pg_database,
        "KEEL_REDIS_URL": redis_url,
        "KEEL_MASTER_KEY": "sk-master-replicas",
        "KEEL_RATE_LIMIT_WINDOW_S": str(WINDOW_S),
        "KEEL_CONFIG": str(tmp_path / "keel.yaml"),
    }
    ports = [free_port(), free_port()]
    procs = [_serve(tmp_path, env, p) for p in ports]
    try:
        body = {"model": "priced", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}

        async def hammer(key: str, until: float | None, stop_on: str | None = None) -> dict[str, int]:
            counts: dict[str, int] = {}
            done = asyncio.Event()
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:

                async def worker(i: int) -> None:
                    url = f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions"
                    while not done.is_set() and (until is None or time.monotonic() < until):
                        r = await client.post(url, json=body, headers={"authorization": f"Bearer {key}"})
                        code = str(r.status_code) if r.status_code != 429 else r.json()["error"]["code"]
                        counts[code] = counts.get(code, 0) + 1
                        if stop_on and counts.get(stop_on, 0) >= 20:
                            done.set()

                await asyncio.gather(*(worker(i) for i in range(32)))
            return counts

        # one window of hammering, both servers at once, from idle
        counts = asyncio.run(hammer(limited, time.monotonic() + WINDOW_S * 0.98))
        admitted = counts.get("200", 0)
        print(
            f"\nrate limit {RPM}/{WINDOW_S:g}s across 2 servers: admitted {admitted}, refused {counts.get('rate_limit_exceeded:key:rpm', 0)}"
        )
        assert set(counts) <= {"200", "rate_limit_exceeded:key:rpm"}, counts
        assert RPM * 0.99 <= admitted <= RPM, counts

        # the budget: hammer until both servers refuse, then compare the spend with $1.00
        counts = asyncio.run(hammer(budgeted, None, stop_on="budget_exceeded"))
        assert counts.get("budget_exceeded", 0) >= 20 and counts.get("200", 0) > 5, counts
        time.sleep(2)  # let the trace writers flush
        h = {"authorization": "Bearer sk-master-replicas"}
        spend = 0.0
        for _ in range(50):
            rows = httpx.get(
                f"http://127.0.0.1:{ports[0]}/api/usage",
                params={"group_by": "key", "project": project},
                headers=h,
            ).json()["data"]
            spend = next((r["cost_usd"] for r in rows if r["group"] == budget_row.id), 0.0)
            req = next((r["requests"] for r in rows if r["group"] == budget_row.id), 0)
            if req >= counts["200"]:
                break
            time.sleep(0.2)
        print(
            f"budget $1.00 across 2 servers: {counts['200']} calls admitted, spend ${spend:.4f}, overshoot ${spend - 1.0:+.4f}"
        )
        assert 0.5 < spend <= 1.0 + 1e-9
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
