"""The driver's wake-up: processed at once only when the next step would process it."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import simpy

from loadtests.planner.sim import _trigger


def _waiter(env: simpy.Environment, event: simpy.Event,
            log: list[str]) -> Generator[simpy.Event, Any, None]:
    yield event
    log.append(f"woke at {env.now}")


def test_nothing_else_due_now_runs_the_waiter_within_the_callers_step() -> None:
    env = simpy.Environment()
    log: list[str] = []
    wake = env.event()
    env.process(_waiter(env, wake, log))
    env.step()  # the waiter starts and parks on wake

    def arrive(_event: simpy.Event) -> None:
        _trigger(env, wake)
        log.append("caller returned")

    env.timeout(1.0).callbacks.append(arrive)
    env.timeout(2.0)  # later: not due now
    env.step()  # the 1.0 timeout
    assert log == ["woke at 1.0", "caller returned"]
    assert wake.processed and wake.ok


def test_an_event_due_at_the_same_instant_goes_first() -> None:
    env = simpy.Environment()
    log: list[str] = []
    wake = env.event()
    env.process(_waiter(env, wake, log))
    env.step()

    def arrive(_event: simpy.Event) -> None:
        _trigger(env, wake)
        log.append("caller returned")

    def other(_event: simpy.Event) -> None:
        log.append("other at 1.0")

    env.timeout(1.0).callbacks.append(arrive)
    env.timeout(1.0).callbacks.append(other)  # due at the same instant, queued before wake
    env.run()
    assert log == ["caller returned", "other at 1.0", "woke at 1.0"]


def test_inside_a_process_the_event_is_scheduled() -> None:
    env = simpy.Environment()
    log: list[str] = []
    wake = env.event()
    env.process(_waiter(env, wake, log))

    def waker() -> Generator[simpy.Event, Any, None]:
        yield env.timeout(1.0)
        _trigger(env, wake)
        log.append("waker went on")

    env.process(waker())
    env.run()
    assert log == ["waker went on", "woke at 1.0"]
