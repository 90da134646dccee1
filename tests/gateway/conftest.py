"""Gateway fixtures: a real simulator, real SQLite files, a real redis-server."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.config import GatewayConfig, TierLimits, Upstream, default_config
from gateway.server import RunningGateway, start_gateway
from simulator.server import RunningServer

REDIS_BIN = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A real redis-server on a loopback port in a tmp dir; ``stop`` saves, ``start``
    reloads the saved data (a Redis going away and coming back with its data)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS_BIN, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self, save: bool = False) -> None:
        if self.proc is None:
            return
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"SHUTDOWN SAVE\r\n" if save else b"SHUTDOWN NOSAVE\r\n")
                s.recv(16)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A running redis-server, stopped after the test; skips when the binary is missing."""
    if not Path(REDIS_BIN).exists():
        pytest.skip("redis-server binary not installed (apt-get install redis-server)")
    server = RedisProcess(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def gateway_config(sim: RunningServer, **changes: Any) -> GatewayConfig:
    """A gateway in front of ``sim`` (key sk-ratelab) with test tiers, at the
    simulator's time scale; ``changes`` replace fields."""
    cfg = default_config(
        sim.base_url(), tiers={"free": TierLimits(rpm=5, tokens_per_day=5000),
                               "pro": TierLimits(rpm=30, tokens_per_day=100_000, burst=10),
                               "unlimited": TierLimits(rpm=None, tokens_per_day=None)},
        default_tier="free", users={"pat": "pro", "bench": "unlimited"},
        workers=4, default_max_tokens=32)
    return replace(cfg, **changes) if changes else cfg


def with_upstream_limits(cfg: GatewayConfig, rpm: int | None, tpm: int | None) -> GatewayConfig:
    """``cfg`` with the gateway-enforced provider limits set."""
    up = cfg.upstream
    return replace(cfg, upstreams=(Upstream(up.name, up.base_url, up.api_key, up.models,
                                            rpm, tpm),))


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """Factory: ``await gateway(cfg, **start_kwargs)`` on the test's loop (SQLite in tmp_path
    unless ``redis_url``); every gateway still open is closed after the test."""
    started: list[RunningGateway] = []

    async def start(cfg: GatewayConfig, **kwargs: Any) -> RunningGateway:
        kwargs.setdefault("db_path", str(tmp_path / "gateway.db"))
        gw = await start_gateway(cfg, **kwargs)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await gw.close()


async def sse_events(session: aiohttp.ClientSession, url: str
                     ) -> list[tuple[str, dict[str, Any]]]:
    """Read a task's SSE stream to its end: (event kind, data) pairs."""
    events: list[tuple[str, dict[str, Any]]] = []
    async with session.get(url) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        kind = ""
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                events.append((kind, json.loads(line[5:])))
    return events
