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
from locust.runners import MasterRunner, WorkerRunner

from loadtests.run_plans import run_scenario
from loadtests.run_process import ProcessState, open_process
from loadtests.rundir import (
    SLOTS_FILE,
    SPEC_ENV,
    SWARM_END,
    RunSpec,
    SlotClaims,
    started,
    swarm_started,
)
from loadtests.scenario_model import UserGroup
from loadtests.shapes import LoadPlan, Settle, arrivals, read_trace
from loadtests.workload import chat_sizes

log = logging.getLogger("ratelab")

# When the load is over the shape asks for 0 users, then waits for Locust's request count to
# stay still this long (wall seconds) before ending the run: Locust rewrites its CSV every
# second, and workers report their statistics to the master every 3 seconds.
SETTLE_QUIET_S, SETTLE_QUIET_DISTRIBUTED_S, SETTLE_MAX_S = 1.5, 4.5, 30.0

_SPEC_PATH = os.environ.get(SPEC_ENV)
if not _SPEC_PATH:
    raise RuntimeError(f"{SPEC_ENV} is not set: start this locustfile with `ratelab run`")
SPEC = RunSpec.read(_SPEC_PATH)
SCENARIO, _ = run_scenario(SPEC.scenario_path, SPEC.duration_s, SPEC.items, SPEC.overrides)
SPEC = started(SPEC, SlotClaims(os.path.join(SPEC.run_dir, SLOTS_FILE)))
PLAN = LoadPlan(SCENARIO, SPEC.slots)
K = SCENARIO.time_scale
PLAN_STOP_RATE = 1000.0  # users stopped per wall second once the load is over: all at once

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


def _begin_swarm() -> None:
    """Web UI: virtual time starts when the swarm starts (the master claims the origin first,
    each worker reads it at its first spawn), not when Locust loaded the run."""
    global SPEC
    claims = SlotClaims(os.path.join(SPEC.run_dir, SLOTS_FILE))
    try:
        SPEC = swarm_started(SPEC, claims)
    finally:
        claims.close()
    if _state is not None and _state_pid == os.getpid():
        _state.spec = SPEC
        _state.clock.origin = SPEC.origin_monotonic


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
    if st.capped:
        gevent.sleep(1.0)  # the spend cap is reached: send nothing more (without spinning)
        return
    arm = SCENARIO.arm(group.arm)
    refused = st.bridge.run(st.chat(arm, group, user, prompt_tokens, max_tokens))
    if refused is None:
        return
    if refused.stopped:
        # the lane stopped on a fatal answer (nothing was sent): wait for it to go on (a
        # top-up is due) or, stopped for good, stay idle rather than spin
        gevent.sleep(refused.retry_in_s / K if refused.retry_in_s > 0 else 3600.0)
        return
    _fire("LIMIT", group.arm, str(refused))
    # the user waits until its bucket lets a chat through (then thinks, as after any
    # chat), as the planner's user does: not a refusal per think time
    gevent.sleep(refused.retry_in_s / K)


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
        self._settle: Settle | None = None
        self.over = False  # the scenario's load is over (not stopped from the UI)

    def reset_time(self) -> None:
        # Locust calls this when a swarm starts (headless at once; with the UI on Start)
        super().reset_time()
        if not SPEC.headless:
            _begin_swarm()

    def tick(self) -> tuple[int, float] | None:
        if self._claims is None:
            self._claims = SlotClaims(os.path.join(SPEC.run_dir, SLOTS_FILE))
        t = SPEC.virtual_now()
        done = not PLAN.has_batch or self._claims.finished("batch") >= SPEC.slots
        tick = PLAN.tick(t, done)
        if tick is None:
            # stop every user; requests in flight finish and are counted before Locust's
            # reports are written
            if self._settle is None:
                distributed = isinstance(self.runner, MasterRunner)
                self._settle = Settle(
                    SETTLE_QUIET_DISTRIBUTED_S if distributed else SETTLE_QUIET_S, SETTLE_MAX_S)
            count = self.runner.stats.total.num_requests if self.runner is not None else 0
            if self._settle.settled(time.monotonic(), count):
                self.over = True
                return None
            return 0, PLAN_STOP_RATE
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


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_kw: Any) -> None:
    if not SPEC.headless and isinstance(environment.runner, WorkerRunner):
        _begin_swarm()


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_kw: Any) -> None:
    # Web UI: the swarm stopped (its load is over, or the UI's Stop); `ratelab run` sees the
    # note, stops Locust (which saves its reports) and writes the summary. Headless Locust
    # quits by itself.
    if SPEC.headless or isinstance(environment.runner, WorkerRunner):
        return
    shape = environment.shape_class
    over = isinstance(shape, ScenarioShape) and shape.over
    claims = SlotClaims(os.path.join(SPEC.run_dir, SLOTS_FILE))
    try:
        claims.set_once(SWARM_END, 1.0 if over else 0.0)
    finally:
        claims.close()


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
