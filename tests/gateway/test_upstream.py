"""Streamed upstream calls: the client's watchdog (a late first token, a repetition loop)
cancels the stream and the call is retried elsewhere; a stream that breaks after its first
tokens restarts, so a subscriber's tokens are those of the attempt that finished."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import aiohttp
import yaml

from batchclient.config import StreamSettings
from gateway.server import RunningGateway
from simulator.model.config import DEFAULT_PROVIDER_YAML
from simulator.model.config import parse_config as sim_parse
from simulator.server import RunningServer
from tests.gateway.conftest import gateway_config, sse_events
from tests.gateway.test_shared import statuses

SCALE = 20


def faulty(faults: dict[str, object], seed: int, output_tokens: int = 40) -> Any:
    """The built-in provider with ``faults`` and lorem replies of ``output_tokens``."""
    provider = yaml.safe_load(DEFAULT_PROVIDER_YAML)
    provider["faults"] = faults
    provider["responder"] = {"kind": "lorem", "output_tokens": output_tokens}
    return sim_parse({"providers": [provider], "time_scale": SCALE, "seed": seed}, "<test>")


def completion_tokens(sim: RunningServer) -> int:
    stats = next(iter(sim.providers.values())).stats()
    return int(stats["keys"]["sk-ratelab"]["models"]["gpt-4o-mini"]["completion_tokens"])


def streamed_text(events: list[tuple[str, dict[str, Any]]]) -> tuple[str, int]:
    """The text a subscriber keeps (the tokens after the last ``restart``) and how many
    restarts it saw."""
    kept: list[str] = []
    restarts = 0
    for kind, data in events:
        if kind == "restart":
            kept.clear()
            restarts += 1
        elif kind == "token":
            kept.append(data["token"])
    return "".join(kept), restarts


async def run_streamed(gw: RunningGateway, body: dict[str, Any]
                       ) -> tuple[dict[str, Any], str, int, float]:
    """Enqueue one streaming task and follow its SSE to the end: the final state event,
    the text kept, the restarts seen, and the task's virtual seconds from accepted to done."""
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{gw.url}/v1/tasks", json={**body, "stream": True,
                                                       "lane": "interactive"}) as r:
            assert r.status == 202, await r.text()
            task_id = (await r.json())["id"]
        events = await sse_events(s, f"{gw.url}/v1/tasks/{task_id}/events")
    final = next(e for k, e in events if k == "state" and e["state"] in (
        "done", "failed", "dead_lettered"))
    text, restarts = streamed_text(events)
    task = await gw.store.get(task_id)
    assert task is not None
    return final, text, restarts, task.updated - task.created


def two_upstreams(bad: RunningServer, good: RunningServer, **changes: Any) -> Any:
    """A gateway config with ``bad`` first in failover order, then ``good``."""
    base = gateway_config(bad, time_scale=SCALE, **changes)
    return replace(base, upstreams=(replace(base.upstream, name="bad"),
                                    replace(base.upstream, name="good",
                                            base_url=good.base_url())))


async def test_a_late_first_token_is_cancelled_at_the_deadline_and_failed_over(
        sim_server, gateway) -> None:
    # the first upstream holds every first token 30 virtual seconds
    slow = await sim_server(faulty({"slow_first_token_rate": 1.0, "slow_first_token_s": 30},
                                   seed=1), ttft_ms=50, itl_ms=2)
    good = await sim_server(time_scale=SCALE, ttft_ms=50, itl_ms=2, seed=2)
    cfg = two_upstreams(slow, good)
    gw = await gateway(cfg)
    final, text, restarts, took = await run_streamed(gw, {"user": "bench", "messages": [
        {"role": "user", "content": "hi"}], "max_tokens": 16})
    assert final["state"] == "done"
    assert text == final["result"]["choices"][0]["message"]["content"] and restarts == 0
    # cut at 5 virtual seconds, not waited out for 30: then the second upstream answered
    # at once (its first token in 0.05 s, 16 tokens 2 ms apart)
    assert 5.0 <= took < 20.0, took
    by = gw.metrics.snapshot(None)["upstream_calls_by_upstream"]
    assert by == {"bad": {"0": 1}, "good": {"200": 1}}
    assert statuses(slow) == {"200": 1}
    assert cfg.stream == StreamSettings(enabled=True, first_token_s=5.0)  # the client's
