"""keel gateway benchmark: the same wrk load against the upstream, a minimal proxy, and keel.

One run starts, on 127.0.0.1 and each as its own subprocess:

* the upstream — keel's mock provider (``python -m keel.testing``), which answers
  ``POST /v1/chat/completions`` with a small deterministic completion;
* the baseline — ``bench/baseline_proxy.py``, a minimal pass-through proxy (raw ASGI, uvicorn +
  uvloop + httptools, one pooled aiohttp client, orjson) with the same worker count as keel;
* keel — ``keel serve`` with a generated config (one ``openai-compatible`` model pointing at the
  upstream), a fresh SQLite database in a temp dir, and a virtual key created with
  ``keel keys create``: every request is authenticated with that key and traced (tracing is always on).

Then, for each target in turn — (a) the upstream directly, (b) the baseline proxy, (c) keel — it
sends one sanity request, runs a short wrk warm-up, and then the measured wrk run (same threads,
connections and duration for all three), with a Lua script POSTing a small chat-completions body
with ``Authorization: Bearer <key>``.  It prints requests/s, P50, P99 and errors per target, the
keel/direct and keel/proxy ratios, PASS/FAIL against the targets

* keel RPS >= 0.5 x proxy RPS,
* keel P99 <= 2 x proxy P99,
* zero errors (non-2xx responses and socket errors) for keel,

and checks that tracing really happened: it counts the rows of keel's ``spans`` table once the
trace writer has flushed ("traces stored: N of M requests", M = every request keel answered:
warm-ups, measured runs, the sanity request and an unauthenticated probe; N may exceed M by up to
one request per connection per wrk run, the requests in flight when wrk stops), and reads the
newest trace back through ``GET /api/traces?limit=1`` with the master key.

Because on a small machine everything — wrk included — shares the same cores, it also reports the
CPU each process group used during each measured run, the CPU time per request of the servers in
the request's path (a steadier figure than RPS on a busy machine), and the CPU used by processes
that are not part of the benchmark (with a warning when that is significant).  ``--rounds N``
interleaves N measurements per target and reports medians.

Usage::

    .venv/bin/python bench/gateway.py                       # -t2 -c32 -d10s, 1 worker each
    .venv/bin/python bench/gateway.py --rounds 3 --markdown --json /tmp/bench.json   # as in the docs
    .venv/bin/python bench/gateway.py --workers 2 --duration 20
    .venv/bin/python bench/gateway.py --keel-env KEEL_TRACE_QUEUE_SIZE=0   # diagnosis: no trace writes

Requires ``wrk`` on PATH (or ``--wrk PATH``).  Exit status: 0 when every target is met, 1 when one
is missed, 2 when the benchmark could not run.  All subprocesses are stopped on exit, also on
Ctrl-C and errors.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
MODEL_NAME = "bench-model"
UPSTREAM_MODEL = "gpt-4o-mini"
UPSTREAM_KEY = "sk-upstream"
PROMPT = "Hello! In one short sentence, what is an LLM gateway?"
JSON_MARKER = "KEEL_BENCH_JSON "
RPS_RATIO_TARGET = 0.5  # keel RPS >= 0.5 x proxy RPS
P99_RATIO_TARGET = 2.0  # keel P99 <= 2 x proxy P99
NOISE_CORES = 0.2  # warn when other processes used more than this many cores during a measured run

# wrk calls done() once with the merged statistics of all threads; latency values are microseconds.
LUA_TEMPLATE = """\
wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{marker}{{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean, latency.max))
end
"""


class BenchError(RuntimeError):
    """The benchmark could not run (a server did not start, wrk failed, ...)."""


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    """One wrk run, from the Lua ``done()`` summary (exact, not rounded like wrk's text output)."""

    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    non_2xx: int
    socket_errors: dict[str, int]

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


@dataclass
class Leg:
    """A benchmarked target and what was measured against it."""

    name: str
    label: str
    url: str
    rounds: list[WrkResult] = field(default_factory=list)
    warmups: list[WrkResult] = field(default_factory=list)
    cpu_rounds: list[dict[str, float]] = field(default_factory=list)
    wrk_output: str = ""

    @property
    def result(self) -> WrkResult | None:
        """The measured runs combined: medians of RPS and latencies, sums of requests and errors."""
        return aggregate(self.rounds) if self.rounds else None

    @property
    def cpu_s(self) -> dict[str, float]:
        """Median CPU seconds per process group over the measured runs."""
        groups = {g for r in self.cpu_rounds for g in r}
        return {g: statistics.median(r.get(g, 0.0) for r in self.cpu_rounds) for g in sorted(groups)}

    @property
    def warmup_requests(self) -> int:
        return sum(w.requests for w in self.warmups)

    @property
    def warmup_errors(self) -> int:
        return sum(w.errors for w in self.warmups)


@dataclass
class Checks:
    rps_ratio: float
    p99_ratio: float
    keel_errors: int
    rps_ok: bool
    p99_ok: bool
    errors_ok: bool
    traces_stored: int
    traces_expected: int
    traces_ok: bool
    latest_trace: dict[str, Any] | None = None
    """The newest trace as ``GET /api/traces?limit=1`` returns it (master key), or None."""

    @property
    def passed(self) -> bool:
        return self.rps_ok and self.p99_ok and self.errors_ok and self.traces_ok


def aggregate(runs: Sequence[WrkResult]) -> WrkResult:
    """Combine rounds: the median of each rate and percentile, the total of requests and errors."""
    if len(runs) == 1:
        return runs[0]
    med = statistics.median
    return WrkResult(
        requests=sum(r.requests for r in runs),
        duration_s=sum(r.duration_s for r in runs),
        rps=med(r.rps for r in runs),
        p50_ms=med(r.p50_ms for r in runs),
        p90_ms=med(r.p90_ms for r in runs),
        p99_ms=med(r.p99_ms for r in runs),
        mean_ms=med(r.mean_ms for r in runs),
        max_ms=max(r.max_ms for r in runs),
        non_2xx=sum(r.non_2xx for r in runs),
        socket_errors={k: sum(r.socket_errors[k] for r in runs) for k in runs[0].socket_errors},
    )


def parse_wrk(output: str) -> WrkResult:
    """Parse the JSON line our Lua ``done()`` hook prints into a :class:`WrkResult`."""
    for line in output.splitlines():
        if line.startswith(JSON_MARKER):
            d = json.loads(line[len(JSON_MARKER) :])
            break
    else:
        raise BenchError(f"wrk printed no summary line:\n{output}")
    duration = d["duration_us"] / 1e6
    return WrkResult(
        requests=d["requests"],
        duration_s=duration,
        rps=d["requests"] / duration if duration > 0 else 0.0,
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        mean_ms=d["mean_us"] / 1000,
        max_ms=d["max_us"] / 1000,
        non_2xx=d["status"],
        socket_errors={k: d[k] for k in ("connect", "read", "write", "timeout")},
    )


# --------------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------------


class Processes:
    """Subprocesses started by this run, each in its own session so its whole group can be stopped."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(REPO_DIR),
            start_new_session=True,
        )
        log.close()  # the child holds its own descriptor
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self, name: str) -> float:
        """User + system CPU seconds of every live process in ``name``'s process group."""
        proc = self.procs.get(name)
        if proc is None:
            return 0.0
        return _group_cpu_seconds(proc.pid)

    def stop(self, name: str, timeout: float = 20.0) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # workers of a uvicorn supervisor share its group: make sure none outlives it
        for pid in _group_members(proc.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, fields from field 3 on) of every process in /proc/<pid>/stat."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), stat[stat.rindex(")") + 2 :].split()


def _group_members(pgid: int) -> list[int]:
    # fields[0] is field 3 (state); pgrp is field 5
    return [pid for pid, fields in _proc_stats() if int(fields[2]) == pgid and fields[0] != "Z"]


def _group_cpu_seconds(pgid: int) -> float:
    # utime and stime are fields 14 and 15
    ticks = sum(int(f[11]) + int(f[12]) for _, f in _proc_stats() if int(f[2]) == pgid)
    return ticks / _CLK_TCK


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (``/proc/stat``: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already counted in user)
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / _CLK_TCK


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def wait_ready(procs: Processes, name: str, url: str, timeout: float = 60.0) -> None:
    """Poll ``GET <url>/health`` until it answers 200; fail early when the process dies."""
    proc = procs.procs[name]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{name} exited with status {proc.returncode}:\n{procs.log_tail(name)}")
        with contextlib.suppress(OSError):
            if http("GET", url + "/health", timeout=2.0)[0] == 200:
                return
        time.sleep(0.1)
    raise BenchError(
        f"{name} did not become ready at {url}/health within {timeout:.0f}s:\n{procs.log_tail(name)}"
    )


# --------------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------------


def clean_env() -> dict[str, str]:
    """The environment for the servers: ours, minus any KEEL_* setting that could leak in."""
    return {k: v for k, v in os.environ.items() if not k.startswith("KEEL_")}


def keel_bin(python: str) -> list[str]:
    exe = Path(python).parent / "keel"
    return [str(exe)] if exe.exists() else [python, "-c", "from keel.cli import main; main()"]


def write_keel_config(tmp: Path, upstream_port: int, price_override: bool = False) -> Path:
    cfg = tmp / "keel.yaml"
    text = (
        "models:\n"
        f"  - name: {MODEL_NAME}\n"
        "    provider: openai-compatible\n"
        f"    model: {UPSTREAM_MODEL}\n"
        f"    api_base: http://127.0.0.1:{upstream_port}/v1\n"
        f"    api_key: {UPSTREAM_KEY}\n"
    )
    if price_override:  # gpt-4o-mini list prices, USD per million tokens
        text += "    input_cost_per_mtok: 0.15\n    output_cost_per_mtok: 0.6\n"
    cfg.write_text(text)
    return cfg


def create_virtual_key(python: str, cfg: Path, env: dict[str, str]) -> str:
    argv = [
        *keel_bin(python),
        "keys",
        "create",
        "--config",
        str(cfg),
        "--project",
        "bench",
        "--name",
        "bench",
    ]
    argv += ["--models", MODEL_NAME]
    out = subprocess.run(
        argv, env={**env, "COLUMNS": "500"}, capture_output=True, text=True, timeout=120, check=False
    )
    if out.returncode != 0:
        raise BenchError(f"keel keys create failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    if not lines:
        raise BenchError(f"keel keys create printed no key:\n{out.stderr}")
    return lines[-1]


def write_lua(tmp: Path, name: str, model: str, key: str) -> Path:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64},
        separators=(",", ":"),
    )
    path = tmp / f"{name}.lua"
    path.write_text(LUA_TEMPLATE.format(body=body, key=key, marker=JSON_MARKER))
    return path


def sanity_check(label: str, url: str, model: str, key: str) -> None:
    """One request before the load: the target must answer 200 with a chat completion."""
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64}
    ).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    status, raw = http("POST", url + "/v1/chat/completions", body, headers)
    try:
        ok = status == 200 and isinstance(json.loads(raw).get("choices"), list)
    except ValueError:
        ok = False
    if not ok:
        raise BenchError(f"{label}: sanity request failed with {status}: {raw[:500]!r}")


# --------------------------------------------------------------------------------------------------
# Running wrk
# --------------------------------------------------------------------------------------------------


def run_wrk(
    wrk: str,
    url: str,
    lua: Path,
    threads: int,
    connections: int,
    duration: int,
    timeout_s: float,
) -> tuple[WrkResult, str]:
    argv = [
        wrk,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        f"--timeout={timeout_s:g}s",
        "--latency",
    ]
    argv += ["-s", str(lua), url + "/v1/chat/completions"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=duration + timeout_s + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"wrk exited with {proc.returncode}:\n{out}")
    return parse_wrk(out), out


def measure(
    procs: Processes, args: argparse.Namespace, leg: Leg, lua: Path, cpu_groups: Sequence[str]
) -> None:
    if args.warmup > 0:
        warm, _ = run_wrk(args.wrk, leg.url, lua, args.threads, args.connections, args.warmup, args.timeout)
        leg.warmups.append(warm)
    time.sleep(args.pause)
    before = {g: procs.cpu_seconds(g) for g in cpu_groups}
    busy0, wrk0 = _machine_busy_seconds(), _children_cpu_seconds()
    result, leg.wrk_output = run_wrk(
        args.wrk, leg.url, lua, args.threads, args.connections, args.duration, args.timeout
    )
    busy, wrk_cpu = _machine_busy_seconds() - busy0, _children_cpu_seconds() - wrk0
    cpu = {g: procs.cpu_seconds(g) - before[g] for g in cpu_groups}
    cpu["wrk"] = wrk_cpu
    # whatever else ran on the machine meanwhile (other users' jobs): makes noisy runs visible
    cpu["other"] = max(0.0, busy - sum(cpu.values()))
    leg.cpu_rounds.append(cpu)
    leg.rounds.append(result)


def count_spans(db: Path, expected: int, settle_s: float = 1.0, timeout_s: float = 30.0) -> int:
    """Rows in keel's ``spans`` table, once the count reaches ``expected`` or stops growing."""
    deadline = time.monotonic() + timeout_s
    last, last_change = -1, time.monotonic()
    while True:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
                n = int(con.execute("SELECT count(*) FROM spans").fetchone()[0])
        except sqlite3.Error:
            n = last
        now = time.monotonic()
        if n != last:
            last, last_change = n, now
        if (n >= expected and now - last_change >= settle_s) or now - last_change >= max(settle_s, 5.0):
            return max(n, 0)
        if now > deadline:
            return max(last, 0)
        time.sleep(0.25)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def latest_trace(keel_url: str, master_key: str) -> dict[str, Any] | None:
    """The newest trace from keel's management API (authenticated with the master key)."""
    try:
        status, raw = http(
            "GET", keel_url + "/api/traces?limit=1", headers={"authorization": f"Bearer {master_key}"}
        )
        data = json.loads(raw).get("data") if status == 200 else None
    except (OSError, ValueError):
        return None
    return data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None


def _git_commit() -> str:
    """The checked-out commit, "+dirty" when src/ has local changes (read-only git commands only)."""
    git = ["git", "--no-optional-locks", "-C", str(REPO_DIR)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            [*git, "status", "--porcelain", "--", "src"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info(wrk: str) -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False).stdout.splitlines()
    try:
        from importlib.metadata import version

        keel_version = version("keel")
    except Exception:
        keel_version = "unknown"
    return {
        "commit": _git_commit(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "keel": keel_version,
        "wrk": wrk_version[0].split(" Copyright")[0].strip() if wrk_version else "unknown",
    }


def compute_checks(
    direct: Leg,
    proxy: Leg,
    keel: Leg,
    traces_stored: int,
    traces_expected: int,
    latest_trace: dict[str, Any] | None,
) -> Checks:
    assert proxy.result and keel.result and direct.result
    rps_ratio = keel.result.rps / proxy.result.rps if proxy.result.rps else 0.0
    p99_ratio = keel.result.p99_ms / proxy.result.p99_ms if proxy.result.p99_ms else float("inf")
    keel_errors = keel.result.errors + keel.warmup_errors
    return Checks(
        rps_ratio=rps_ratio,
        p99_ratio=p99_ratio,
        keel_errors=keel_errors,
        rps_ok=rps_ratio >= RPS_RATIO_TARGET,
        p99_ok=p99_ratio <= P99_RATIO_TARGET,
        errors_ok=keel_errors == 0,
        traces_stored=traces_stored,
        traces_expected=traces_expected,
        traces_ok=traces_stored >= traces_expected
        and latest_trace is not None
        and latest_trace.get("model") == MODEL_NAME
        and bool(latest_trace.get("key_id")),
        latest_trace=latest_trace,
    )


def _fmt_errors(r: WrkResult) -> str:
    sock = ", ".join(f"{k} {v}" for k, v in r.socket_errors.items() if v)
    return f"{r.errors}" + (f" (non-2xx {r.non_2xx}{'; ' + sock if sock else ''})" if r.errors else "")


def _ok(flag: bool) -> str:
    return "PASS" if flag else "FAIL"


def text_report(legs: Sequence[Leg], checks: Checks, cpu_groups: Sequence[str], duration: float) -> str:
    direct, proxy, keel = legs
    assert direct.result and proxy.result and keel.result
    rows = [("target", "requests", "RPS", "P50 ms", "P90 ms", "P99 ms", "max ms", "errors")]
    for leg in legs:
        r = leg.result
        assert r is not None
        rows.append(
            (
                leg.label,
                str(r.requests),
                f"{r.rps:,.0f}",
                f"{r.p50_ms:.2f}",
                f"{r.p90_ms:.2f}",
                f"{r.p99_ms:.2f}",
                f"{r.max_ms:.1f}",
                _fmt_errors(r),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append(
            "  ".join(
                c.ljust(w) if j in (0, 7) else c.rjust(w)
                for j, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.append("")
    ncpu = os.cpu_count() or 1
    lines.append(
        f"CPU used during the measured run, in cores (CPU seconds / wall seconds; the machine has {ncpu}):"
    )
    for leg in legs:
        parts = [f"{g} {leg.cpu_s.get(g, 0.0) / duration:.2f}" for g in (*cpu_groups, "wrk", "other")]
        lines.append(f"  {leg.label:<{widths[0]}}  {', '.join(parts)}")
    lines.append("CPU time per request (the server process group(s) in the request's path):")
    for leg in legs:
        r = leg.result
        assert r is not None
        per_run = r.requests / len(leg.rounds)
        parts = [
            f"{g} {leg.cpu_s.get(g, 0.0) / per_run * 1e6:.0f} us"
            for g in cpu_groups
            if leg.cpu_s.get(g, 0.0) > 0.05 * duration
        ]
        lines.append(f"  {leg.label:<{widths[0]}}  {', '.join(parts) or '-'}")
    busiest = max(leg.cpu_s.get("other", 0.0) / duration for leg in legs)
    if busiest > NOISE_CORES:
        lines.append(
            f"WARNING: other processes on this machine used up to {busiest:.2f} cores during a measured run: "
            "the figures are noisy; rerun on a quiet machine (or use --rounds)"
        )
    lines.append("")
    kd_rps = keel.result.rps / direct.result.rps if direct.result.rps else 0.0
    kd_p99 = keel.result.p99_ms / direct.result.p99_ms if direct.result.p99_ms else float("inf")
    lines.append(f"keel / direct:  RPS x{kd_rps:.2f}   P99 x{kd_p99:.2f}")
    lines.append(f"keel / proxy:   RPS x{checks.rps_ratio:.2f}   P99 x{checks.p99_ratio:.2f}")
    lines.append("")
    lines.append(
        f"[{_ok(checks.rps_ok)}] keel RPS >= {RPS_RATIO_TARGET:g} x proxy RPS   (x{checks.rps_ratio:.2f})"
    )
    lines.append(
        f"[{_ok(checks.p99_ok)}] keel P99 <= {P99_RATIO_TARGET:g} x proxy P99   (x{checks.p99_ratio:.2f})"
    )
    lines.append(f"[{_ok(checks.errors_ok)}] keel errors == 0             ({checks.keel_errors})")
    lines.append(
        f"[{_ok(checks.traces_ok)}] traces stored: {checks.traces_stored} of {checks.traces_expected} requests"
    )
    t = checks.latest_trace
    lines.append(
        f"       newest trace via GET /api/traces?limit=1: model {t.get('model')}, key {t.get('key_id')}, "
        f"{t.get('input_tokens')}+{t.get('output_tokens')} tokens, cost {t.get('cost_usd')} USD, "
        f"{t.get('latency_ms')} ms"
        if t
        else "       newest trace via GET /api/traces?limit=1: none returned"
    )
    lines.append("")
    lines.append("ALL TARGETS MET" if checks.passed else "TARGETS MISSED")
    return "\n".join(lines)


def markdown_report(legs: Sequence[Leg], checks: Checks, cpu_groups: Sequence[str], duration: int) -> str:
    direct, _, keel = legs
    assert direct.result and keel.result
    out = [
        "| target | requests | RPS | P50 ms | P90 ms | P99 ms | errors | RPS vs direct | P99 vs direct "
        "| server CPU per request | other processes (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for leg in legs:
        r = leg.result
        assert r is not None
        per_run = r.requests / len(leg.rounds)
        cpu = ", ".join(
            f"{g} {leg.cpu_s[g] / per_run * 1e6:.0f} µs"
            for g in cpu_groups
            if leg.cpu_s.get(g, 0.0) > 0.05 * duration
        )
        out.append(
            f"| {leg.label} | {r.requests:,} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p90_ms:.2f} | {r.p99_ms:.2f} "
            f"| {r.errors} | {r.rps / direct.result.rps:.2f} | {r.p99_ms / direct.result.p99_ms:.2f} "
            f"| {cpu} | {leg.cpu_s.get('other', 0.0) / duration:.2f} |"
        )
    out.append("")
    out.append("| check | target | measured | result |")
    out.append("|---|---|---:|---|")
    out.append(
        f"| keel RPS / proxy RPS | >= {RPS_RATIO_TARGET:g} | {checks.rps_ratio:.2f} | {_ok(checks.rps_ok)} |"
    )
    out.append(
        f"| keel P99 / proxy P99 | <= {P99_RATIO_TARGET:g} | {checks.p99_ratio:.2f} | {_ok(checks.p99_ok)} |"
    )
    out.append(f"| keel errors | 0 | {checks.keel_errors} | {_ok(checks.errors_ok)} |")
    out.append(
        f"| traces stored | = requests | {checks.traces_stored:,} of {checks.traces_expected:,} | {_ok(checks.traces_ok)} |"
    )
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workers", type=int, default=1, help="server processes for the proxy and for keel (default 1)"
    )
    p.add_argument("--upstream-workers", type=int, default=2, help="mock upstream processes (default 2)")
    p.add_argument("--threads", "-t", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", "-c", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--duration", "-d", type=int, default=10, help="measured seconds per target (default 10)")
    p.add_argument(
        "--warmup", type=int, default=3, help="warm-up seconds per target, not measured (default 3)"
    )
    p.add_argument(
        "--pause", type=float, default=1.0, help="idle seconds between warm-up and measurement (default 1)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure each target this many times, interleaved; medians are reported (default 1)",
    )
    p.add_argument(
        "--price-override",
        action="store_true",
        help="give the bench model config prices (input/output_cost_per_mtok): keel then skips its "
        "genai-prices catalog lookup per span (diagnosis)",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="wrk request timeout in seconds (default 5)")
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="path of the wrk binary")
    p.add_argument("--python", default=sys.executable, help="interpreter for the servers (default: this one)")
    p.add_argument(
        "--json", type=Path, default=None, metavar="PATH", help="write the results as JSON to PATH"
    )
    p.add_argument(
        "--markdown", action="store_true", help="also print Markdown tables (for docs/benchmarks.md)"
    )
    p.add_argument(
        "--keep", action="store_true", help="keep the temp dir (config, logs, keel.db) and print it"
    )
    p.add_argument(
        "--keel-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for keel, for diagnosis (e.g. KEEL_STORE_BODIES=false); repeatable",
    )
    args = p.parse_args(argv)
    if shutil.which(args.wrk) is None:
        p.error(f"wrk not found ({args.wrk}); install it or pass --wrk PATH")
    if args.rounds < 1 or args.duration <= 0 or args.connections < args.threads:
        p.error("need --rounds >= 1, --duration > 0 and --connections >= --threads")
    for item in args.keel_env:
        if "=" not in item or not item.startswith("KEEL_"):
            p.error(f"--keel-env expects KEEL_NAME=VALUE, got {item!r}")
    return args


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="keel-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    # also when started from a non-interactive shell with '&', which leaves SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    py = args.python
    with _workdir(args.keep) as tmp:
        procs = Processes(tmp)
        try:
            return _run(args, py, tmp, procs)
        finally:
            procs.stop_all()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _run(args: argparse.Namespace, py: str, tmp: Path, procs: Processes) -> int:
    env = clean_env()
    up_port, proxy_port, keel_port = free_port(), free_port(), free_port()
    up_url = f"http://127.0.0.1:{up_port}"
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    keel_url = f"http://127.0.0.1:{keel_port}"
    info = machine_info(args.wrk)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    _log(
        f"run: {started}\n"
        f"machine: {info['nproc']} x {info['cpu']} · python {info['python']} · keel {info['keel']} "
        f"({info['commit']}) · {info['wrk']}\n"
        f"load: wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s (warm-up {args.warmup:g}s) · "
        f"workers: proxy {args.workers}, keel {args.workers}, upstream {args.upstream_workers}"
        + (f" · rounds: {args.rounds} (interleaved, medians)" if args.rounds > 1 else "")
        + (f"\nextra keel environment (diagnosis): {' '.join(args.keel_env)}" if args.keel_env else "")
        + ("\nkeel model has config prices (diagnosis: no catalog lookup)" if args.price_override else "")
    )

    # servers --------------------------------------------------------------------------------------
    _log("starting the mock upstream, the baseline proxy and keel ...")
    up_argv = [py, "-m", "keel.testing", "--host", "127.0.0.1", "--port", str(up_port)]
    up_argv += ["--workers", str(args.upstream_workers), "--log-level", "warning"]
    procs.start("upstream", up_argv, env)
    proxy_argv = [py, str(BENCH_DIR / "baseline_proxy.py"), "--upstream", up_url, "--port", str(proxy_port)]
    proxy_argv += [
        "--workers",
        str(args.workers),
        "--upstream-model",
        UPSTREAM_MODEL,
        "--upstream-key",
        UPSTREAM_KEY,
    ]
    procs.start("proxy", proxy_argv, env)

    cfg = write_keel_config(tmp, up_port, args.price_override)
    master_key = "sk-keel-master-" + secrets.token_urlsafe(16)
    keel_env = {**env, "KEEL_DATA_DIR": str(tmp / "keel-data"), "KEEL_MASTER_KEY": master_key}
    keel_env.update(item.split("=", 1) for item in args.keel_env)
    virtual_key = create_virtual_key(py, cfg, keel_env)
    keel_argv = [
        *keel_bin(py),
        "serve",
        "--config",
        str(cfg),
        "--port",
        str(keel_port),
        "--workers",
        str(args.workers),
    ]
    procs.start("keel", keel_argv, keel_env)

    wait_ready(procs, "upstream", up_url)
    wait_ready(procs, "proxy", proxy_url)
    wait_ready(procs, "keel", keel_url)

    # keel must refuse the load without the virtual key (auth is on)
    status, _ = http("POST", keel_url + "/v1/chat/completions", b"{}", {"content-type": "application/json"})
    if status != 401:
        raise BenchError(f"keel answered {status} to a request without a key: auth is not on")

    legs = [
        Leg("direct", "upstream (direct)", up_url),
        Leg("proxy", "baseline proxy", proxy_url),
        Leg("keel", "keel (auth + tracing)", keel_url),
    ]
    models = {"direct": UPSTREAM_MODEL, "proxy": MODEL_NAME, "keel": MODEL_NAME}
    keys = {"direct": UPSTREAM_KEY, "proxy": UPSTREAM_KEY, "keel": virtual_key}
    cpu_groups = ("upstream", "proxy", "keel")

    luas = {leg.name: write_lua(tmp, leg.name, models[leg.name], keys[leg.name]) for leg in legs}
    for leg in legs:
        sanity_check(leg.label, leg.url, models[leg.name], keys[leg.name])
    # rounds interleave the targets, so that a noisy neighbour hurts all three alike
    for rnd in range(1, args.rounds + 1):
        for leg in legs:
            tag = f"[round {rnd}/{args.rounds}] " if args.rounds > 1 else ""
            _log(f"{tag}{leg.label}: warm-up {args.warmup:g}s, then {args.duration:g}s measured ...")
            measure(procs, args, leg, luas[leg.name], cpu_groups)
            r = leg.rounds[-1]
            _log(f"  {r.rps:,.0f} req/s, P50 {r.p50_ms:.2f} ms, P99 {r.p99_ms:.2f} ms, errors {r.errors}")

    # tracing: the 401 probe + the sanity request + every warm-up and measured request
    keel_leg = legs[2]
    assert keel_leg.result is not None
    expected = 2 + keel_leg.result.requests + keel_leg.warmup_requests
    _log("waiting for keel's trace writer to flush ...")
    stored = count_spans(tmp / "keel-data" / "keel.db", expected)

    checks = compute_checks(legs[0], legs[1], keel_leg, stored, expected, latest_trace(keel_url, master_key))
    print()
    print(text_report(legs, checks, cpu_groups, args.duration))
    if args.markdown:
        print()
        print(markdown_report(legs, checks, cpu_groups, args.duration))
    if args.json:
        doc = {
            "date": started,
            "machine": info,
            "load": {
                "tool": "wrk",
                "threads": args.threads,
                "connections": args.connections,
                "duration_s": args.duration,
                "warmup_s": args.warmup,
                "rounds": args.rounds,
                "price_override": args.price_override,
                "workers": args.workers,
                "upstream_workers": args.upstream_workers,
                "keel_env": args.keel_env,
            },
            "legs": {
                leg.name: {
                    "label": leg.label,
                    "result": asdict(leg.result) if leg.result else None,
                    "rounds": [asdict(r) for r in leg.rounds],
                    "warmups": [asdict(w) for w in leg.warmups],
                    "cpu_cores": {g: s / args.duration for g, s in leg.cpu_s.items()},
                }
                for leg in legs
            },
            "checks": {**asdict(checks), "passed": checks.passed},
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        _log(f"wrote {args.json}")
    return 0 if checks.passed else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except BenchError as exc:
        _log(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        _log("interrupted; servers stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
