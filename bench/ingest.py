"""keel OTLP ingest benchmark: spans/s sustained into SQLite and PostgreSQL, with zero loss.

For each backend, one run starts ``keel serve`` as a subprocess (its own process group) on a fresh
database — a SQLite file in a temp dir, or a new PostgreSQL database created on the server given by
``--pg-url`` and dropped afterwards — and then:

1. builds every payload up front (so the senders cost little CPU during the run): OTLP/HTTP protobuf
   ``ExportTraceServiceRequest`` bodies made with opentelemetry-proto, each with ``--batch`` spans of
   realistic GenAI traces (an ``invoke_agent`` root, two ``chat`` LLM spans carrying the GenAI
   semantic-convention attributes — model, provider, token counts, input/output messages — and an
   ``execute_tool`` span), every span with fresh ids;
2. sends a warm-up export and waits until it is stored;
3. posts all payloads with ``--senders`` concurrent HTTP clients (aiohttp, keep-alive), each one
   ``POST /v1/traces`` with the master key. A ``503`` (queue full: back-pressure) is retried after
   its ``Retry-After``, as an OTLP exporter does; any other non-200 is an error;
4. polls the ``spans`` table until every accepted span is stored, and reports

   * **accepted spans/s** — spans answered 200 ÷ time from the first send to the last answer;
   * **stored spans/s** — spans in the table ÷ time from the first send until the last one is
     stored: the sustained end-to-end rate (decode, map, queue, price, insert, fold into traces);
   * **sent = stored** — the count of rows equals the number of spans accepted (checked exactly);
   * 503 retries, and the CPU keel's process group used (its serving process and its trace-writer
     child process).

The target (from the issue): **at least 10,000 spans/s stored into SQLite** on a 2-core machine,
with sent = stored on every backend. Exit status 0 when met, 1 when not, 2 when the benchmark could
not run.

Usage::

    .venv/bin/python bench/ingest.py                         # sqlite and postgresql, 200k spans each
    .venv/bin/python bench/ingest.py --backends sqlite --spans 100000 --markdown
    .venv/bin/python bench/ingest.py --senders 8 --batch 1024 --json /tmp/ingest.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

REPO_DIR = Path(__file__).resolve().parent.parent
MASTER_KEY = "sk-keel-bench-master"
SQLITE_TARGET = 10_000.0  # spans/s stored into SQLite
SPANS_PER_TRACE = 4


class BenchError(RuntimeError):
    """The benchmark could not run."""


@dataclass
class Result:
    backend: str
    spans_sent: int
    spans_stored: int
    exports: int
    batch: int
    senders: int
    retries_503: int
    errors: int
    accept_s: float
    store_s: float
    accepted_per_s: float
    stored_per_s: float
    keel_cpu_s: float
    keel_cores: float
    server_us_per_span: float  # CPU of keel's serving process (receive, decode, map, queue)
    writer_us_per_span: float  # CPU of the trace-writer child (price, insert, fold into traces)
    machine_busy_cores: float  # every process on the machine, this benchmark included
    target: float | None

    @property
    def lossless(self) -> bool:
        return self.spans_sent == self.spans_stored and self.errors == 0

    @property
    def passed(self) -> bool:
        return self.lossless and (self.target is None or self.stored_per_s >= self.target)


# -- payloads ---------------------------------------------------------------------------------------


def _kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _chat_attrs(i: int) -> list[KeyValue]:
    msgs = [{"role": "user", "parts": [{"type": "text", "content": f"Plan a day in Lisbon, variant {i}."}]}]
    out = [
        {
            "role": "assistant",
            "parts": [{"type": "text", "content": "Morning: Belém. Afternoon: Alfama. Evening: fado."}],
            "finish_reason": "stop",
        }
    ]
    return [
        _kv("gen_ai.operation.name", "chat"),
        _kv("gen_ai.provider.name", "openai"),
        _kv("gen_ai.request.model", "gpt-4o-mini"),
        _kv("gen_ai.response.model", "gpt-4o-mini-2024-07-18"),
        _kv("gen_ai.request.temperature", 0.3),
        _kv("gen_ai.usage.input_tokens", 420 + i % 50),
        _kv("gen_ai.usage.output_tokens", 60 + i % 20),
        _kv("gen_ai.input.messages", orjson.dumps(msgs).decode()),
        _kv("gen_ai.output.messages", orjson.dumps(out).decode()),
        _kv("gen_ai.response.finish_reasons", "stop"),
    ]


def _template(traces: int) -> ExportTraceServiceRequest:
    """One export of ``traces`` GenAI traces (4 spans each); ids are filled in per payload."""
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend([_kv("service.name", "bench-app"), _kv("keel.project", "bench")])
    ss = rs.scope_spans.add()
    ss.scope.name = "bench.ingest"
    now = time.time_ns()
    for t in range(traces):
        t0 = now + t * 1000
        root = ss.spans.add(name="invoke_agent planner", kind=Span.SPAN_KIND_INTERNAL)
        root.start_time_unix_nano, root.end_time_unix_nano = t0, t0 + 900_000_000
        root.attributes.extend(
            [
                _kv("gen_ai.operation.name", "invoke_agent"),
                _kv("gen_ai.agent.name", "planner"),
                _kv("gen_ai.conversation.id", f"conv-{t % 97}"),
                _kv("user.id", f"user-{t % 31}"),
            ]
        )
        for j, (name, start, end) in enumerate(
            [
                ("chat gpt-4o-mini", 10, 400),
                ("execute_tool weather", 410, 450),
                ("chat gpt-4o-mini", 460, 880),
            ]
        ):
            sp = ss.spans.add(name=name, kind=Span.SPAN_KIND_CLIENT if j != 1 else Span.SPAN_KIND_INTERNAL)
            sp.start_time_unix_nano, sp.end_time_unix_nano = t0 + start * 1_000_000, t0 + end * 1_000_000
            if j == 1:
                sp.attributes.extend(
                    [
                        _kv("gen_ai.operation.name", "execute_tool"),
                        _kv("gen_ai.tool.name", "weather"),
                        _kv("gen_ai.tool.call.arguments", '{"city": "Lisbon"}'),
                        _kv("gen_ai.tool.call.result", '{"temp_c": 24}'),
                    ]
                )
            else:
                sp.attributes.extend(_chat_attrs(t + j))
            sp.status.CopyFrom(Status(code=Status.STATUS_CODE_OK))
    return req


def build_payloads(total_spans: int, batch: int, rng: random.Random) -> list[bytes]:
    """Serialized exports with ``total_spans`` spans in all, ``batch`` a piece, every id fresh."""
    traces_per = max(1, batch // SPANS_PER_TRACE)
    req = _template(traces_per)
    spans = req.resource_spans[0].scope_spans[0].spans
    out: list[bytes] = []
    left = total_spans
    while left > 0:
        for i in range(0, len(spans), SPANS_PER_TRACE):
            tid = rng.getrandbits(128).to_bytes(16, "big")
            root_id = rng.getrandbits(64).to_bytes(8, "big")
            for k in range(SPANS_PER_TRACE):
                sp = spans[i + k]
                sp.trace_id = tid
                sp.span_id = root_id if k == 0 else rng.getrandbits(64).to_bytes(8, "big")
                if k:
                    sp.parent_span_id = root_id
        out.append(req.SerializeToString())
        left -= len(spans)
    return out


# -- keel as a subprocess ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system) of the group's processes: the server, and the trace-writer child."""
    out = {"server": 0.0, "writer": 0.0}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            cmdline = Path(entry.path, "cmdline").read_bytes()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2 :].split()
        if int(f[2]) == pgid:
            # utime and stime are fields 14 and 15; the writer is a multiprocessing spawn child
            role = "writer" if b"multiprocessing" in cmdline else "server"
            out[role] += (int(f[11]) + int(f[12])) / _CLK_TCK
    return out


def machine_busy() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)) / _CLK_TCK


class Keel:
    def __init__(self, tmp: Path, database_url: str, extra_env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.database_url = database_url
        env = {
            **os.environ,
            "KEEL_PORT": str(self.port),
            "KEEL_DATABASE_URL": database_url,
            "KEEL_MASTER_KEY": MASTER_KEY,
            "KEEL_DATA_DIR": str(tmp / ".keel"),
            "KEEL_LOG_LEVEL": "warning",
            **extra_env,
        }
        env.pop("KEEL_REDIS_URL", None)
        (tmp / "keel.yaml").write_text("models: []\n")
        self.log_path = tmp / "keel.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "keel.cli", "serve"],
                cwd=tmp,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"keel exited during start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"keel did not start in 60 s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self) -> dict[str, float]:
        return group_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def count_spans(self, exact: bool = True) -> int:
        """Rows in ``spans``; ``exact=False`` reads max(id) instead (an index probe, not a scan: polled often)."""
        sql = "SELECT count(*) FROM spans" if exact else "SELECT coalesce(max(id), 0) FROM spans"
        if self.database_url.startswith("sqlite"):
            path = self.database_url.removeprefix("sqlite:///")
            with contextlib.closing(sqlite3.connect(path, timeout=30)) as c:
                return int(c.execute(sql).fetchone()[0])
        import psycopg

        with psycopg.connect(self.database_url) as c:
            row = c.execute(sql).fetchone()
            return int(row[0]) if row else 0


@contextlib.contextmanager
def pg_database(admin_url: str) -> Any:
    import psycopg

    name = "keel_bench_" + uuid.uuid4().hex[:8]
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=5)
    except Exception as exc:
        raise BenchError(f"PostgreSQL unreachable at {admin_url}: {exc}") from None
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- load -------------------------------------------------------------------------------------------


async def send_all(url: str, payloads: list[bytes], senders: int) -> tuple[int, int, float]:
    """POST every payload; returns (503 retries, errors, seconds until the last answer)."""
    headers = {"authorization": f"Bearer {MASTER_KEY}", "content-type": "application/x-protobuf"}
    queue = list(reversed(payloads))
    retries = errors = 0
    conn = aiohttp.TCPConnector(limit=senders)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:

        async def sender() -> None:
            nonlocal retries, errors
            while queue:
                body = queue.pop()
                while True:
                    async with session.post(url + "/v1/traces", data=body, headers=headers) as r:
                        await r.read()
                        if r.status == 200:
                            break
                        if r.status == 503:  # back-pressure: wait as told, send the same export again
                            retries += 1
                            await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                            continue
                        errors += 1
                        print(f"  export failed: {r.status} {(await r.text())[:200]}", file=sys.stderr)
                        break

        t0 = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(senders)))
        return retries, errors, time.perf_counter() - t0


def wait_stored(keel: Keel, expected: int, stall_s: float = 60.0) -> int:
    """Poll until ``expected`` spans are stored, or no progress for ``stall_s``; returns the count.

    Progress is polled cheaply (max(id)); the count that is returned is exact (count(*)).
    """
    last, last_change = -1, time.monotonic()
    while True:
        n = keel.count_spans(exact=False)
        if n >= expected:
            n = keel.count_spans()
            if n >= expected:
                return n
        if n != last:
            last, last_change = n, time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            return keel.count_spans()
        time.sleep(0.05)


def run_backend(backend: str, args: argparse.Namespace, tmp: Path, extra_env: dict[str, str]) -> Result:
    rng = random.Random(backend)
    print(f"[{backend}] building {args.spans} spans in exports of {args.batch} ...", file=sys.stderr)
    warmup = build_payloads(args.batch * 2, args.batch, rng)
    payloads = build_payloads(args.spans, args.batch, rng)
    spans_per = args.batch // SPANS_PER_TRACE * SPANS_PER_TRACE
    sent = len(payloads) * spans_per
    ctx: Any = pg_database(args.pg_url) if backend == "postgresql" else contextlib.nullcontext(None)
    with ctx as pg_url:
        db_url = pg_url or f"sqlite:///{tmp}/{backend}/keel.db"
        (tmp / backend).mkdir(exist_ok=True)
        keel = Keel(tmp / backend, db_url, extra_env)
        try:
            asyncio.run(send_all(keel.url, warmup, 2))
            base = wait_stored(keel, len(warmup) * spans_per)
            if base != len(warmup) * spans_per:
                raise BenchError(
                    f"warm-up: {base} of {len(warmup) * spans_per} spans stored\n{keel.log_tail()}"
                )
            print(f"[{backend}] sending {sent} spans with {args.senders} senders ...", file=sys.stderr)
            cpu0 = keel.cpu_seconds()
            busy0 = machine_busy()
            t0 = time.perf_counter()
            retries, errors, accept_s = asyncio.run(send_all(keel.url, payloads, args.senders))
            stored = wait_stored(keel, base + sent) - base
            store_s = time.perf_counter() - t0
            cpu1 = keel.cpu_seconds()
            server_cpu, writer_cpu = cpu1["server"] - cpu0["server"], cpu1["writer"] - cpu0["writer"]
            time.sleep(0.5)  # anything stored twice would show up now
            stored = keel.count_spans() - base
        finally:
            keel.stop()
    return Result(
        backend=backend,
        spans_sent=sent,
        spans_stored=stored,
        exports=len(payloads),
        batch=spans_per,
        senders=args.senders,
        retries_503=retries,
        errors=errors,
        accept_s=accept_s,
        store_s=store_s,
        accepted_per_s=sent / accept_s,
        stored_per_s=stored / store_s,
        keel_cpu_s=server_cpu + writer_cpu,
        keel_cores=(server_cpu + writer_cpu) / store_s,
        server_us_per_span=server_cpu / max(stored, 1) * 1e6,
        writer_us_per_span=writer_cpu / max(stored, 1) * 1e6,
        machine_busy_cores=(machine_busy() - busy0) / store_s,
        target=SQLITE_TARGET if backend == "sqlite" else None,
    )


def markdown(results: list[Result]) -> str:
    lines = [
        "| backend | spans sent | spans stored | sent = stored | accepted spans/s | stored spans/s (sustained) "
        "| target | 503 retries | keel CPU (cores) | CPU a span: server / writer | machine busy (cores) |",
        "|---|---:|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        target = f"≥ {r.target:,.0f}: {'PASS' if r.passed else 'FAIL'}" if r.target else "—"
        lines.append(
            f"| {r.backend} | {r.spans_sent:,} | {r.spans_stored:,} | {'yes' if r.lossless else 'NO'} "
            f"| {r.accepted_per_s:,.0f} | {r.stored_per_s:,.0f} | {target} | {r.retries_503} | {r.keel_cores:.2f} "
            f"| {r.server_us_per_span:.0f} µs / {r.writer_us_per_span:.0f} µs | {r.machine_busy_cores:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--backends", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    p.add_argument("--spans", type=int, default=200_000, help="spans sent per backend (measured run)")
    p.add_argument("--batch", type=int, default=512, help="spans per export (a multiple of 4)")
    p.add_argument("--senders", type=int, default=4, help="concurrent HTTP clients")
    p.add_argument(
        "--pg-url",
        default=os.environ.get("KEEL_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    p.add_argument("--keel-env", action="append", default=[], metavar="NAME=VALUE", help="extra keel setting")
    p.add_argument("--markdown", action="store_true", help="print the Markdown table")
    p.add_argument("--json", type=Path, help="write the results as JSON")
    args = p.parse_args(argv)
    extra_env = dict(kv.split("=", 1) for kv in args.keel_env)
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="keel-ingest-") as d:
            for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
                if backend not in ("sqlite", "postgresql"):
                    raise BenchError(f"unknown backend {backend!r}")
                results.append(run_backend(backend, args, Path(d), extra_env))
    except BenchError as exc:
        print(f"benchmark could not run: {exc}", file=sys.stderr)
        return 2
    print(f"\nmachine: {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}")
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        target = f" (target >= {r.target:,.0f}/s)" if r.target else ""
        print(
            f"{r.backend:10} sent {r.spans_sent:,} stored {r.spans_stored:,} "
            f"{'(sent = stored)' if r.lossless else '(LOSS OR ERRORS)'}; "
            f"accepted {r.accepted_per_s:,.0f} spans/s, stored {r.stored_per_s:,.0f} spans/s{target}; "
            f"{r.retries_503} retries after 503; keel used {r.keel_cores:.2f} cores "
            f"(CPU per span: server {r.server_us_per_span:.0f} us, writer {r.writer_us_per_span:.0f} us; "
            f"machine busy {r.machine_busy_cores:.2f} cores)  {verdict}"
        )
    if args.markdown:
        print()
        print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) | {"passed": r.passed} for r in results], indent=2))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
