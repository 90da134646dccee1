"""Simulator overhead and latency fidelity, side by side in one run.

1. Requests per second of (a) a bare aiohttp handler that returns the very bytes the
   simulator returns and (b) the simulator itself with limits, billing and headers on
   and zero latency. Each server runs alone in its own process pinned to one core; the
   load generator is a separate process pinned to another core (a raw asyncio HTTP/1.1
   client, much cheaper per request than either server, so the server is what binds).
   Rounds alternate (a) and (b); the table shows each round and the medians.
2. Scheduling error: the simulator with a constant configured latency (TTFT, no ITL)
   and 1,000 requests kept in flight; per request, served latency (client-observed, send
   to last byte) minus the configured latency, p50/p90/p99/max in milliseconds. Each
   round also serves the same load from a bare aiohttp handler that only sleeps the
   configured latency: that p99 is the floor this machine and event loop allow.
3. The model alone, in-process: CPU microseconds per request of parsing the body,
   ``chat``, rendering the reply body and ``finish`` (``--skip-model`` to leave it out).

Servers run as ``ratelab serve`` runs them: the simulator with the serving GC settings
of ``simulator/gc_tuning.py`` (``--default-gc`` measures it without them).

Targets (issue 2): (b) >= 50% of (a); p99 scheduling error <= 2 ms.

Run from the repository root: ``.venv/bin/python benchmarks/bench_simulator.py``
(``--help`` for rounds, durations and connection counts).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.queues import Queue as MPQueue
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulator.model.config import SimulatorConfig
from simulator.model.plan import Admission

REQUEST_BODY = {
    "model": "gpt-4o-mini",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "Classify this line as spam or ham: hello"}],
}
API_KEY = "sk-ratelab"
PATH = "/v1/chat/completions"
_CONTENT_LENGTH = re.compile(rb"(?i)\r\ncontent-length:\s*(\d+)")


def _pin(cpu: int | None) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _sim_config(ttft_ms: float) -> SimulatorConfig:
    from simulator.model.config import apply_overrides, default_config

    # Limits and billing stay on (computed, headers rendered) but never bind.
    return apply_overrides(
        default_config(), rpm=10**9, tpm=10**12, balance_usd=1e12, ttft_ms=ttft_ms,
        itl_ms=0.0, seed=1,
    )


# -- server processes ------------------------------------------------------------------


def _serve_sim(ttft_ms: float, tune_gc: bool, cpu: int | None, ready: MPQueue) -> None:
    _pin(cpu)
    _raise_fd_limit()
    from simulator.server import start_server

    async def run() -> None:
        server = await start_server(_sim_config(ttft_ms), tune_gc=tune_gc)
        ready.put(server.port)
        await asyncio.Event().wait()

    asyncio.run(run())


def _serve_replay(tune_gc: bool, cpu: int | None, ready: MPQueue) -> None:
    """The real shell serving one real model decision over and over: the shell's own cost
    (parsing, the reply body, headers, finish bookkeeping) without the model's."""
    _pin(cpu)
    _raise_fd_limit()
    from simulator import server as shell

    config = _sim_config(0.0)
    model = shell.build_providers(config)["default"]
    decision = model.chat(0.0, API_KEY, REQUEST_BODY)
    assert isinstance(decision, Admission)
    first: Admission = decision

    class Replay:
        name = "default"

        def __init__(self) -> None:
            self.ids = 0

        def chat(self, now: float, api_key: str | None, body: object) -> Admission:
            self.ids += 1
            return Admission(self.ids, "chat", first.model, False, False, first.headers,
                             first.plan, first.created)

        def finish(self, now: float, admission: Admission, delivered: int) -> list[Admission]:
            return []

    shell.build_providers = lambda cfg, epoch_s=None: {"default": Replay()}  # type: ignore[assignment,misc]

    async def run() -> None:
        server = await shell.start_server(config, tune_gc=tune_gc)
        ready.put(server.port)
        await asyncio.Event().wait()

    asyncio.run(run())


def _serve_bare(body: bytes, headers: dict[str, str], sleep_s: float, cpu: int | None,
                ready: MPQueue) -> None:
    """A plain aiohttp handler replaying ``body`` and ``headers`` after ``sleep_s``."""
    _pin(cpu)
    _raise_fd_limit()
    from aiohttp import web

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        if sleep_s > 0:
            await asyncio.sleep(sleep_s)
        return web.Response(body=body, headers=headers)

    async def run() -> None:
        app = web.Application()
        app.router.add_post(PATH, handler)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(run())


@dataclass
class _Server:
    process: mp.process.BaseProcess
    port: int

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


def _start(ctx: mp.context.SpawnContext, target: Callable[..., None], *args: object
           ) -> _Server:
    ready: MPQueue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, ready), daemon=True)
    process.start()
    return _Server(process, int(ready.get(timeout=60)))


# -- load generator --------------------------------------------------------------------


class _Conn(asyncio.Protocol):
    """One keep-alive connection sending the same request back to back."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.buf = bytearray()
        self.need = -1
        self.sent = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.load.loop.call_later(self.load.next_delay(), self._send)

    def _send(self) -> None:
        if self.transport is None or time.monotonic() >= self.load.stop_at:
            self._close()
            return
        self.buf.clear()
        self.need = -1
        self.sent = time.monotonic()
        self.transport.write(self.load.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            match = _CONTENT_LENGTH.search(self.buf, 0, end + 2)
            self.need = end + 4 + (int(match.group(1)) if match else 0)
        if len(self.buf) >= self.need:
            self.load.record(int(self.buf[9:12]), self.sent, time.monotonic())
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.load.closed += 1
        if self.load.closed == self.load.connections and not self.load.done.done():
            self.load.done.set_result(None)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _Load:
    def __init__(self, port: int, connections: int, seconds: float, warmup: float,
                 spread: float) -> None:
        body = json.dumps(REQUEST_BODY).encode()
        self.request = (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.port = port
        self.connections = connections
        self.loop = asyncio.get_running_loop()
        self.measure_from = time.monotonic() + warmup + spread
        self.stop_at = self.measure_from + seconds
        self.seconds = seconds
        self.spread = spread
        self._started = 0
        self.ok = 0
        self.total = 0  # every completed request, warm-up included (for CPU per request)
        self.statuses: dict[int, int] = {}
        self.latencies: list[float] = []
        self.closed = 0
        self.done: asyncio.Future[None] = self.loop.create_future()

    def next_delay(self) -> float:
        # Stagger the first sends evenly over `spread` seconds so that a constant
        # latency does not make every connection fire in the same instant.
        self._started += 1
        return self.spread * (self._started - 1) / self.connections

    def record(self, status: int, sent: float, received: float) -> None:
        self.total += 1
        if sent < self.measure_from or received > self.stop_at:
            return
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.ok += 1
            self.latencies.append(received - sent)


def _run_load(port: int, connections: int, seconds: float, warmup: float, spread: float,
              cpu: int | None, out: MPQueue) -> None:
    _pin(cpu)
    _raise_fd_limit()

    async def run() -> dict[str, object]:
        load = _Load(port, connections, seconds, warmup, spread)
        for _ in range(connections):
            await load.loop.create_connection(lambda: _Conn(load), "127.0.0.1", port)
        await asyncio.wait_for(load.done, seconds + warmup + spread + 60)
        return {"ok": load.ok, "total": load.total, "statuses": load.statuses,
                "seconds": seconds, "latencies": load.latencies}

    out.put(asyncio.run(run()))


def _load(ctx: mp.context.SpawnContext, port: int, connections: int, seconds: float,
          warmup: float, spread: float, cpu: int | None) -> dict[str, object]:
    out: MPQueue = ctx.Queue()
    process = ctx.Process(target=_run_load,
                          args=(port, connections, seconds, warmup, spread, cpu, out))
    process.start()
    result: dict[str, object] = out.get(timeout=seconds + warmup + spread + 120)
    process.join(10)
    return result


# -- the two measurements --------------------------------------------------------------


async def _capture(port: int) -> tuple[bytes, dict[str, str]]:
    """One real simulator reply: the body and headers the bare handler will replay."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(
        f"http://127.0.0.1:{port}{PATH}", json=REQUEST_BODY,
        headers={"Authorization": f"Bearer {API_KEY}"},
    ) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise SystemExit(f"simulator answered {resp.status}: {body[:300]!r}")
        skip = {"content-length", "date", "server"}
        return body, {k: v for k, v in resp.headers.items() if k.lower() not in skip}


def _reply(ctx: mp.context.SpawnContext, cpu: int | None) -> tuple[bytes, dict[str, str]]:
    """Body and headers of one reply of a freshly started zero-latency simulator."""
    sim = _start(ctx, _serve_sim, 0.0, True, cpu)
    try:
        return asyncio.run(_capture(sim.port))
    finally:
        sim.stop()


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpus() -> tuple[int | None, int | None]:
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], cpus[1] if len(cpus) > 1 else cpus[0]


def throughput(args: argparse.Namespace, ctx: mp.context.SpawnContext) -> float:
    """Rounds of (a) bare vs (b) simulator; prints the table, returns the median ratio.

    Two figures per server: requests per wall second, and requests per CPU second of the
    server process (its user + system time over the run). On a shared machine the second
    is the fairer one: time other processes take from the core does not count against it.
    """
    server_cpu, load_cpu = _cpus()
    body, headers = _reply(ctx, server_cpu)
    print(f"\n1) throughput: {args.connections} keep-alive connections, {args.seconds:g} s per "
          f"measurement, server on CPU {server_cpu}, load generator on CPU {load_cpu}; "
          f"reply {len(body)} bytes")
    print(f"{'round':>5} {'(a) bare/s':>11} {'(b) sim/s':>10} {'b/a':>5}   "
          f"{'(a) per CPU-s':>13} {'(b) per CPU-s':>13} {'b/a':>5}  statuses (b)")
    rows = []
    replays: list[float] = []
    for n in range(1, args.rounds + 1):
        wall, per_cpu = {}, {}
        statuses: object = {}
        names = ("bare", "sim", "replay") if args.decompose else ("bare", "sim")
        for name in names:
            if name == "bare":
                server = _start(ctx, _serve_bare, body, headers, 0.0, server_cpu)
            elif name == "sim":
                server = _start(ctx, _serve_sim, 0.0, args.tune_gc, server_cpu)
            else:
                server = _start(ctx, _serve_replay, args.tune_gc, server_cpu)
            try:
                cpu_before = _cpu_seconds(server.process.pid)
                result = _load(ctx, server.port, args.connections, args.seconds, 0.5, 0.0,
                               load_cpu)
                cpu_used = _cpu_seconds(server.process.pid) - cpu_before
            finally:
                server.stop()
            wall[name] = int(result["ok"]) / float(result["seconds"])  # type: ignore[call-overload,arg-type]
            per_cpu[name] = int(result["total"]) / cpu_used  # type: ignore[call-overload]
            if name == "sim":
                statuses = result["statuses"]
        if args.decompose:
            replays.append(per_cpu["replay"] / per_cpu["bare"])
            statuses = f"{statuses}  shell-only/a per CPU-s {replays[-1]:.2f}"
        row = (wall["bare"], wall["sim"], wall["sim"] / wall["bare"],
               per_cpu["bare"], per_cpu["sim"], per_cpu["sim"] / per_cpu["bare"])
        rows.append(row)
        print(f"{n:>5} {row[0]:>11.0f} {row[1]:>10.0f} {row[2]:>5.2f}   {row[3]:>13.0f} "
              f"{row[4]:>13.0f} {row[5]:>5.2f}  {statuses}")
    med = [statistics.median(col) for col in zip(*rows, strict=True)]
    print(f"{'med':>5} {med[0]:>11.0f} {med[1]:>10.0f} {med[2]:>5.2f}   {med[3]:>13.0f} "
          f"{med[4]:>13.0f} {med[5]:>5.2f}")
    if replays:
        print(f"shell alone (replaying one model decision) per CPU-s / (a): median "
              f"{statistics.median(replays):.2f}")
    print(f"target b/a >= 0.50: wall {'met' if med[2] >= 0.5 else 'NOT met'}, "
          f"per CPU-second {'met' if med[5] >= 0.5 else 'NOT met'}")
    return med[5]


def _errors_ms(result: dict[str, object], latency_s: float) -> list[float]:
    served: list[float] = result["latencies"]  # type: ignore[assignment]
    if not served:
        raise SystemExit(f"no successful request: statuses {result['statuses']}")
    return sorted((x - latency_s) * 1000.0 for x in served)


def scheduling(args: argparse.Namespace, ctx: mp.context.SpawnContext) -> float:
    """Served minus configured latency with ``--inflight`` requests in flight, for the
    simulator and (unless ``--skip-floor``) a bare handler sleeping as long; returns the
    simulator's median p99 in ms."""
    server_cpu, load_cpu = _cpus()
    latency_s = args.latency_ms / 1000.0
    print(f"\n2) scheduling error: configured latency {args.latency_ms:g} ms (TTFT, non-stream), "
          f"{args.inflight} requests in flight (about {args.inflight / latency_s:.0f} req/s), "
          f"{args.latency_seconds:g} s measured; floor = bare aiohttp handler sleeping as long")
    print(f"{'round':>5} {'requests':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}"
          f"   {'floor p50':>9} {'floor p99':>9} {'floor max':>9}")
    body, headers = ((b"", {}) if args.skip_floor else _reply(ctx, server_cpu))
    p99s, floors = [], []
    for n in range(1, args.latency_rounds + 1):
        floor = ""
        if not args.skip_floor:
            server = _start(ctx, _serve_bare, body, headers, latency_s, server_cpu)
            try:
                result = _load(ctx, server.port, args.inflight, args.latency_seconds,
                               latency_s, latency_s, load_cpu)
            finally:
                server.stop()
            f_errors = _errors_ms(result, latency_s)
            fq = statistics.quantiles(f_errors, n=100, method="inclusive")
            floors.append(fq[98])
            floor = f"   {fq[49]:>9.2f} {fq[98]:>9.2f} {f_errors[-1]:>9.2f}"
        server = _start(ctx, _serve_sim, args.latency_ms, args.tune_gc, server_cpu)
        try:
            result = _load(ctx, server.port, args.inflight, args.latency_seconds, latency_s,
                           latency_s, load_cpu)
        finally:
            server.stop()
        errors = _errors_ms(result, latency_s)
        q = statistics.quantiles(errors, n=100, method="inclusive")
        p99s.append(q[98])
        print(f"{n:>5} {len(errors):>9} {q[49]:>8.2f} {q[89]:>8.2f} {q[98]:>8.2f} "
              f"{errors[-1]:>8.2f}{floor}")
    p99 = statistics.median(p99s)
    print(f"median p99 {p99:.2f} ms; target p99 <= 2 ms: {'met' if p99 <= 2.0 else 'NOT met'}")
    if floors:
        print(f"floor (bare handler, same load) median p99 {statistics.median(floors):.2f} ms; "
              f"simulator minus floor, median of rounds "
              f"{statistics.median(s - f for s, f in zip(p99s, floors, strict=True)):+.2f} ms")
    return p99


def model_alone(requests: int = 50_000) -> float:
    """CPU microseconds per request of the model alone, in this process: parse the body,
    ``chat``, render the reply body, ``finish`` (what the shell adds is measured by (c))."""
    from simulator import wire
    from simulator.server import build_providers

    provider = build_providers(_sim_config(0.0))["default"]
    raw = json.dumps(REQUEST_BODY).encode()
    now = 0.0
    per_round = []
    for _ in range(6):  # the first round warms up
        started = time.process_time()
        for _ in range(requests // 5):
            now += 0.002  # 500 requests/s of virtual time: the windows expire as they fill
            admission = provider.chat(now, API_KEY, json.loads(raw.decode()))
            assert isinstance(admission, Admission) and admission.plan is not None
            plan = admission.plan
            wire.chat_completion(admission.id, admission.created, admission.model, plan.text,
                                 plan.finish_reason, plan.usage, admission.n)
            provider.finish(now, admission, plan.n_chunks)
        per_round.append((time.process_time() - started) / (requests // 5) * 1e6)
    best = min(per_round[1:])
    print(f"\n3) model alone in-process (parse, chat, reply body, finish): {best:.1f} us CPU per "
          f"request (best of 5 rounds of {requests // 5:,}; median "
          f"{statistics.median(per_round[1:]):.1f})")
    return best


def main(argv: list[str] | None = None) -> int:
    """Run both measurements and print their tables; exit status 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32, help="throughput connections")
    parser.add_argument("--latency-ms", type=float, default=2000.0,
                        help="configured latency of the scheduling test, ms")
    parser.add_argument("--inflight", type=int, default=1000, help="requests in flight")
    parser.add_argument("--latency-seconds", type=float, default=8.0,
                        help="measured seconds of the scheduling test")
    parser.add_argument("--latency-rounds", type=int, default=2, help="scheduling rounds")
    parser.add_argument("--decompose", action="store_true",
                        help="also serve (c): the shell replaying one model decision, to "
                             "split the simulator's cost into shell and model")
    parser.add_argument("--skip-floor", action="store_true",
                        help="scheduling test without the bare-handler floor rounds")
    parser.add_argument("--default-gc", dest="tune_gc", action="store_false",
                        help="serve the simulator with CPython's default GC settings instead "
                             "of ratelab serve's (simulator/gc_tuning.py)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    load = "/".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"bench_simulator: python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"load average {load} (other processes share these cores)")
    if not args.skip_throughput:
        throughput(args, ctx)
    if not args.skip_latency:
        scheduling(args, ctx)
    if not args.skip_model:
        model_alone()
    print(f"load average at the end: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
