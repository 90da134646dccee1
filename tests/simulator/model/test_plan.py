"""ResponsePlan's chunk times: the whole list, and one entry of it without the list."""

from __future__ import annotations

import random

import pytest

from simulator.model.plan import Fault, ResponsePlan, Usage


def _reference_times(plan: ResponsePlan, t0: float) -> list[float]:
    """The running sum written out step by step (the documented meaning of chunk_times)."""
    times = [t0 + plan.ttft_s]
    for gap in plan.itl_s[: max(0, plan.n_chunks - 1)]:
        times.append(times[-1] + gap)
    fault = plan.fault
    if fault is not None and fault.kind == "stall":
        for i in range(min(fault.at_chunk, len(times) - 1), len(times)):
            times[i] += fault.duration_s
    return times


def _plan(rng: random.Random, chars: int, gaps: int, fault: Fault | None) -> ResponsePlan:
    itl = tuple(rng.lognormvariate(-4.0, 1.0) for _ in range(gaps))
    return ResponsePlan(rng.random(), itl, "x" * chars, "stop", Usage(1, 1, 2), fault)


@pytest.mark.parametrize("fault", [None, Fault("stall", 3, 0.7), Fault("stall", 0, 1.5),
                                   Fault("stall", 99, 2.0), Fault("reset", 2)])
def test_chunk_time_is_the_list_entry_bit_for_bit(fault: Fault | None) -> None:
    rng = random.Random(7)
    for chars in (0, 1, 4, 5, 17, 80, 401):
        n = (chars + 3) // 4
        for gaps in {max(0, n - 1), n + 3, n // 2}:
            plan = _plan(rng, chars, gaps, fault)
            t0 = rng.random() * 1e4  # far from 0: a different summation order would show
            times = plan.chunk_times(t0)
            assert times == _reference_times(plan, t0)
            for index in range(len(times) + 3):
                assert plan.chunk_time(t0, index) == times[min(index, len(times) - 1)]
            assert plan.chunk_time(t0, -1) == times[-1]


def test_an_empty_reply_has_one_time() -> None:
    plan = ResponsePlan(0.25, (), "", "stop", Usage(1, 0, 1))
    assert plan.chunk_times(10.0) == [10.25]
    assert plan.chunk_time(10.0, -1) == plan.chunk_time(10.0, 5) == 10.25
