"""Simulator overhead and latency fidelity, side by side in one run.

1. Requests per second of (a) a bare aiohttp handler that returns the very bytes the
   simulator returns and (b) the simulator itself with limits, billing and headers on
   and zero latency, both with the same GC settings and event loop. Each server runs
   alone in its own process pinned to one core; the load generator is a separate process
   pinned to another core (a raw asyncio HTTP/1.1 client, much cheaper per request than
   either server, so the server is what binds).
   Rounds alternate (a) and (b); the table shows each round and the medians.
2. Scheduling error: the simulator with a constant configured latency (TTFT, no ITL)
   and 1,000 requests kept in flight; per request, served minus configured latency,
   p50/p99/max in milliseconds, measured on both sides: by the server (handler start to
   the reply's last byte handed to the kernel, an aiohttp middleware added in the server
   process; the target's figure) and by the load generator (send to last byte received,
   which adds its own loop's lag). Each round also serves the same load from a bare
   aiohttp handler that only sleeps the configured latency, on the same event loop with
   the same GC settings: that p99 is the floor this machine and loop allow. Each server's
   run-queue wait (ms per second it was runnable but another process held its CPU) shows
   how much of the error is other processes'.
3. The model alone, in-process: CPU microseconds per request of parsing the body,
   ``chat``, rendering the reply body and ``finish`` (``--skip-model`` to leave it out).

Servers run as ``ratelab serve`` runs them: on ``simulator.loop.new_event_loop`` (timers
woken to the microsecond; ``--loop default`` for asyncio's own, ``--loop uvloop`` for
uvloop's if installed), the simulator
with the serving GC settings of ``simulator/gc_tuning.py`` (``--default-gc`` measures it
without them). ``--realtime`` runs servers and load generator at SCHED_FIFO priority
(root): what the simulator does with its core to itself.

``--instructions`` counts instead of timing: instructions per request of (a), (b) and (c)
(the shell replaying one model decision) under valgrind's callgrind, each server in a
process of its own, the load generator outside valgrind; the machine's load does not
enter these figures.

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
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from multiprocessing.queues import Queue as MPQueue
from multiprocessing.synchronize import Event as MPEvent
from pathlib import Path
from typing import TypeVar, cast

from aiohttp import web

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
_T = TypeVar("_T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class _Place:
    """Where and how a benchmark process runs: its CPU, its event loop and its priority."""

    cpu: int | None
    loop: str = "serving"  # a key of LOOPS
    realtime: bool = False  # SCHED_FIFO: no other process on the core delays a wake-up

    def enter(self) -> None:
        """Pin this process to its CPU, lift the descriptor limit, set the priority."""
        if self.cpu is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {self.cpu})
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if self.realtime:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))

    def run(self, main: Coroutine[object, object, _T]) -> _T:
        """Run ``main`` on this place's event loop."""
        with asyncio.Runner(loop_factory=LOOPS[self.loop]) as runner:
            return runner.run(main)


def _uvloop() -> asyncio.AbstractEventLoop:
    import uvloop  # not a ratelab dependency: `pip install uvloop` to measure it

    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def _serving_loop() -> asyncio.AbstractEventLoop:
    import importlib

    try:
        module = importlib.import_module("simulator.loop")
    except ImportError:  # a checkout from before simulator/loop.py (a "before" run)
        module = importlib.import_module("simulator.server")
    loop: asyncio.AbstractEventLoop = module.new_event_loop()
    return loop


#: the event loops servers and load generator can run on (``--loop``)
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "serving": _serving_loop,  # ratelab serve's: simulator.loop.new_event_loop
    "default": asyncio.new_event_loop,
    "uvloop": _uvloop,
}


def _sim_config(ttft_ms: float) -> SimulatorConfig:
    from simulator.model.config import apply_overrides, default_config

    # Limits and billing stay on (computed, headers rendered) but never bind.
    return apply_overrides(
        default_config(), rpm=10**9, tpm=10**12, balance_usd=1e12, ttft_ms=ttft_ms,
        itl_ms=0.0, seed=1,
    )


# -- server processes ------------------------------------------------------------------


class _Timing:
    """Served latency as the server sees it: from the handler's start (aiohttp has parsed
    the request) to the reply's last byte handed to the kernel, for every 200. An aiohttp
    middleware writes the reply itself, as aiohttp would right after the handler returns.
    Times are ``time.monotonic()``, one clock for every process on the machine."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.monotonic()
        resp = await handler(request)
        if resp.status == 200:
            await resp.prepare(request)
            await resp.write_eof()
            self.samples.append((start, time.monotonic()))
        return resp


async def _report(ready: MPQueue, port: int, timing: _Timing | None, dump: MPEvent,
                  out: MPQueue) -> None:
    """Tell the parent the port, then serve until it asks for the server-side samples."""
    ready.put(port)
    await asyncio.get_running_loop().run_in_executor(None, dump.wait)
    out.put(timing.samples if timing is not None else [])
    await asyncio.Event().wait()


async def _start_sim(ttft_ms: float, tune_gc: bool, timed: bool) -> tuple[int, _Timing | None]:
    """Start the simulator (``ratelab serve``'s default provider) on the running loop."""
    from simulator import server as shell

    timing = _Timing() if timed else None
    if timing is not None:
        build = shell.SimulatorApp.build

        def timed_build(self: shell.SimulatorApp) -> web.Application:
            app = build(self)
            app.middlewares.append(timing.middleware)
            return app

        shell.SimulatorApp.build = timed_build  # type: ignore[method-assign]
    server = await shell.start_server(_sim_config(ttft_ms), tune_gc=tune_gc)
    return server.port, timing


async def _start_replay(tune_gc: bool) -> int:
    """The real shell serving one real model decision over and over: the shell's own cost
    (parsing, the reply body, headers, finish bookkeeping) without the model's."""
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
    server = await shell.start_server(config, tune_gc=tune_gc)
    return server.port


async def _start_bare(body: bytes, headers: dict[str, str], sleep_s: float, tune_gc: bool,
                      timed: bool) -> tuple[int, _Timing | None]:
    """A plain aiohttp handler replaying ``body`` and ``headers`` after ``sleep_s``, with
    the simulator's serving GC settings if ``tune_gc``."""
    timing = _Timing() if timed else None

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        if sleep_s > 0:
            await asyncio.sleep(sleep_s)
        return web.Response(body=body, headers=headers)

    app = web.Application(middlewares=[timing.middleware] if timing is not None else [])
    app.router.add_post(PATH, handler)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    if tune_gc:
        from simulator import gc_tuning

        gc_tuning.tune_for_serving()
    return runner.addresses[0][1], timing


def _serve_sim(ttft_ms: float, tune_gc: bool, timed: bool, place: _Place, ready: MPQueue,
               dump: MPEvent, out: MPQueue) -> None:
    place.enter()

    async def run() -> None:
        port, timing = await _start_sim(ttft_ms, tune_gc, timed)
        await _report(ready, port, timing, dump, out)

    place.run(run())


def _serve_replay(tune_gc: bool, place: _Place, ready: MPQueue, dump: MPEvent,
                  out: MPQueue) -> None:
    place.enter()

    async def run() -> None:
        await _report(ready, await _start_replay(tune_gc), None, dump, out)

    place.run(run())


def _serve_bare(body: bytes, headers: dict[str, str], sleep_s: float, tune_gc: bool,
                timed: bool, place: _Place, ready: MPQueue, dump: MPEvent, out: MPQueue
                ) -> None:
    place.enter()

    async def run() -> None:
        port, timing = await _start_bare(body, headers, sleep_s, tune_gc, timed)
        await _report(ready, port, timing, dump, out)

    place.run(run())


@dataclass
class _Server:
    process: mp.process.BaseProcess
    port: int
    dump: MPEvent
    out: MPQueue

    def served(self) -> list[tuple[float, float]]:
        """The server-side (start, last byte written) samples so far (monotonic seconds)."""
        self.dump.set()
        samples: list[tuple[float, float]] = self.out.get(timeout=60)
        return samples

    def stop(self) -> None:
        self.process.terminate()
        self.process.join(10)


def _start(ctx: mp.context.SpawnContext, target: Callable[..., None], *args: object
           ) -> _Server:
    ready: MPQueue = ctx.Queue()
    dump, out = ctx.Event(), ctx.Queue()
    process = ctx.Process(target=target, args=(*args, ready, dump, out), daemon=True)
    process.start()
    return _Server(process, int(ready.get(timeout=60)), dump, out)


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
        # uvloop's transports are not asyncio.Transport subclasses, only alike
        self.transport = cast(asyncio.Transport, transport)
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
              place: _Place, out: MPQueue) -> None:
    place.enter()

    async def run() -> dict[str, object]:
        load = _Load(port, connections, seconds, warmup, spread)
        for _ in range(connections):
            await load.loop.create_connection(lambda: _Conn(load), "127.0.0.1", port)
        await asyncio.wait_for(load.done, seconds + warmup + spread + 60)
        return {"ok": load.ok, "total": load.total, "statuses": load.statuses,
                "seconds": seconds, "latencies": load.latencies,
                "window": (load.measure_from, load.stop_at)}

    out.put(place.run(run()))


def _load(ctx: mp.context.SpawnContext, port: int, connections: int, seconds: float,
          warmup: float, spread: float, place: _Place) -> dict[str, object]:
    out: MPQueue = ctx.Queue()
    process = ctx.Process(target=_run_load,
                          args=(port, connections, seconds, warmup, spread, place, out))
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


def _reply(ctx: mp.context.SpawnContext, place: _Place) -> tuple[bytes, dict[str, str]]:
    """Body and headers of one reply of a freshly started zero-latency simulator."""
    sim = _start(ctx, _serve_sim, 0.0, True, False, place)
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


def _places(args: argparse.Namespace) -> tuple[_Place, _Place]:
    """Where the servers and the load generator run: the first two CPUs of this process."""
    cpus: list[int | None] = [None, None]
    if hasattr(os, "sched_getaffinity"):
        mine = sorted(os.sched_getaffinity(0))
        cpus = [mine[0], mine[1] if len(mine) > 1 else mine[0]]
    return (_Place(cpus[0], args.loop, args.realtime),
            _Place(cpus[1], args.loop, args.realtime))


def throughput(args: argparse.Namespace, ctx: mp.context.SpawnContext) -> float:
    """Rounds of (a) bare vs (b) simulator; prints the table, returns the median ratio.

    Two figures per server: requests per wall second, and requests per CPU second of the
    server process (its user + system time over the run). On a shared machine the second
    is the fairer one: time other processes take from the core does not count against it.
    """
    server_at, load_at = _places(args)
    body, headers = _reply(ctx, server_at)
    print(f"\n1) throughput: {args.connections} keep-alive connections, {args.seconds:g} s per "
          f"measurement, server on CPU {server_at.cpu}, load generator on CPU {load_at.cpu}; "
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
                # the same GC settings as the simulator's: a fair comparison
                server = _start(ctx, _serve_bare, body, headers, 0.0, args.tune_gc, False,
                                server_at)
            elif name == "sim":
                server = _start(ctx, _serve_sim, 0.0, args.tune_gc, False, server_at)
            else:
                server = _start(ctx, _serve_replay, args.tune_gc, server_at)
            try:
                cpu_before = _cpu_seconds(server.process.pid)
                result = _load(ctx, server.port, args.connections, args.seconds, 0.5, 0.0,
                               load_at)
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


# -- instructions per request (callgrind) -----------------------------------------------


class _Counted(asyncio.Protocol):
    """One keep-alive connection sending the request until ``_Fire`` has sent its total."""

    def __init__(self, fire: _Fire) -> None:
        self.fire = fire
        self.buf = bytearray()
        self.need = -1
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if self.fire.sent == self.fire.total:
            self.transport.close()
            return
        self.fire.sent += 1
        self.buf.clear()
        self.need = -1
        self.transport.write(self.fire.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.need < 0:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            match = _CONTENT_LENGTH.search(self.buf, 0, end + 2)
            self.need = end + 4 + (int(match.group(1)) if match else 0)
        if len(self.buf) >= self.need:
            status = int(self.buf[9:12])
            self.fire.statuses[status] = self.fire.statuses.get(status, 0) + 1
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fire.closed += 1
        if self.fire.closed == self.fire.connections and not self.fire.done.done():
            self.fire.done.set_result(None)


class _Fire:
    """Exactly ``total`` requests over ``connections`` keep-alive connections."""

    def __init__(self, port: int, total: int, connections: int) -> None:
        self.request = _Load(port, 0, 0.0, 0.0, 0.0).request
        self.total = total
        self.connections = connections
        self.sent = self.closed = 0
        self.statuses: dict[int, int] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @staticmethod
    async def run(port: int, total: int, connections: int) -> dict[int, int]:
        fire = _Fire(port, total, connections)
        loop = asyncio.get_running_loop()
        for _ in range(connections):
            await loop.create_connection(lambda: _Counted(fire), "127.0.0.1", port)
        await fire.done
        return fire.statuses


#: the servers ``--instructions`` counts, in the order of the table
_COUNTED = {"bare": "(a) bare aiohttp handler", "sim": "(b) simulator",
            "replay": "(c) shell only (one model decision replayed)"}


def _serve_for_count(kind: str, reply_file: str) -> None:
    """``--serve-for-count KIND``: one server in this process (the one callgrind watches),
    on the serving loop with the serving GC settings; prints its port, serves forever."""

    async def run() -> None:
        if kind == "bare":
            reply = json.loads(Path(reply_file).read_text())
            port, _ = await _start_bare(reply["body"].encode(), reply["headers"], 0.0, True,
                                        False)
        elif kind == "sim":
            port, _ = await _start_sim(0.0, True, False)
        else:
            port = await _start_replay(True)
        print(port, flush=True)
        await asyncio.Event().wait()

    _Place(None).run(run())


def _callgrind(*command: str) -> None:
    subprocess.run(["callgrind_control", *command], check=True, capture_output=True)


def _count_one(kind: str, reply_file: Path, workdir: Path, warmup: int, requests: int,
               connections: int) -> tuple[float, dict[int, int]]:
    """Instructions per request of one server: started under callgrind with instrumentation
    off (start-up at full speed), then on; ``warmup`` requests, counters zeroed, ``requests``
    requests, counters dumped. The load generator runs outside callgrind."""
    out = workdir / f"callgrind.{kind}"
    process = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         sys.executable, str(Path(__file__).resolve()), "--serve-for-count", kind,
         "--reply-file", str(reply_file)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        port = int(process.stdout.readline())
        pid = str(process.pid)  # valgrind runs the program in its own process
        _callgrind("--instr=on", pid)
        asyncio.run(_Fire.run(port, warmup, connections))
        _callgrind("--zero", pid)
        statuses = asyncio.run(_Fire.run(port, requests, connections))
        _callgrind("--dump", pid)
    finally:
        process.terminate()
        process.wait(30)
    dumps = sorted(workdir.glob(f"callgrind.{kind}.*"), key=lambda p: p.stat().st_mtime)
    text = dumps[-1].read_text()
    summary = re.search(r"^summary:\s*(\d+)", text, re.MULTILINE)
    if summary is None:
        raise SystemExit(f"no summary line in {dumps[-1]}")
    return int(summary.group(1)) / requests, statuses


def instructions(args: argparse.Namespace, ctx: mp.context.SpawnContext) -> None:
    """Instructions per request of (a), (b) and (c) under callgrind: the same figures on a
    loaded machine as on an idle one (other processes' load does not enter them)."""
    import tempfile

    server_at, _ = _places(args)
    body, headers = _reply(ctx, server_at)
    workdir = Path(args.keep_callgrind or tempfile.mkdtemp(prefix="bench-simulator-cg-"))
    workdir.mkdir(parents=True, exist_ok=True)
    reply_file = workdir / "reply.json"
    reply_file.write_text(json.dumps({"body": body.decode(), "headers": headers}))
    print(f"\ninstructions per request under callgrind: {args.count_requests:,} requests over "
          f"{args.connections} keep-alive connections after {args.count_warmup:,} warm-up, "
          f"server on the serving loop with the serving GC settings; output in {workdir}")
    counts: dict[str, float] = {}
    for kind, label in _COUNTED.items():
        counts[kind], statuses = _count_one(kind, reply_file, workdir, args.count_warmup,
                                            args.count_requests, args.connections)
        ratio = counts["bare"] / counts[kind]
        print(f"  {label:<46} {counts[kind]:>10,.0f} instructions/request   "
              f"(a)/this {ratio:.2f}   statuses {statuses}")
    print(f"(b) at (a)'s cost per instruction: {counts['bare'] / counts['sim']:.2f} of (a)'s "
          f"requests per CPU-second (target >= 0.50)")


def _runqueue_wait_s(pid: int | None) -> float:
    """Seconds a process has spent runnable but waiting for its CPU (Linux schedstat):
    the time other processes held the core when it had something to do."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return math.nan


@dataclass(frozen=True)
class _Errors:
    """Served minus configured latency of one round, in ms, sorted: as the load generator
    saw it (send to last byte received) and as the server did (see ``_Timing``); and the
    server's run-queue wait, ms per second of the round."""

    client: list[float]
    server: list[float]
    waited: float = math.nan

    @staticmethod
    def of(result: dict[str, object], served: list[tuple[float, float]],
           latency_s: float, waited: float = math.nan) -> _Errors:
        """The errors of the requests inside the load generator's measured window."""
        sent: list[float] = result["latencies"]  # type: ignore[assignment]
        window: tuple[float, float] = result["window"]  # type: ignore[assignment]
        start, stop = window
        # one monotonic clock for every process: the same window on both sides
        server = [w - s for s, w in served if s >= start and w <= stop]
        if not sent or not server:
            raise SystemExit(f"no successful request: statuses {result['statuses']}")
        return _Errors(sorted((x - latency_s) * 1000.0 for x in sent),
                       sorted((x - latency_s) * 1000.0 for x in server), waited)


def _pct(errors: list[float], p: int) -> float:
    return statistics.quantiles(errors, n=100, method="inclusive")[p - 1]


def _serve_and_load(ctx: mp.context.SpawnContext, args: argparse.Namespace,
                    target: Callable[..., None], *server_args: object) -> _Errors:
    server_at, load_at = _places(args)
    latency_s = args.latency_ms / 1000.0
    server = _start(ctx, target, *server_args, server_at)
    try:
        waited, started = _runqueue_wait_s(server.process.pid), time.monotonic()
        result = _load(ctx, server.port, args.inflight, args.latency_seconds, latency_s,
                       latency_s, load_at)
        waited = (_runqueue_wait_s(server.process.pid) - waited) / (time.monotonic() - started)
        served = server.served()
    finally:
        server.stop()
    return _Errors.of(result, served, latency_s, waited * 1000.0)


def scheduling(args: argparse.Namespace, ctx: mp.context.SpawnContext) -> float:
    """Served minus configured latency with ``--inflight`` requests in flight, for the
    simulator and (unless ``--skip-floor``) a bare handler sleeping as long on the same
    event loop; returns the simulator's median server-side p99 in ms."""
    server_at, _ = _places(args)
    latency_s = args.latency_ms / 1000.0
    loop = {"serving": "simulator.loop.new_event_loop", "default": "asyncio's default loop",
            "uvloop": "uvloop"}[args.loop]
    print(f"\n2) scheduling error: configured latency {args.latency_ms:g} ms (TTFT, non-stream), "
          f"{args.inflight} requests in flight (about {args.inflight / latency_s:.0f} req/s), "
          f"{args.latency_seconds:g} s measured; servers on {loop}"
          f"{', SCHED_FIFO' if args.realtime else ''}; floor = bare aiohttp handler sleeping "
          f"as long on the same loop. Served minus configured, ms: server = handler start to "
          f"last byte written, client = send to last byte received; runq = ms per second the "
          f"server process waited for its CPU while other processes held it")
    print(f"{'':>15} {'---------------- simulator ----------------':>54}   "
          f"{'------------ floor ------------':>38}")
    print(f"{'round':>5} {'requests':>9} {'server p50':>10} {'p99':>6} {'max':>6}   "
          f"{'client p50':>10} {'p99':>6} {'runq':>6}   {'server p99':>10} {'client p99':>10} "
          f"{'runq':>6}")
    body, headers = ((b"", {}) if args.skip_floor else _reply(ctx, server_at))
    sims: list[_Errors] = []
    floors: list[_Errors] = []
    for n in range(1, args.latency_rounds + 1):
        floor = ""
        if not args.skip_floor:
            floors.append(_serve_and_load(ctx, args, _serve_bare, body, headers, latency_s,
                                          args.tune_gc, True))
            f = floors[-1]
            floor = (f"   {_pct(f.server, 99):>10.2f} {_pct(f.client, 99):>10.2f} "
                     f"{f.waited:>6.1f}")
        sim = _serve_and_load(ctx, args, _serve_sim, args.latency_ms, args.tune_gc, True)
        sims.append(sim)
        print(f"{n:>5} {len(sim.client):>9} {_pct(sim.server, 50):>10.2f} "
              f"{_pct(sim.server, 99):>6.2f} {sim.server[-1]:>6.2f}   "
              f"{_pct(sim.client, 50):>10.2f} {_pct(sim.client, 99):>6.2f} "
              f"{sim.waited:>6.1f}{floor}")
    early = min(min(e.server[0] for e in sims), min(e.client[0] for e in sims))
    server_p99 = statistics.median(_pct(e.server, 99) for e in sims)
    client_p99 = statistics.median(_pct(e.client, 99) for e in sims)
    print(f"simulator median p99: server {server_p99:.2f} ms, client {client_p99:.2f} ms; "
          f"target p99 <= 2 ms (served latency, server side): "
          f"{'met' if server_p99 <= 2.0 else 'NOT met'}; earliest reply {early:+.2f} ms")
    if floors:
        f_server = statistics.median(_pct(e.server, 99) for e in floors)
        f_client = statistics.median(_pct(e.client, 99) for e in floors)
        print(f"floor (bare handler, same loop and load) median p99: server {f_server:.2f} ms, "
              f"client {f_client:.2f} ms; simulator minus floor: server "
              f"{server_p99 - f_server:+.2f} ms, client {client_p99 - f_client:+.2f} ms")
    return server_p99


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
    parser.add_argument("--loop", choices=sorted(LOOPS), default="serving",
                        help="event loop of servers and load generator: serving = ratelab "
                             "serve's (simulator.loop.new_event_loop, the default), "
                             "default = asyncio's, uvloop = uvloop's (pip install uvloop)")
    parser.add_argument("--realtime", action="store_true",
                        help="run servers and load generator at SCHED_FIFO priority (root): "
                             "what the simulator does when no other process takes its core")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per request of (a), (b), (c) under valgrind's "
                             "callgrind instead of timing them (immune to other processes)")
    parser.add_argument("--count-requests", type=int, default=2000,
                        help="requests counted per server by --instructions")
    parser.add_argument("--count-warmup", type=int, default=500,
                        help="warm-up requests before counting (--instructions)")
    parser.add_argument("--keep-callgrind", metavar="DIR",
                        help="write the callgrind files of --instructions to DIR (for "
                             "callgrind_annotate)")
    parser.add_argument("--serve-for-count", choices=sorted(_COUNTED), help=argparse.SUPPRESS)
    parser.add_argument("--reply-file", help=argparse.SUPPRESS)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args(argv)
    if args.realtime and os.geteuid() != 0:
        parser.error("--realtime needs root (SCHED_FIFO)")
    if args.serve_for_count:
        _serve_for_count(args.serve_for_count, args.reply_file)
        return 0
    ctx = mp.get_context("spawn")
    if args.instructions:
        instructions(args, ctx)
        return 0
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
