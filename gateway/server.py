"""Start and stop a gateway: state (SQLite or Redis), worker pool, aiohttp site.

``start_gateway`` runs on the caller's event loop; ``serve_in_thread`` runs one on its
own loop in a background thread for synchronous callers (Locust users, benchmarks).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from aiohttp import web

from batchclient.transport import AiohttpTransport
from gateway.app import GatewayApp
from gateway.clock import GatewayClock
from gateway.config import GatewayConfig
from gateway.events import EventHub, Metrics
from gateway.local_state import MemoryProviderWindow, MemoryUserLimiter, SqliteTaskStore
from gateway.pacing import UpstreamPacer, throttle_settings
from gateway.redis_state import Presence, RedisState, connect
from gateway.relay import RedisEventRelay
from gateway.routing import provider_settings
from gateway.state import ItemCache, ProviderWindow, TaskStore, UserLimiter
from gateway.worker import WorkerPool

SHUTDOWN_TIMEOUT_S = 0.5


@dataclass(slots=True)
class RunningGateway:
    """A started gateway: ``url`` (``http://HOST:PORT``), its store and pool, ``close()``."""

    url: str
    host: str
    port: int
    config: GatewayConfig
    store: TaskStore
    pool: WorkerPool
    metrics: Metrics
    _runner: web.AppRunner
    _transport: AiohttpTransport
    loop: asyncio.AbstractEventLoop
    relay: RedisEventRelay | None = None
    presence: Presence | None = None
    closed: bool = False

    async def close(self) -> None:
        """Stop workers (their tasks stay leased for a later start), the site, the state;
        idempotent."""
        if self.closed:
            return
        self.closed = True
        await self.pool.close()
        await self._runner.cleanup()
        await self._transport.close()
        if self.relay is not None:
            await self.relay.close()
        if self.presence is not None:
            await self.presence.close()
        await self.store.close()


async def start_gateway(config: GatewayConfig, *, host: str = "127.0.0.1", port: int = 0,
                        redis_url: str | None = None, db_path: str | None = None,
                        workers: int | None = None, redis_prefix: str = "ratelab:gw:",
                        seed: int = 0) -> RunningGateway:
    """Start a gateway on the running loop; ``port=0`` picks a free port. Without
    ``redis_url`` tasks go to the SQLite file ``db_path`` (default ``config.db_path``)."""
    if workers is not None:
        from dataclasses import replace
        config = replace(config, workers=workers)
    clock = GatewayClock(config.time_scale)
    store: TaskStore
    limiter: UserLimiter
    windows: dict[str, ProviderWindow]
    cache: ItemCache
    hub, metrics = EventHub(), Metrics()
    relay = None
    settings = throttle_settings(config.window_margin_s)
    pacers = {u.name: UpstreamPacer(u, settings, config.workers, config.time_scale)
              for u in config.upstreams}
    if redis_url is not None:
        client = connect(redis_url)
        state = RedisState(client, prefix=redis_prefix, time_scale=config.time_scale)
        windows = {u.name: state.window(pacers[u.name]) for u in config.upstreams}
        store, cache, limiter, ping, backend = state, state, state, state.ping, "redis"
    else:
        store = cache = SqliteTaskStore(db_path or config.db_path)
        limiter = MemoryUserLimiter()
        windows = {u.name: MemoryProviderWindow(pacers[u.name]) for u in config.upstreams}
        ping, backend = None, "sqlite"
    # One keep-alive session to every upstream; calls name their upstream.
    transport = AiohttpTransport([provider_settings(u, config.time_scale)
                                  for u in config.upstreams],
                                 limit=max(16, config.workers * 2))
    pool = WorkerPool(config, store, windows, transport, clock, hub, metrics, seed=seed,
                      cache=cache)
    presence = None
    if redis_url is not None:
        relay = RedisEventRelay(client, hub, redis_prefix, pool.router, clock)
        presence = Presence(state, list(pacers.values()))
    shell = GatewayApp(config, store, limiter, clock, hub, metrics, pool.wake, backend, ping)
    runner = web.AppRunner(shell.build(), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    if relay is not None:
        await relay.start()
    if presence is not None:
        await presence.start()   # each process's part of the keys, before its first call
    site = web.TCPSite(runner, host, port)
    await site.start()
    pool.start()
    bound = runner.addresses[0][1]
    shown = f"[{host}]" if ":" in host else host
    return RunningGateway(f"http://{shown}:{bound}", host, bound, config, store, pool, metrics,
                          runner, transport, asyncio.get_running_loop(), relay, presence)


@contextmanager
def serve_in_thread(config: GatewayConfig, *, host: str = "127.0.0.1", port: int = 0,
                    redis_url: str | None = None, db_path: str | None = None,
                    workers: int | None = None, redis_prefix: str = "ratelab:gw:"
                    ) -> Iterator[RunningGateway]:
    """Run a gateway on its own event loop in a background thread, for sync callers."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="ratelab-gateway", daemon=True)
    thread.start()
    try:
        gw = asyncio.run_coroutine_threadsafe(start_gateway(
            config, host=host, port=port, redis_url=redis_url, db_path=db_path,
            workers=workers, redis_prefix=redis_prefix), loop).result(timeout=30)
        try:
            yield gw
        finally:
            asyncio.run_coroutine_threadsafe(gw.close(), loop).result(timeout=30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=30)
        loop.close()
