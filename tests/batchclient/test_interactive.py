"""Interactive chats through a running job's lane, against the real simulator (loopback)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from batchclient import (
    AiohttpTransport,
    Call,
    Event,
    InteractiveClient,
    LanePolicy,
    Response,
    Runner,
    SqliteJobStore,
    Tier,
    UserLimited,
    UserLimits,
)
from batchclient.policy.classify import Verdict
from simulator.server import serve_in_thread
from tests.batchclient.test_client_live import (
    TASK,
    assert_all_correct,
    client,
    make_items,
    provider,
    sim,
)

HELLO = [{"role": "user", "content": "Where is my parcel?"}]


class Recording:
    """The aiohttp transport, noting the order in which calls go out."""

    def __init__(self, inner: AiohttpTransport) -> None:
        self.inner = inner
        self.sent: list[Call] = []

    async def send(self, call: Call) -> Response:
        self.sent.append(call)
        return await self.inner.send(call)

    async def list_models(self, provider: str) -> set[str] | None:
        return await self.inner.list_models(provider)


async def test_chats_jump_the_background_backlog_stream_and_respect_user_limits(
        tmp_path: Path) -> None:
    slow = provider(latency={"ttft_s": 1.0, "itl_s": 0.01})
    with serve_in_thread(sim(slow, time_scale=50.0)) as server:
        cfg = client(server, ["main"], time_scale=50.0, concurrency={"limit": 3},
                     batch={"max_items": 5})
        store = SqliteJobStore(str(tmp_path / "job.sqlite"))
        items = make_items(300)
        store.import_items(items)
        transport = Recording(AiohttpTransport(cfg.providers, cfg.stream))
        events: list[Event] = []
        runner = Runner(TASK, cfg, transport, store, on_event=events.append,
                        user_limits=UserLimits({"free": Tier(rpm=2, tokens_per_day=None)}),
                        lanes=LanePolicy(reserved_slots=1, background_ceiling=0.9))
        chats = InteractiveClient(runner)
        job = asyncio.ensure_future(runner.run())
        try:
            while len(transport.sent) < 6:  # the background job is under way
                await asyncio.sleep(0.01)
            replies = []
            for user, stream in (("alice", True), ("alice", False), ("bob", True)):
                replies.append(await chats.chat(user, HELLO, 16, stream=stream))
            with pytest.raises(UserLimited, match="requests per minute"):
                await chats.chat("alice", HELLO, 16)
            result = await job
        finally:
            await transport.inner.close()
    assert [r.verdict for r in replies] == [Verdict.OK] * 3
    assert all(r.text is not None for r in replies)
    # each chat was the very next request sent, ahead of the whole background backlog
    # Call ids count decisions: a chat's id is taken when it is submitted. Each chat went
    # out ahead of every background batch decided after it arrived (the whole backlog).
    chat_ids = [c.call_id for c in transport.sent if c.lane == "interactive"]
    assert len(chat_ids) == 3
    for chat_id in chat_ids:
        at = next(i for i, c in enumerate(transport.sent) if c.call_id == chat_id)
        assert all(c.call_id < chat_id for c in transport.sent[:at])
    assert all(c.lane == "background" for c in transport.sent[at + 1:])
    assert (result.exit_status, result.done) == (0, 300)
    assert_all_correct(store, items)
    chat_events = [e for e in events if e.kind == "request" and e.lane == "interactive"]
    assert len(chat_events) == 3
    assert [e.ttft_ms is not None for e in chat_events] == [True, False, True]
    assert all(e.ttft_ms is None or 0 < e.ttft_ms <= e.response_time_ms for e in chat_events)


async def test_an_outage_of_the_primary_never_reaches_users(tmp_path: Path) -> None:
    primary = provider("primary", faults={"outages": [{"start_s": 0, "end_s": 10_000,
                                                       "status": 503}]})
    with serve_in_thread(sim(primary, provider("fallback"), time_scale=50.0)) as server:
        cfg = client(server, ["primary", "fallback"], time_scale=50.0,
                     breaker={"failures": 2, "cooldown_s": 5_000})
        store = SqliteJobStore(str(tmp_path / "chat.sqlite"))
        transport = AiohttpTransport(cfg.providers, cfg.stream)
        events: list[Event] = []
        runner = Runner(TASK, cfg, transport, store, on_event=events.append, keep_open=True)
        chats = InteractiveClient(runner)
        job = asyncio.ensure_future(runner.run())
        try:
            replies = [await chats.chat(f"user{i}", HELLO, 16) for i in range(5)]
            runner.stop()
            await job
        finally:
            await transport.close()
    assert [r.verdict for r in replies] == [Verdict.OK] * 5
    served = [(e.provider, e.status) for e in events if e.kind == "request"]
    # the first two chats meet the outage and go straight on to the fallback; then the
    # primary's breaker is open and the rest go to the fallback first
    assert served == [("primary", 503), ("fallback", 200)] * 2 + [("fallback", 200)] * 3
