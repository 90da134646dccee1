"""Shared fixtures: the real simulator on an ephemeral loopback port."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from simulator.model.config import SimulatorConfig, apply_overrides, default_config
from simulator.server import RunningServer, serve_in_thread, start_server


def sim_config(config: SimulatorConfig | None = None, **overrides: Any) -> SimulatorConfig:
    """``config`` (default: the built-in provider) with ``ratelab serve``-style overrides."""
    cfg = config if config is not None else default_config()
    return apply_overrides(cfg, **overrides) if overrides else cfg


@pytest.fixture
async def sim_server() -> AsyncIterator[Callable[..., Awaitable[RunningServer]]]:
    """Factory: ``await sim_server(config=None, **overrides)`` starts the simulator on the
    test's event loop on a free loopback port; every server started is closed after."""
    servers: list[RunningServer] = []

    async def start(config: SimulatorConfig | None = None, **overrides: Any) -> RunningServer:
        server = await start_server(sim_config(config, **overrides))
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
def sim_thread() -> Iterator[Callable[..., RunningServer]]:
    """Factory for sync tests: ``sim_thread(config=None, **overrides)`` runs the simulator
    on its own loop in a background thread; every server started is stopped after."""
    with ExitStack() as stack:

        def start(config: SimulatorConfig | None = None, **overrides: Any) -> RunningServer:
            return stack.enter_context(serve_in_thread(sim_config(config, **overrides)))

        yield start
