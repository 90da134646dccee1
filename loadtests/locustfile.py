"""The Locust users of ``ratelab run``: a batch-job user, chat users, and the load shape.

Started by ``ratelab run`` as ``python -m locust -f loadtests/locustfile.py`` with the run
spec's path in the ``RATELAB_RUN_SPEC`` environment variable. User classes are built from
the scenario at import: ``BatchJobUser`` (one per batch slot: it claims a slot and runs every
batch arm over that slot's items), one closed-loop class per closed user group (think time
between chats), and one arrival generator per open-loop or trace group per slot. Each
process runs the client on one asyncio loop (``loadtests.bridge``); the process-wide state
is opened lazily because Locust imports this file before forking its workers.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from typing import Any

import gevent
from locust import LoadTestShape, User, constant, events, task
from locust.env import Environment
from locust.runners import MasterRunner

from loadtests.run_plans import run_scenario
from loadtests.run_process import ProcessState, chat_sizes, open_process
from loadtests.rundir import SLOTS_FILE, SPEC_ENV, RunSpec, SlotClaims, started
from loadtests.scenario_model import UserGroup
from loadtests.shapes import LoadPlan, arrivals, read_trace

log = logging.getLogger("ratelab")

_SPEC_PATH = os.environ.get(SPEC_ENV)
if not _SPEC_PATH:
    raise RuntimeError(f"{SPEC_ENV} is not set: start this locustfile with `ratelab run`")
SPEC = RunSpec.read(_SPEC_PATH)
SCENARIO, _ = run_scenario(SPEC.scenario_path, SPEC.duration_s, SPEC.items, SPEC.overrides)
SPEC = started(SPEC, SlotClaims(os.path.join(SPEC.run_dir, SLOTS_FILE)))
PLAN = LoadPlan(SCENARIO, SPEC.slots)
K = SCENARIO.time_scale

_state: ProcessState | None = None
_state_pid: int | None = None
_user_ids = itertools.count()


def state() -> ProcessState:
    """This process's state, opened on first use after the fork."""
    global _state, _state_pid
    if _state is None or _state_pid != os.getpid():
        _state = open_process(_SPEC_PATH or "")
        _state_pid = os.getpid()
    return _state


def _sleep_until_virtual(t: float) -> None:
    """Sleep the greenlet until virtual time ``t`` of the run."""
    wall = t / K - (time.monotonic() - SPEC.origin_monotonic)
    if wall > 0:
        gevent.sleep(wall)


def _fire(request_type: str, name: str, exception: str | None = None) -> None:
    events.request.fire(request_type=request_type, name=name, response_time=0.0,
                        response_length=0, context={},
                        exception=None if exception is None else RuntimeError(exception))


def _chat(group: UserGroup, user: str, prompt_tokens: int, max_tokens: int) -> None:
    st = state()
    arm = SCENARIO.arm(group.arm)
    refused = st.bridge.run(st.chat(arm, group, user, prompt_tokens, max_tokens))
    if refused is not None:
        _fire("LIMIT", group.arm, refused)


class _Idle(User):
    abstract = True
    wait_time = constant(0)

    def idle(self) -> None:
        """Stay alive without work, so Locust does not replace this user."""
        while True:
            gevent.sleep(3600)


class BatchJobUser(_Idle):
    """Claims a batch slot and runs every batch arm over that slot's share of the items."""

    abstract = not PLAN.has_batch
    fixed_count = SPEC.slots if PLAN.has_batch else 0

    def on_start(self) -> None:
        self._fut: Any = None

    @task
    def job(self) -> None:
        st = state()
        slot = st.claims.claim("batch", SPEC.slots)
        if slot is not None:
            self._fut = st.bridge.submit(st.run_batch(slot))
            try:
                st.bridge.wait(self._fut)
            except Exception as exc:
                log.exception("batch slot %s failed", slot)
                st.log.record("job_failed", {"slot": slot, "pid": os.getpid(),
                                             "error": f"{type(exc).__name__}: {exc}"})
                _fire("ERR", "batch-job", "batch job failed")
            finally:
                st.log.flush()
                st.claims.finish("batch", slot)
        self.idle()

    def on_stop(self) -> None:
        fut = getattr(self, "_fut", None)
        if fut is None or fut.done():
            return
        st = state()
        st.bridge.call(st.stop_batch)
        try:
            st.bridge.wait(fut, timeout=10)
        except (gevent.Timeout, Exception):
            log.warning("batch job did not stop within 10 s")


def _closed_user(group: UserGroup) -> type[User]:
    peak = max((s.users or 0 for s in group.stages), default=1)

    def chat(self: User) -> None:
        rng = self._rng  # type: ignore[attr-defined]
        prompt, max_tokens = chat_sizes(SCENARIO, group, rng)
        _chat(group, self._uid, prompt, max_tokens)  # type: ignore[attr-defined]

    def on_start(self: User) -> None:
        n = next(_user_ids)
        self._uid = f"u{(os.getpid() * 7919 + n) % group.user_ids}"  # type: ignore[attr-defined]
        self._rng = random.Random(SCENARIO.seed * 1_000_003 + n)  # type: ignore[attr-defined]

    return type(f"Chat_{group.name}", (User,), {
        "weight": max(1, peak),
        "wait_time": constant(group.think_s / K),
        "tasks": [chat],
        "on_start": on_start,
        "__module__": __name__,
    })


def _generator_user(group: UserGroup) -> type[User]:
    def run(self: User) -> None:
        st = state()
        slot = st.claims.claim(f"group:{group.name}", SPEC.slots)
        if slot is None:
            _Idle.idle(self)  # type: ignore[arg-type]
            return
        rng = random.Random(SCENARIO.seed * 31 + slot)
        counter = itertools.count()
        if group.mode == "trace" and group.trace is not None:
            schedule = [(row.t_s, row.prompt_tokens, row.max_tokens)
                        for row in read_trace(group.trace)[slot::SPEC.slots]]
        else:
            schedule = []
            for t, _stage in arrivals(group.stages, group.arrival, group.burstiness, rng,
                                      1.0 / SPEC.slots):
                prompt, max_tokens = chat_sizes(SCENARIO, group, rng)
                schedule.append((t, prompt, max_tokens))
        for t, prompt, max_tokens in schedule:
            if t >= SCENARIO.duration_s:
                break
            _sleep_until_virtual(t)
            user = f"u{(slot + SPEC.slots * next(counter)) % group.user_ids}"
            gevent.spawn(_chat, group, user, prompt, max_tokens)
        _Idle.idle(self)  # type: ignore[arg-type]

    return type(f"Arrivals_{group.name}", (User,), {
        "fixed_count": SPEC.slots,
        "wait_time": constant(0),
        "tasks": [run],
        "__module__": __name__,
    })


# Locust collects every User class bound in this module: bind each exactly once
if SCENARIO.gateway is not None:
    from loadtests.gateway_users import install

    globals().update(install(SCENARIO, SPEC, __name__, events.test_start.add_listener,
                             events.quitting.add_listener))
else:
    globals().update(
        {cls.__name__: cls for cls in (
            _closed_user(g) if g.mode == "closed" else _generator_user(g)
            for g in SCENARIO.load.users
        )}
    )


class ScenarioShape(LoadTestShape):
    """Users over time from the scenario's stages; stops at ``duration_s`` or when all is done."""

    def __init__(self) -> None:
        super().__init__()
        self._claims: SlotClaims | None = None

    def tick(self) -> tuple[int, float] | None:
        if self._claims is None:
            self._claims = SlotClaims(os.path.join(SPEC.run_dir, SLOTS_FILE))
        t = SPEC.virtual_now()
        done = not PLAN.has_batch or self._claims.finished("batch") >= SPEC.slots
        tick = PLAN.tick(t, done)
        if tick is None:
            return None
        return PLAN.fixed_users() + sum(tick.users.values()), tick.spawn_rate


def _drain(environment: Environment) -> None:
    """Fire the queued statistics into Locust and flush the event log, every 0.2 s."""
    st = state()
    last_flush = time.monotonic()
    while True:
        while st.stats:
            stat = st.stats.popleft()
            environment.events.request.fire(**stat.as_kwargs())
        if time.monotonic() - last_flush > 0.5:
            st.log.flush()
            last_flush = time.monotonic()
        gevent.sleep(0.2)


@events.init.add_listener
def _on_init(environment: Environment, **_kw: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        return
    gevent.spawn(_drain, environment)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kw: Any) -> None:
    if _state is None or _state_pid != os.getpid():
        return
    st = _state
    st.bridge.call(st.stop_chats)
    st.bridge.call(st.stop_batch)
    gevent.sleep(0.3)
    while st.stats:
        environment.events.request.fire(**st.stats.popleft().as_kwargs())
    st.log.close()
