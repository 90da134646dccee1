"""The gateway of a ``ratelab run`` with a ``gateway:`` section: start, sample, drain, collect.

In-process (default) the gateway runs on its own loop in a thread of the parent, its SQLite
store in the run folder. With ``redis: true`` a real ``redis-server`` is started on a free
loopback port (no persistence, its files in the run folder) and ``processes`` gateway
subprocesses (``ratelab gateway --redis``) share it. A sampler thread reads the queue depths
(``/metrics?format=json``) and the provider's counters (admin stats) every quarter second;
after Locust exits the parent waits for accepted tasks to finish, reads the gateway's task
records and computes the ``gateway`` figures of summary.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.config import GatewayConfig, parse_config
from gateway.state import TaskRecord
from loadtests.gateway_figures import Admitted, depth_rows, gateway_figures
from loadtests.run_setup import arm_model, provider_entries
from loadtests.rundir import SLOTS_FILE, SlotClaims
from loadtests.scenario_gateway import GATEWAY_FILE, TASKS_GLOB, GatewaySection, gateway_mapping
from loadtests.scenario_model import Arm, Scenario

SAMPLE_S = 0.25          # wall seconds between samples
DEPTH_FILE = "gateway_timeseries.csv"   # in the run folder: queue depth per lane and queue
DRAIN_S = 20.0           # wall seconds to wait for accepted tasks after Locust exits
START_S = 20.0           # wall seconds for redis-server and gateways to answer
KEY_ENV = "RATELAB_GATEWAY_API_KEY"
REDIS_PREFIX = "ratelab:gw:"
Fetch = Callable[[Sequence[str]], dict[str, TaskRecord]]


class GatewayStartError(RuntimeError):
    """redis-server or a gateway process did not start (names the log to read)."""


def free_port() -> int:
    """A free loopback TCP port (closed again: the caller binds it at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, headers: Mapping[str, str] | None = None, timeout: float = 2.0) -> Any:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


class Sampler(threading.Thread):
    """Reads queue depths and the provider's request counts every ``SAMPLE_S`` wall seconds."""

    def __init__(self, gateway_url: str, stats_url: str | None, admin_token: str,
                 key: str) -> None:
        super().__init__(name="ratelab-gateway-sampler", daemon=True)
        self.gateway_url = gateway_url
        self.stats_url = stats_url
        self.admin_token = admin_token
        self.key = key
        self.depths: list[tuple[float, dict[str, int]]] = []
        self.provider: list[tuple[float, int, int]] = []   # (monotonic, requests, 429s)
        self.last_stats: dict[str, Any] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_S):
            self.sample()

    def sample(self) -> None:
        """One reading of both (a failed reading is skipped, not fatal)."""
        now = time.monotonic()
        with contextlib.suppress(OSError, ValueError):
            metrics = _get_json(f"{self.gateway_url}/metrics?format=json")
            self.depths.append((now, dict(metrics.get("queue_depth") or {})))
        if self.stats_url is None:
            return
        with contextlib.suppress(OSError, ValueError):
            stats = _get_json(self.stats_url, {"Authorization": f"Bearer {self.admin_token}"})
            self.last_stats = stats
            models = stats.get("keys", {}).get(self.key, {}).get("models", {})
            total = sum(int(n) for m in models.values() for n in m["requests"].values())
            refused = sum(int(m["requests"].get("429", 0)) for m in models.values())
            self.provider.append((now, total, refused))

    def stop(self) -> None:
        """Stop and take a last sample."""
        self._halt.set()
        self.join(timeout=5)
        self.sample()


@dataclass(slots=True)
class GatewayRun:
    """A started gateway setup: its URLs and how to read its task records."""

    section: GatewaySection
    config: GatewayConfig
    urls: list[str]
    backend: str
    fetch: Fetch
    sampler: Sampler
    provider_name: str
    time_scale: float
    extra: dict[str, Any] = field(default_factory=dict)

    def finish(self, run_dir: Path) -> dict[str, Any]:
        """Wait for accepted tasks to finish (``DRAIN_S`` at most), then the figures."""
        lines = read_task_lines(run_dir)
        ids = [str(x["id"]) for x in lines if x["status"] == 202 and x.get("id")]
        records = drain(self.fetch, ids)
        self.sampler.stop()
        origin = _origin(run_dir, self.sampler)
        k = self.time_scale
        # from the run's start (the sampler starts before Locust does)
        depths = [((t - origin) * k, d) for t, d in self.sampler.depths if t >= origin]
        admitted = [Admitted(r.id, r.user, r.tier, r.lane, r.tokens, r.created, r.updated,
                             r.state) for r in records.values()]
        job = self.section.background.user if self.section.background else None
        figures = gateway_figures(lines, admitted, self.config, depths=depths,
                                  provider=self.provider_figures(origin), backend=self.backend,
                                  processes=len(self.urls), job_user=job)
        write_rows(depth_rows(figures["queue_depth"]), run_dir / DEPTH_FILE)
        return figures

    def provider_figures(self, origin: float) -> dict[str, Any]:
        """What the provider saw: requests by status, 429s, the busiest 60 s (sampled),
        and what it charged the gateway's key (USD; None when its stats give no figure)."""
        up = self.config.upstream
        samples = [((t - origin) * self.time_scale, n, r) for t, n, r in self.sampler.provider]
        busiest = 0
        for i, (t, n, _) in enumerate(samples):
            # the latest sample at least 60 s earlier: a window >= 60 s, never an undercount
            before = [m for s, m, _ in samples[:i] if s <= t - 60.0]
            busiest = max(busiest, n - (before[-1] if before else 0))
        stats = self.sampler.last_stats
        key = stats.get("keys", {}).get(up.api_key, {})
        requests: dict[str, int] = {}
        for m in key.get("models", {}).values():
            for status, n in m["requests"].items():
                requests[status] = requests.get(status, 0) + int(n)
        refused = requests.get("429", 0)
        return {"name": self.provider_name, "rpm_limit": up.rpm, "tpm_limit": up.tpm,
                "requests": dict(sorted(requests.items())), "http_429": refused,
                "busiest_60s_requests": busiest, "within_limit": refused == 0,
                "spent_usd": key.get("spent_usd")}


def write_rows(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Rows as CSV, the first row's keys as the header (no rows: header ``t_s`` only)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["t_s"])
        writer.writeheader()
        writer.writerows(rows)


def read_task_lines(run_dir: Path) -> list[dict[str, Any]]:
    """Every task line the users wrote (``gateway-*.jsonl``), skipping a torn last line."""
    out = []
    for path in sorted(run_dir.glob(TASKS_GLOB)):
        for text in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(text))
    return out


def drain(fetch: Fetch, ids: Sequence[str], wait_s: float = DRAIN_S) -> dict[str, TaskRecord]:
    """The records of ``ids``, re-read until all are final or ``wait_s`` wall seconds pass."""
    records = fetch(ids)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        open_ids = [i for i in ids if i not in records or not records[i].final]
        if not open_ids:
            break
        time.sleep(0.25)
        records.update(fetch(open_ids))
    return records


def _origin(run_dir: Path, sampler: Sampler) -> float:
    """The run's virtual-time origin (monotonic; set when Locust loaded the run)."""
    claims = SlotClaims(run_dir / SLOTS_FILE)
    try:
        origin = claims.get("origin")
    finally:
        claims.close()
    if origin is not None:
        return float(origin)
    return sampler.depths[0][0] if sampler.depths else time.monotonic()


def gateway_config(scenario: Scenario, section: GatewaySection, urls: Mapping[str, str],
                   api_key_env: str | None = None) -> tuple[dict[str, Any], GatewayConfig, str]:
    """The gateway mapping and configuration for this run, and the provider's API key."""
    arm = Arm(name="gateway", strategy="interactive", providers=(section.provider,))
    model = arm_model(scenario, arm)
    entry = provider_entries(scenario, arm, urls, model)[0]
    users = max((g.user_ids for g in scenario.load.users), default=1)
    mapping = gateway_mapping(section, base_url=entry["base_url"], api_key=entry["api_key"],
                              rpm=entry.get("rpm"), tpm=entry.get("tpm"), model=model,
                              time_scale=scenario.time_scale, user_ids=users,
                              tpm_counting=entry.get("tpm_counting"))
    config = parse_config(mapping, f"{scenario.path}: gateway")
    if api_key_env is not None:
        up = mapping["upstreams"][0]
        up["api_key_env"] = api_key_env
        del up["api_key"]
    return mapping, config, str(entry["api_key"])


@contextlib.contextmanager
def serve_gateway(scenario: Scenario, urls: Mapping[str, str], admin_url: str | None,
                  admin_token: str, run_dir: Path) -> Iterator[GatewayRun | None]:
    """Start the scenario's gateway(s) in front of the served provider (None without a
    ``gateway:`` section); stops them, and Redis, on exit."""
    section = scenario.gateway
    if not isinstance(section, GatewaySection):
        yield None
        return
    stats_url = f"{admin_url}/admin/{section.provider}/stats" if admin_url else None
    if not section.redis:
        from gateway.server import serve_in_thread

        _, config, key = gateway_config(scenario, section, urls)
        with serve_in_thread(config, db_path=str(run_dir / "gateway.db")) as gw:
            loop = gw.loop

            def fetch(ids: Sequence[str]) -> dict[str, TaskRecord]:
                return asyncio.run_coroutine_threadsafe(_fetch(gw.store, ids), loop).result(60)

            yield _started(section, config, [gw.url], "sqlite", fetch, stats_url, admin_token,
                           key, scenario, run_dir)
        return
    with _redis_server(run_dir) as redis_url:
        mapping, config, key = gateway_config(scenario, section, urls, KEY_ENV)
        path = run_dir / "gateway.yaml"
        path.write_text(yaml.safe_dump(mapping, sort_keys=False), encoding="utf-8")
        with _gateway_processes(path, redis_url, section.processes, run_dir, key) as gw_urls:

            def fetch(ids: Sequence[str]) -> dict[str, TaskRecord]:
                return asyncio.run(_fetch_redis(redis_url, ids))

            yield _started(section, config, gw_urls, "redis", fetch, stats_url, admin_token,
                           key, scenario, run_dir)


def _started(section: GatewaySection, config: GatewayConfig, gw_urls: list[str], backend: str,
             fetch: Fetch, stats_url: str | None, admin_token: str, key: str,
             scenario: Scenario, run_dir: Path) -> GatewayRun:
    (run_dir / GATEWAY_FILE).write_text(json.dumps({"urls": gw_urls, "backend": backend}),
                                        encoding="utf-8")
    sampler = Sampler(gw_urls[0], stats_url, admin_token, key)
    sampler.start()
    return GatewayRun(section, config, gw_urls, backend, fetch, sampler, section.provider,
                      scenario.time_scale)


async def _fetch(store: Any, ids: Sequence[str]) -> dict[str, TaskRecord]:
    out = {}
    for task_id in ids:
        record = await store.get(task_id)
        if record is not None:
            out[task_id] = record
    return out


async def _fetch_redis(redis_url: str, ids: Sequence[str]) -> dict[str, TaskRecord]:
    from gateway.redis_state import RedisState, connect

    state = RedisState(connect(redis_url), prefix=REDIS_PREFIX)
    try:
        return await _fetch(state, ids)
    finally:
        await state.close()


@contextlib.contextmanager
def _redis_server(run_dir: Path) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port; its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise GatewayStartError("gateway.redis: redis-server is not installed "
                                "(apt-get install redis-server)")
    port = free_port()
    log = (run_dir / "redis.log").open("wb")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(run_dir)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_redis(port, proc, run_dir / "redis.log")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        _terminate([proc])
        log.close()


def _wait_redis(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GatewayStartError(f"redis-server exited with {proc.returncode}; see {log}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise GatewayStartError(f"redis-server did not answer within {START_S:g} s; see {log}")


@contextlib.contextmanager
def _gateway_processes(config_path: Path, redis_url: str, count: int, run_dir: Path,
                       key: str) -> Iterator[list[str]]:
    """``count`` ``ratelab gateway`` processes sharing ``redis_url``; their URLs."""
    env = {**os.environ, KEY_ENV: key}
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    logs = []
    try:
        for i in range(count):
            port = free_port()
            log = (run_dir / f"gateway-{i}.log").open("wb")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "loadtests.cli", "gateway", "--config", str(config_path),
                 "--port", str(port), "--redis", redis_url],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            urls.append(f"http://127.0.0.1:{port}")
        for i, (proc, url) in enumerate(zip(procs, urls, strict=True)):
            _wait_healthy(url, proc, run_dir / f"gateway-{i}.log")
        yield urls
    finally:
        _terminate(procs)
        for log in logs:
            log.close()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GatewayStartError(f"gateway exited with {proc.returncode}; see {log}")
        with contextlib.suppress(OSError, ValueError):
            if _get_json(f"{url}/healthz", timeout=0.5).get("status") == "ok":
                return
        time.sleep(0.1)
    raise GatewayStartError(f"gateway at {url} not healthy within {START_S:g} s; see {log}")


def _terminate(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGINT (gateways close cleanly), then SIGKILL what is left of each process group."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
