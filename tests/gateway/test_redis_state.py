"""The Redis state against a real redis-server: the Lua scripts agree with the pure
decisions to the token, a 429's hold reaches every process, leases re-queue a dead
worker's task, finish is once only."""

from __future__ import annotations

from gateway.config import Upstream
from gateway.limits import admit_user, full_buckets
from gateway.pacing import PacedCall, UpstreamPacer, throttle_settings
from gateway.redis_state import RedisState, connect
from gateway.state import TaskRecord
from tests.gateway.test_limits import TIERS, seeded_sequence, tier_of


async def test_lua_buckets_match_pure_decisions(redis_server) -> None:
    state = RedisState(connect(redis_server.url), prefix="t1:")
    pure: dict[str, object] = {}
    try:
        for now, user, tokens in seeded_sequence(11, 1500):
            tier = TIERS[tier_of(user)]
            bucket = pure.setdefault(user, full_buckets(tier, now))
            expected = admit_user(bucket, tier, now, tokens)  # type: ignore[arg-type]
            got = await state.admit(user, tier, now, tokens)
            assert (got.allowed, got.limit) == (expected.allowed, expected.limit)
            assert abs(got.retry_in_s - expected.retry_in_s) < 1e-6
    finally:
        await state.close()


async def test_a_hold_shuts_the_upstream_for_every_process(redis_server) -> None:
    up = Upstream("a", "http://127.0.0.1:9/v1", "sk", rpm=50, tpm=20_000)
    one = RedisState(connect(redis_server.url), prefix="t2:")
    other = RedisState(connect(redis_server.url), prefix="t2:")
    windows = [state.window(UpstreamPacer(up, throttle_settings(0.0), 4, 1.0))
               for state in (one, other)]
    call = PacedCall(1, "m", 90, 10, 10)
    try:
        assert await windows[1].acquire(0.0, call) == 0.0
        await windows[0].hold(10.0)
        await windows[0].hold(4.0)  # an earlier hold does not shorten it
        # the other process's pacer never saw the 429: the shared hold stops it
        assert await windows[1].acquire(2.5, call) == 7.5
        assert windows[1].pacer.throttle("m").used_tokens == 100  # not reserved
        assert await windows[1].acquire(10.0, PacedCall(2, "m", 90, 10, 10)) == 0.0
    finally:
        await one.close()
        await other.close()


async def test_queue_lease_expiry_and_single_finish(redis_server) -> None:
    state = RedisState(connect(redis_server.url), prefix="t3:")
    try:
        tasks = [TaskRecord(TaskRecord.new_id(), "u", "free", lane, lane, {"n": i}, 10, 0.0)
                 for i, lane in enumerate(["background", "background", "interactive"])]
        for t in tasks:
            await state.put(t)
        assert (await state.depths())["background"] == 2
        first = await state.claim(("interactive", "background"), 1.0, lease_s=5.0)
        assert [t.id for t in first] == [tasks[2].id]  # interactive jumps the queue
        second = await state.claim(("interactive", "background"), 1.0, lease_s=5.0)
        assert [t.id for t in second] == [tasks[0].id]
        # The worker holding tasks[0] dies: after its lease the task is claimed again.
        again = await state.claim(("background",), 7.0, lease_s=5.0)
        assert [(t.id, t.attempts) for t in again] == [(tasks[0].id, 2)]
        done = again[0]
        done.state, done.result = "done", {"ok": True}
        assert await state.finish(done, 8.0) is True
        assert await state.finish(done, 8.0) is False     # never stored twice
        stored = await state.get(done.id)
        assert stored is not None and (stored.state, stored.result) == ("done", {"ok": True})
        # An expired lease of a finished task does not bring it back.
        assert [t.id for t in await state.claim(("background",), 20.0, 5.0)] == [tasks[1].id]
        # Every other lease has expired by 30: both come back, interactive first.
        rest = [*await state.claim(("interactive", "background"), 30.0, 5.0),
                *await state.claim(("interactive", "background"), 30.0, 5.0)]
        assert [(t.id, t.attempts) for t in rest] == [(tasks[2].id, 2), (tasks[1].id, 2)]
        for t in rest:
            t.state = "done"
            assert await state.finish(t, 31.0)
        assert await state.claim(("background", "interactive"), 100.0, 5.0) == []
        assert await state.get("task_missing") is None
    finally:
        await state.close()
