"""Connection faults executed over real HTTP at their configured rates (seeded, within a
binomial tolerance), each surfacing to a client the way the real failure would."""

from __future__ import annotations

import asyncio
import json
import math
from collections import Counter
from collections.abc import Awaitable, Callable

import aiohttp

from simulator.model.config import parse_config
from simulator.server import RunningServer

Start = Callable[..., Awaitable[RunningServer]]
N = 400
RATES = {"reset": 0.10, "error": 0.10, "500": 0.05, "503": 0.05}


def _within(count: int, n: int, rate: float) -> bool:
    """Inside four standard deviations of the binomial mean."""
    sd = math.sqrt(n * rate * (1 - rate))
    return abs(count - n * rate) <= 4 * sd


async def _one(session: aiohttp.ClientSession, url: str) -> str:
    body = {"model": "gpt-4o-mini", "max_tokens": 16, "stream": True,
            "messages": [{"role": "user", "content": "go"}]}
    try:
        async with session.post(url, json=body,
                                headers={"Authorization": "Bearer sk-ratelab"}) as resp:
            if resp.status != 200:
                return str(resp.status)
            raw = (await resp.read()).decode()
    except aiohttp.ClientError:
        return "reset"
    frames = [f.removeprefix("data: ") for f in raw.split("\n\n") if f]
    if frames[-1] == "[DONE]":
        return "ok"
    last = json.loads(frames[-1])
    assert last["choices"][0]["finish_reason"] == "error"
    return "error"


async def test_connection_faults_happen_at_their_rates(sim_server: Start) -> None:
    cfg = parse_config({"providers": [{
        "name": "default", "keys": {"sk-ratelab": {}}, "models": {"gpt-4o-mini": {}},
        "responder": {"kind": "lorem", "output_tokens": 16},
        "faults": {"reset_rate": RATES["reset"], "mid_stream_error_rate": RATES["error"],
                   "error_500_rate": RATES["500"], "error_503_rate": RATES["503"]},
    }], "seed": 11}, "<test>")
    server = await sim_server(cfg)
    url = server.base_url() + "/chat/completions"
    connector = aiohttp.TCPConnector(limit=16)
    async with aiohttp.ClientSession(connector=connector) as session:
        outcomes = Counter(await asyncio.gather(*(_one(session, url) for _ in range(N))))
    assert set(outcomes) <= {"ok", *RATES}, outcomes
    # 5xx are drawn first, on every request; stream faults only on the admitted ones
    admitted = N - outcomes["500"] - outcomes["503"]
    for name in ("500", "503"):
        assert _within(outcomes[name], N, RATES[name]), outcomes
    for name in ("reset", "error"):
        assert _within(outcomes[name], admitted, RATES[name]), outcomes
    stats = server.providers["default"].stats()
    assert stats["in_flight"] == 0  # every faulted reply was finished
