"""The three window algorithms and the per key+model limit state, with exact figures."""

from __future__ import annotations

import gc
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.model.config import LimitSpec
from simulator.model.limits import (
    FixedWindow,
    LimitState,
    SlidingWindow,
    TokenBucket,
    make_window,
)


def test_sliding_window_waits_for_the_oldest_entries_to_expire() -> None:
    w = SlidingWindow(3, 60.0)
    for t in (0.0, 10.0, 20.0):
        assert w.wait(t, 1) == 0.0
        w.add(t, 1)
    assert w.wait(30.0, 1) == 30.0  # the entry of t=0 leaves at t=60
    assert w.wait(30.0, 2) == 40.0  # two entries must leave
    assert w.wait(30.0, 4) == math.inf  # larger than the window can ever hold
    assert w.wait(60.0, 1) == 0.0
    assert w.reset_in(60.0) == 20.0  # the newest entry (t=20) leaves at t=80


def test_sliding_window_settles_a_live_entry_and_ignores_an_expired_one() -> None:
    w = SlidingWindow(1000, 60.0)
    handle = w.add(0.0, 600)
    w.adjust(5.0, handle, -550)
    assert w.used(5.0) == 50
    late = w.add(10.0, 100)
    assert w.used(65.0) == 100  # the first entry expired
    w.adjust(65.0, handle, 400)  # settling an expired reservation changes nothing
    assert w.used(65.0) == 100
    w.adjust(65.0, late, -100)
    assert w.used(65.0) == 0


class _ListWindow:
    """The sliding window as first written (one [time, amount, live] list per entry): the
    reference the flat-buffer SlidingWindow must match figure for figure."""

    def __init__(self, capacity: float, window_s: float):
        self.capacity, self.window_s, self.total = capacity, window_s, 0.0
        self.entries: list[list] = []

    def _expire(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - self.window_s + 1e-9:
            entry = self.entries.pop(0)
            entry[2] = False
            self.total -= entry[1]
        if not self.entries:
            self.total = 0.0

    def used(self, now: float) -> float:
        self._expire(now)
        return self.total

    def wait(self, now: float, amount: float) -> float:
        if amount > self.capacity + 1e-9:
            return math.inf
        self._expire(now)
        excess = self.total + amount - self.capacity
        if excess <= 1e-9:
            return 0.0
        freed = 0.0
        for t, a, _live in self.entries:
            freed += a
            if freed >= excess - 1e-9:
                return max(0.0, t + self.window_s - now)
        return self.window_s

    def add(self, now: float, amount: float) -> list:
        self._expire(now)
        entry = [now, float(amount), True]
        self.entries.append(entry)
        self.total += amount
        return entry

    def adjust(self, handle: list, delta: float) -> None:
        if handle[2]:
            delta = max(delta, -handle[1])
            handle[1] += delta
            self.total += delta

    def reset_in(self, now: float) -> float:
        self._expire(now)
        if not self.entries or self.total <= 1e-9:
            return 0.0
        return max(0.0, self.entries[-1][0] + self.window_s - now)


_OPS = st.lists(st.tuples(
    st.sampled_from([0.0, 0.0, 0.001, 0.25, 1.0, 7.5, 30.0]),  # time step, seconds
    st.sampled_from(["add", "adjust", "wait", "reset_in", "used"]),
    st.integers(0, 700),  # amount, or a delta of amount - 350
    st.integers(0, 10**6),  # which earlier handle to adjust
), max_size=400)


@settings(max_examples=150, deadline=None)
@given(_OPS)
def test_sliding_window_matches_the_list_reference_exactly(ops: list) -> None:
    fast, ref = SlidingWindow(1000.0, 10.0), _ListWindow(1000.0, 10.0)
    handles: list[tuple[object, list]] = []
    now = 0.0
    for step, op, amount, pick in ops:
        now += step
        if op == "add":
            handles.append((fast.add(now, amount), ref.add(now, amount)))
        elif op == "adjust" and handles:
            mine, theirs = handles[pick % len(handles)]
            fast.adjust(now, mine, amount - 350)
            ref.adjust(theirs, amount - 350)
        elif op == "wait":
            assert fast.wait(now, amount) == ref.wait(now, amount)
        elif op == "reset_in":
            assert fast.reset_in(now) == ref.reset_in(now)
        assert fast.used(now) == ref.used(now)


def test_sliding_window_keeps_no_object_per_entry() -> None:
    # A minute of traffic is two flat buffers: nothing per entry for the collector to walk.
    w = SlidingWindow(10**9, 60.0)
    for i in range(5000):
        w.adjust(i * 0.01, w.add(i * 0.01, 600), -500)
    assert w.used(50.0) == 5000 * 100
    reachable = [y for x in gc.get_referents(w) if not isinstance(x, type)
                 for y in gc.get_referents(x) if not isinstance(y, type)]
    assert reachable == []


def test_token_bucket_refills_continuously() -> None:
    b = TokenBucket(60, 60.0)  # one unit per second
    b.add(0.0, 60)
    assert b.wait(0.0, 1) == 1.0
    assert b.wait(0.5, 1) == 0.5
    assert b.used(30.0) == 30.0
    assert b.reset_in(30.0) == 30.0
    b.add(30.0, 40)  # the level goes negative: 30 - 40
    assert b.wait(30.0, 1) == 11.0
    b.adjust(30.0, None, -100)  # refunds never overfill the bucket
    assert b.used(30.0) == 0.0


def test_fixed_window_resets_on_boundaries() -> None:
    w = FixedWindow(2, 60.0)
    w.add(0.0, 1)
    gen = w.add(1.0, 1)
    assert w.wait(30.0, 1) == 30.0
    assert w.reset_in(30.0) == 30.0
    assert w.wait(60.0, 1) == 0.0
    w.adjust(60.0, gen, -1)  # a past window is not settled
    assert w.used(60.0) == 0.0


def test_sub_window_capacity_scales_the_per_minute_limit() -> None:
    assert make_window("sliding", 600, 1.0).capacity == 10  # Azure: 600 RPM = 10 per second
    assert make_window("fixed", 600, 10.0).capacity == 100
    assert make_window("token_bucket", 6, 1.0).capacity == 1  # never below one request


def test_counting_modes_reserve_what_each_reading_says() -> None:
    def reservation(counting: str, max_tokens: int | None, n: int = 1, best_of: int = 1) -> int:
        return LimitState(LimitSpec(counting=counting, tpm=10**6)).reservation(
            100, max_tokens, n, best_of)

    assert reservation("reserve", 50, n=2) == 200  # prompt + n * max_tokens (cookbook)
    assert reservation("reserve", None) == 115  # the cookbook's default of 15
    assert reservation("max_estimate", 50) == 100  # max(max_tokens, estimate)
    assert reservation("max_estimate", 500) == 500
    assert reservation("azure", 50, best_of=3) == 153  # prompt + max_tokens + best_of
    assert reservation("actual", 500) == 100


def test_reservation_refuses_what_actual_only_admits() -> None:
    reserve = LimitState(LimitSpec(tpm=1000, counting="reserve"))
    actual = LimitState(LimitSpec(tpm=1000, counting="actual"))
    for state in (reserve, actual):
        amount = state.reservation(8, 600, 1, 1)
        assert state.check(0.0, amount, 8) is None
        state.admit(0.0, amount, 8)
    denial = reserve.check(1.0, reserve.reservation(8, 600, 1, 1), 8)
    assert denial is not None
    assert (denial.limit, denial.capacity, denial.used, denial.requested) == (
        "tokens", 1000, 608, 608)
    assert denial.wait_s == 59.0
    assert actual.check(1.0, actual.reservation(8, 600, 1, 1), 8) is None


def test_settle_replaces_the_reservation_by_actual_usage() -> None:
    state = LimitState(LimitSpec(tpm=1000, output_tpm=100, algorithm="sliding"))
    handle = state.admit(0.0, 608, 8)
    state.settle(2.0, handle, 608, 8, 20)
    assert state.tokens is not None and state.tokens.used(2.0) == 28
    assert state.output is not None and state.output.used(2.0) == 20
    assert state.inflight == 0


def test_concurrency_is_checked_first_and_released_by_settle() -> None:
    state = LimitState(LimitSpec(concurrency=1, rpm=100))
    handle = state.admit(0.0, 1, 1)
    denial = state.check(0.0, 1, 1)
    assert denial is not None and denial.limit == "concurrency"
    state.settle(0.5, handle, 1, 1, 3)
    assert state.check(0.5, 1, 1) is None
