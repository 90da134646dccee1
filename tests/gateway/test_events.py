"""The event hub: tokens kept for late subscribers, dropped when the reply restarts."""

from __future__ import annotations

from gateway.events import EventHub


async def test_a_restart_drops_the_kept_tokens_and_reaches_subscribers() -> None:
    hub = EventHub()
    relayed: list[tuple[str, dict[str, object]]] = []
    hub.relay = lambda task_id, event: relayed.append((task_id, event))
    q = hub.subscribe("t")
    for piece in ("Hel", "lo"):
        hub.publish("t", {"token": piece})
    hub.publish("other", {"token": "x"})
    restart = {"restart": True, "reason": "reset"}
    hub.publish("t", restart)
    assert hub.tokens("t") == [] and hub.tokens("other") == [{"token": "x"}]
    hub.publish("t", {"token": "Hi"})
    assert hub.tokens("t") == [{"token": "Hi"}]
    got = [q.get_nowait() for _ in range(q.qsize())]
    assert got == [{"token": "Hel"}, {"token": "lo"}, restart, {"token": "Hi"}]
    # other processes' hubs get it too, and drop their copies the same way
    assert ("t", restart) in relayed
    there = EventHub()
    for task_id, event in relayed:
        there.deliver(task_id, event)
    assert there.tokens("t") == [{"token": "Hi"}]
