"""Gateway figures: enqueue throughput of one gateway process (SQLite, then Redis), and
interactive time-to-result under a background flood, with and without lanes.

Enqueue: the gateway runs as its own process (``ratelab gateway``), the load comes from
a separate process (aiohttp, ``CONCURRENCY`` requests in flight on keep-alive
connections) for ``SECONDS``; the upstream simulator answers after a minute so workers
stay parked and the figure is what the HTTP front and the state accept. Lanes: one
simulator (time_scale 10) behind one gateway with 8 workers; 1,500 background tasks are
queued at once, then 50 interactive tasks arrive at 10 per wall second; each interactive
task's time to result is read from its SSE stream.

    .venv/bin/python benchmarks/bench_gateway.py [--seconds 5] [--skip-redis]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import LaneSettings, TierLimits, default_config  # noqa: E402
from gateway.server import start_gateway  # noqa: E402
from simulator.model.config import apply_overrides  # noqa: E402
from simulator.model.config import default_config as sim_default  # noqa: E402
from simulator.server import serve_in_thread, start_server  # noqa: E402

CONCURRENCY = 64
BODY = {"user": "load", "lane": "background",
        "messages": [{"role": "user", "content": "Summarise the ticket in one line."}],
        "max_tokens": 32}
GATEWAY_YAML = """
upstreams: [{{name: sim, base_url: "{url}", api_key: sk-ratelab}}]
tiers: {{unlimited: {{rpm: null, tokens_per_day: null}}}}
default_tier: unlimited
workers: 2
lanes: {{reserved_workers: 1}}
"""


# ------------------------------------------------------------------ enqueue throughput

def _load(url: str, seconds: float, out: mp.Queue) -> None:
    async def run() -> tuple[int, int, float]:
        ok = bad = 0
        connector = aiohttp.TCPConnector(limit=CONCURRENCY)
        async with aiohttp.ClientSession(connector=connector) as s:
            stop = time.monotonic() + seconds

            async def one() -> None:
                nonlocal ok, bad
                while time.monotonic() < stop:
                    async with s.post(f"{url}/v1/tasks", json=BODY) as r:
                        await r.read()
                        if r.status == 202:
                            ok += 1
                        else:
                            bad += 1
            start = time.monotonic()
            await asyncio.gather(*[one() for _ in range(CONCURRENCY)])
            return ok, bad, time.monotonic() - start
    out.put(asyncio.run(run()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def enqueue_throughput(seconds: float, folder: Path, sim_url: str,
                       redis_url: str | None) -> tuple[float, int]:
    """Accepted tasks per second of one gateway process; (rate, refused)."""
    cfg = folder / "gw.yaml"
    cfg.write_text(GATEWAY_YAML.format(url=sim_url))
    db = folder / f"gw-{time.monotonic_ns()}.db"
    cmd = [sys.executable, "-m", "loadtests.cli", "gateway", "--config", str(cfg), "--port",
           "0", "--db", str(db)]
    if redis_url:
        cmd += ["--redis", redis_url]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[3]
        warm: mp.Queue = mp.Queue()
        _load(url, 0.5, warm)
        out: mp.Queue = mp.Queue()
        loader = mp.Process(target=_load, args=(url, seconds, out))
        loader.start()
        ok, bad, span = out.get(timeout=seconds + 60)
        loader.join()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    return ok / span, bad


# ------------------------------------------------------------------ lanes

async def _time_to_result(s: aiohttp.ClientSession, url: str, task_id: str) -> float:
    async with s.get(f"{url}/v1/tasks/{task_id}/events") as r:
        async for raw in r.content:
            if raw.startswith(b"event: end"):
                break
    return time.monotonic()


async def lanes_run(lanes: bool, folder: Path) -> dict[str, float]:
    """Interactive time to result (wall s) under a 1,500-task background flood."""
    k = 10.0
    sim = await start_server(apply_overrides(sim_default(), time_scale=k, seed=7))
    cfg = default_config(
        sim.base_url(), tiers={"unlimited": TierLimits(rpm=None, tokens_per_day=None)},
        default_tier="unlimited", workers=8, time_scale=k,
        lanes=LaneSettings(interactive_p95_budget_s=2.0, reserved_workers=2, enabled=lanes))
    gw = await start_gateway(cfg, db_path=str(folder / f"lanes-{lanes}.db"))
    latencies: list[float] = []
    try:
        async with aiohttp.ClientSession() as s:
            flood = [s.post(f"{gw.url}/v1/tasks", json=BODY) for _ in range(1500)]
            for resp in await asyncio.gather(*flood):
                resp.release()

            async def interactive() -> None:
                sent = time.monotonic()
                async with s.post(f"{gw.url}/v1/tasks",
                                  json={**BODY, "lane": "interactive", "user": "u"}) as r:
                    task_id = (await r.json())["id"]
                latencies.append(await _time_to_result(s, gw.url, task_id) - sent)

            waiters = []
            for _ in range(50):
                waiters.append(asyncio.create_task(interactive()))
                await asyncio.sleep(0.1)
            await asyncio.gather(*waiters)
    finally:
        await gw.close()
        await sim.close()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50": statistics.median(latencies), "p95": q[94], "max": max(latencies),
            "budget": cfg.lanes.interactive_p95_budget_s / k, "k": k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--skip-redis", action="store_true")
    args = parser.parse_args()
    redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        slow = apply_overrides(sim_default(), ttft_ms=60_000)
        with serve_in_thread(slow) as sim:
            rate, refused = enqueue_throughput(args.seconds, folder, sim.base_url(), None)
            print(f"enqueue, in-process (SQLite WAL): {rate:,.0f} tasks/s accepted "
                  f"({refused} refused; target >= 3,000)")
            if not args.skip_redis and Path(redis_bin).exists():
                port = _free_port()
                redis = subprocess.Popen(
                    [redis_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                     "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL)
                time.sleep(0.3)
                try:
                    rate, refused = enqueue_throughput(args.seconds, folder, sim.base_url(),
                                                       f"redis://127.0.0.1:{port}/0")
                finally:
                    redis.terminate()
                    redis.wait(timeout=10)
                print(f"enqueue, Redis: {rate:,.0f} tasks/s accepted "
                      f"({refused} refused; target >= 1,500)")
        print("\ninteractive time to result under a 1,500-task background flood "
              "(8 workers, time_scale 10; wall seconds, virtual = x10):")
        print("| lanes | p50 | p95 | max | p95 budget |")
        print("|---|---|---|---|---|")
        for lanes in (True, False):
            r = asyncio.run(lanes_run(lanes, folder))
            print(f"| {'on' if lanes else 'off'} | {r['p50']:.3f} | {r['p95']:.3f} | "
                  f"{r['max']:.3f} | {r['budget']:.3f} "
                  f"({'met' if r['p95'] <= r['budget'] else 'missed'}) |")


if __name__ == "__main__":
    main()
