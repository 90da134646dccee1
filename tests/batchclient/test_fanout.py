"""Fan-out sends one input to N models at once; routing sends easy items to a cheap model."""

from __future__ import annotations

import asyncio
import random

from batchclient.fanout import fan_out
from batchclient.policy.engine import Engine
from batchclient.policy.wire import Call, Item, Response
from batchclient.transport import FunctionTransport
from tests.batchclient.bc_fakes import FakeProvider, config, drive, task


async def test_fan_out_has_every_model_in_flight_at_once() -> None:
    in_flight = 0
    peak = 0

    async def answer(call: Call) -> Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        return Response(200, {}, call.model)

    transport = FunctionTransport(answer)
    targets = [("p", "model-a"), ("p", "model-b"), ("q", "model-c")]
    out = await fan_out(transport, targets, [{"role": "user", "content": "hi"}], 8)
    assert peak == 3
    assert {k: r.body for k, r in out.items()} == {t: t[1] for t in targets}


def test_routing_sends_short_items_to_the_cheap_model_with_its_own_cost() -> None:
    cfg = config(routing=[{"model": "cheap", "max_item_tokens": 5}])
    engine = Engine(task(), cfg, random.Random(1))
    engine.add_items([Item("1", "short"), Item("2", "a much longer item text here"),
                      Item("3", "tiny")])
    engine.end_of_items()
    fake = FakeProvider()
    done, _, results = drive(engine, fake)
    assert done.status == 0
    assert {r.item_id: r.model for r in results.values()} == {"1": "cheap", "2": "m1",
                                                              "3": "cheap"}
    assert set(engine.cost.by_model) == {"cheap", "m1"}
    assert engine.counts.requests == 2
