"""The SimPy driver: each arm's client engine against the simulated providers, in virtual time.

``ArmDriver.run`` mirrors ``batchclient.runner.Runner.run`` step for step (feed pages, ask
``next_action``, start sends, wait for a completion, a timer or a wake-up, answer every
finished call with ``on_response`` and drain); the sends go through ``VirtualTransport``.
``plan_scenario`` lays out the arms as the live run does (batch arms one after another on a
fresh provider, or side by side; interactive user groups beside them) and feeds one
``Recorder`` with the same neutral events the live harness records.
"""

from __future__ import annotations

import gc
import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import simpy

from batchclient.cache import SqliteResultCache
from batchclient.policy.classify import Classified
from batchclient.policy.engine import Done, Engine, ItemResult, Send, Wait, cache_key
from batchclient.policy.routing import route_model
from batchclient.policy.state import Accepted
from batchclient.policy.userlimits import Tier, UserDecision, UserLimits
from batchclient.policy.wire import Call, Item, Response
from loadtests.bound import BoundInputs
from loadtests.planner.assemble import (
    ArmSetup,
    ItemPages,
    PlanError,
    arm_setup,
    bound_inputs,
    simulator_config,
    task_for,
)
from loadtests.planner.events import ArmEvents
from loadtests.planner.transport import VirtualTransport
from loadtests.recorder import Event, Recorder, recorder_for
from loadtests.run_setup import topup_times
from loadtests.scenario_model import Scenario, UserGroup
from loadtests.shapes import read_trace
from loadtests.workload import chat_sizes, chat_text
from simulator.gc_tuning import YOUNG_THRESHOLD
from simulator.model.provider import Provider
from simulator.server import build_providers

__all__ = ["ArmDriver", "PlanOptions", "PlanResult", "plan_scenario"]


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """How to plan: item count of the job (None: the workload's), a virtual stop time per
    batch arm (None: run to the end, as a plan does; a live run stops at ``duration_s``),
    time-series bucket (virtual seconds, None: chosen from the job's length)."""

    items: int | None = None
    stop_at_s: float | None = None
    bucket_s: float | None = None


@dataclass(slots=True)
class PlanResult:
    """A finished plan: the recorder holding every event, items left pending per arm, the
    exit status per batch arm, SimPy steps and requests simulated, wall seconds taken."""

    recorder: Recorder
    pending: dict[str, int] = field(default_factory=dict)
    status: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    requests: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The ``ratelab.summary/1`` dict of the plan (mode ``plan``)."""
        return self.recorder.summary(pending=self.pending)


class ArmDriver:
    """One arm's engine driven in SimPy: the planner's counterpart of the asyncio Runner."""

    def __init__(self, env: simpy.Environment, scenario: Scenario, setup: ArmSetup,
                 transport: VirtualTransport, record: Callable[[list[Event]], None],
                 source: Iterator[Item] | ItemPages | None, *, keep_open: bool = False,
                 user_limits: UserLimits | None = None,
                 on_alert: Callable[[str, float, float | None], None] | None = None) -> None:
        self.env = env
        self.setup = setup
        self.config = setup.config
        self.transport = transport
        self.record = record
        self.source = source
        self.keep_open = keep_open
        self.on_alert = on_alert
        self.task = task_for(scenario, setup.arm)
        served = {p.name: transport.list_models(p.name) for p in self.config.providers}
        self.engine = Engine(self.task, self.config, random.Random(self.config.seed), served,
                             (), user_limits, topups=topup_times(scenario, setup.arm))
        self.cache = SqliteResultCache(":memory:") if self.config.cache_path else None
        self.adapter = ArmEvents(setup.arm.name)
        self._done: deque[tuple[Call, Response, bool, str | None]] = deque()
        self._wake = env.event()
        self._stop = False
        self._retry: dict[int, tuple[bool, str | None]] = {}
        self._chat_stage: dict[int, str | None] = {}  # request id -> its user's stage
        self._interactive: dict[int, simpy.Event] = {}
        self.status: int | None = None
        self.requests = 0
        self.started = env.now
        self.finished: float | None = None

    # ------------------------------------------------------------------ control

    def wake(self) -> None:
        """Wake the driver (a completion, a new interactive request, a stop)."""
        if not self._wake.triggered:
            self._wake.succeed()

    def stop(self) -> None:
        """Stop dispatching; in-flight calls finish (the runner's ``stop``)."""
        self._stop = True
        self.wake()

    def chat(self, user: str, messages: list[dict[str, str]], max_tokens: int,
             stage: str | None) -> Generator[simpy.Event, Any,
                                             tuple[Response, Classified] | UserDecision | None]:
        """A SimPy process: one interactive request through the lane (the runner's ``chat``);
        None when the arm stopped at the end of the run before answering it."""
        submitted = self.engine.submit_interactive(self.env.now, user, messages, max_tokens)
        if isinstance(submitted, UserDecision):
            return submitted
        done = self.env.event()
        self._interactive[submitted] = done
        self._retry[submitted] = (False, stage)
        self._chat_stage[submitted] = stage
        self.wake()
        result = yield done
        return result

    # ------------------------------------------------------------------ the loop

    def _feed(self) -> None:
        engine = self.engine
        while wanted := engine.wants_items:
            if self.source is None:
                if not self.keep_open:
                    engine.end_of_items()
                return
            if isinstance(self.source, ItemPages) and self.cache is None:
                # ids and texts straight to the engine: no item object before it needs one
                ids, texts = self.source.take(wanted)
                if not ids:
                    engine.end_of_items()
                    self.source = None
                    return
                # ids unique by construction are not kept for collision checks: memory
                # that would grow with the plan (about 90 bytes an item)
                engine.add_page(ids, texts, unique=self.source.unique_ids)
                continue
            page: list[Item] = (list(map(Item, *self.source.take(wanted)))
                                if isinstance(self.source, ItemPages)
                                else list(itertools.islice(self.source, wanted)))
            if not page:
                engine.end_of_items()
                self.source = None
                return
            if self.cache is not None:
                keys = {i.id: cache_key(i.text, self.task, route_model(
                    i, self.task.model, self.config.routing, ())) for i in page}
                hits = self.cache.get_many(keys.values())
                fresh = []
                for item in page:
                    code = hits.get(keys[item.id])
                    if code is not None and code in self.task.labels:
                        engine.complete_from_cache(item, code, now=self.env.now)
                    else:
                        fresh.append(item)
                page = fresh
                self._flush(None, None, False, None)
            engine.add_items(page)

    def _flush(self, call: Call | None, response: Response | None, retry: bool,
               stage: str | None) -> None:
        # compact: a reply's finished items stay one record unless the cache needs them
        results, events = self.engine.drain_compact()
        if results and self.cache is not None:
            labels = self.task.labels
            expanded: list[ItemResult] = []
            for entry in results:
                if isinstance(entry, Accepted):
                    expanded.extend(entry.results(labels))
                else:
                    expanded.append(entry)
            self.cache.put_many(expanded)
        if events:
            if self.on_alert is not None and self.engine.cost.low_balance_usd is not None:
                # the fuel gauge's alert (the client's low_balance_usd), as live runs log it
                for event in events:
                    if not isinstance(event, Accepted) and event.kind == "balance":
                        self.on_alert(self.setup.arm.name, self.env.now, event.balance_usd)
            self.record(self.adapter.convert(self.env.now, call, response, retry, events, stage))

    def _arrived(self, call: Call, response: Response) -> None:
        retry, stage = self._retry.pop(call.call_id, (False, None))
        self._done.append((call, response, retry, stage))
        wake = self._wake
        if not wake.triggered:
            _trigger(self.env, wake)

    def _wake_or_timer(self, seconds: float) -> simpy.Event:
        """An event processed one step after the wake-up or the timer, whichever is first:
        what ``wake | env.timeout(seconds)`` gives, without a Condition per wait."""
        env = self.env
        relay = env.event()

        def fire(_event: simpy.Event) -> None:
            if not relay.triggered:
                _trigger(env, relay)

        wake_callbacks = self._wake.callbacks
        timer_callbacks = env.timeout(seconds).callbacks
        assert wake_callbacks is not None and timer_callbacks is not None
        wake_callbacks.append(fire)
        timer_callbacks.append(fire)
        return relay

    def _complete(self, call: Call, response: Response, retry: bool, stage: str | None) -> None:
        engine = self.engine
        engine.on_response(self.env.now, call, response)
        self._flush(call, response, retry, stage)
        # As the live Runner does: a chat may take several attempts (new call ids, one
        # request id), so waiters are resolved from the engine's finished chats only.
        # Every chat submitted waits in _interactive until its outcome is drained here:
        # none waiting, none finished.
        if not self._interactive:
            return
        for request_id, outcome in engine.drain_interactive():
            done = self._interactive.pop(request_id, None)
            self._chat_stage.pop(request_id, None)
            if done is not None:
                done.succeed(outcome)

    def run(self) -> Generator[simpy.Event, Any, None]:
        """The SimPy process of the arm; sets ``status`` and ``finished`` at the end."""
        env = self.env
        engine = self.engine
        inflight = 0
        self.started = env.now
        # wants_items moves only when items finish or the in-flight limit changes, that is
        # by an answer: asked at the start and after answers, not after every send or wait
        feed = True
        while True:
            if feed:
                feed = False
                if engine.wants_items:  # _feed's own first test, without the call
                    self._feed()
            if self._stop:
                if not inflight:
                    self.status = 130
                    break
                action: object = None
            else:
                action = engine.next_action(env.now)
            if isinstance(action, Send):
                call = action.call
                if call.lane != "interactive":
                    self._retry[call.call_id] = (self.adapter.on_send(call), None)
                elif call.call_id not in self._retry:
                    # a further attempt of a chat (new call id, same request id): a retry
                    request_id = call.request_id if call.request_id is not None else -1
                    self._retry[call.call_id] = (True, self._chat_stage.get(request_id))
                self.requests += 1
                inflight += 1
                self.transport.start(call, self._arrived)
                continue
            if isinstance(action, Done):
                if not (self.keep_open and not self._stop):
                    self.status = action.status
                    break
                action = Wait(None)
            seconds = action.seconds if isinstance(action, Wait) else None
            if not self._done:
                self._wake = env.event()
                if seconds is None:
                    if not inflight and not self.keep_open:
                        raise PlanError(f"arms.{self.setup.arm.name}: the engine waits for "
                                        "nothing (no call in flight, no timer)")
                    yield self._wake
                else:
                    yield self._wake_or_timer(max(0.0, seconds))
            while self._done:
                call, response, retry, stage = self._done.popleft()
                inflight -= 1
                self._complete(call, response, retry, stage)
                feed = True
        self._flush(None, None, False, None)
        self.finished = env.now
        # Chats still waiting when the run ends (queued behind a user limit or a backoff)
        # are never answered, as when Locust stops its users: their callers just stop.
        for done in self._interactive.values():
            if not done.triggered:
                done.succeed(None)


def _trigger(env: simpy.Environment, event: simpy.Event) -> None:
    """``event.succeed()``, processed at once when that is what the next step would do.

    A succeeded event is scheduled behind everything already due at this instant and its
    callbacks run when the loop reaches it. When nothing else is due now (the next event is
    later) and no process is running (a plain event's callback called us, and it does
    nothing after: the transport's completion or refusal, a wait's relay), the next step
    would be this event's: running its callbacks here is the same order of everything,
    without the event's trip through the queue. Each request's completion wakes the
    driver this way, mostly at an instant of its own.
    """
    # env.active_process, env.peek() and env.now read from the attributes they return
    # (as the lines below already set what step sets): a call or two a request
    queue = env._queue
    if env._active_proc is not None or (queue and queue[0][0] <= env._now):
        event.succeed()
        return
    # what Environment.step does to a processed event that succeeded with None
    event._ok = True
    event._value = None
    callbacks = event.callbacks
    event.callbacks = None  # type: ignore[assignment]  # processed, as SimPy marks it
    for callback in callbacks:
        callback(event)


# ---------------------------------------------------------------------- interactive users


def _user_prompt(group: UserGroup, scenario: Scenario, rng: random.Random,
                 sizes: tuple[int, int] | None = None) -> tuple[str, int]:
    """A chat's text and max_tokens: ``sizes`` (prompt tokens, max_tokens) when given (a
    trace row), else drawn as the live harness draws them."""
    prompt, max_tokens = sizes if sizes is not None else chat_sizes(scenario, group, rng)
    return chat_text(prompt), int(max_tokens)


def _closed_user(env: simpy.Environment, driver: ArmDriver, group: UserGroup,
                 scenario: Scenario, index: int, stop_at: float, stage: str,
                 rng: random.Random) -> Generator[simpy.Event, Any, None]:
    user = f"{group.name}-{index % max(1, group.user_ids)}"
    while env.now < stop_at:
        text, max_tokens = _user_prompt(group, scenario, rng)
        outcome = yield from driver.chat(user, [{"role": "user", "content": text}],
                                         max_tokens, stage)
        if outcome is None:
            return
        if isinstance(outcome, UserDecision):
            if outcome.stopped:
                # the lane stopped on a fatal answer, nothing sent: wait for it to go on
                # (a top-up is due) or stop, as the live user idles
                if outcome.retry_in_s <= 0:
                    return
                yield env.timeout(outcome.retry_in_s)
                continue
            driver.record([Event(env.now, "limited", driver.setup.arm.name, "refused",
                                 stage=stage)])
            # wait until the bucket lets a chat through, then think, as the live user does
            yield env.timeout(max(outcome.retry_in_s, 0.001) + group.think_s)
            continue
        if group.think_s > 0:
            yield env.timeout(group.think_s)


def _open_arrival(env: simpy.Environment, driver: ArmDriver, group: UserGroup,
                  scenario: Scenario, index: int, stage: str | None, rng: random.Random,
                  sizes: tuple[int, int] | None = None) -> Generator[simpy.Event, Any, None]:
    text, max_tokens = _user_prompt(group, scenario, rng, sizes)
    user = f"{group.name}-{index % max(1, group.user_ids)}"
    outcome = yield from driver.chat(user, [{"role": "user", "content": text}], max_tokens,
                                     stage)
    if isinstance(outcome, UserDecision) and not outcome.stopped:
        driver.record([Event(env.now, "limited", driver.setup.arm.name, "refused",
                             stage=stage)])


def _group(env: simpy.Environment, driver: ArmDriver, group: UserGroup, scenario: Scenario,
           rng: random.Random) -> Generator[simpy.Event, Any, None]:
    """Run a user group's stages (closed-loop users or open-loop arrivals), then stop."""
    if group.mode == "trace":
        yield from _trace(env, driver, group, scenario, rng)
        return
    t = env.now
    spawned = 0
    for stage in group.stages:
        end = t + stage.duration_s
        if stage.rate_per_s:
            index = 0
            while env.now < end:
                env.process(_open_arrival(env, driver, group, scenario, index, stage.name, rng))
                index += 1
                gap = 1.0 / stage.rate_per_s
                if group.arrival == "poisson":
                    shape = 1.0 / max(group.burstiness, 1e-9)
                    gap = rng.gammavariate(shape, gap / shape)
                yield env.timeout(gap)
        else:
            users = int(stage.users or 0)
            rate = stage.spawn_rate or 0.0
            for i in range(users):
                delay = (i - spawned) / rate if rate and i >= spawned else 0.0
                env.process(_delayed(env, delay, _closed_user(
                    env, driver, group, scenario, i, end, stage.name,
                    random.Random(f"{scenario.seed}:{group.name}:{i}:{stage.name}"))))
            spawned = users
            if end > env.now:
                yield env.timeout(end - env.now)
        t = end


def _trace(env: simpy.Environment, driver: ArmDriver, group: UserGroup, scenario: Scenario,
           rng: random.Random) -> Generator[simpy.Event, Any, None]:
    """Replay ``group``'s trace as the live harness does: each row's chat sent at its time
    (virtual seconds from the start) with its prompt and max_tokens, whether or not earlier
    ones returned; rows at or after ``duration_s`` are not sent. Trace requests belong to no
    stage. The scenario's checks read the trace already (a bad row is refused there)."""
    assert group.trace is not None  # the scenario checks require it for a trace group
    start = env.now
    for index, row in enumerate(read_trace(group.trace)):
        if row.t_s >= scenario.duration_s:
            return
        if start + row.t_s > env.now:
            yield env.timeout(start + row.t_s - env.now)
        env.process(_open_arrival(env, driver, group, scenario, index, None, rng,
                                  (row.prompt_tokens, row.max_tokens)))


def _delayed(env: simpy.Environment, delay: float,
             proc: Generator[simpy.Event, Any, None]) -> Generator[simpy.Event, Any, None]:
    if delay > 0:
        yield env.timeout(delay)
    yield from proc


# ---------------------------------------------------------------------- the whole scenario


def _bucket(duration_hint: float) -> float:
    """A bucket that keeps time series near a few hundred rows."""
    for bucket in (1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0):
        if duration_hint / bucket <= 600:
            return bucket
    return 3600.0


def _user_limits(group: UserGroup) -> UserLimits | None:
    if group.per_user_rpm is None and group.per_user_tokens_per_day is None:
        return None
    return UserLimits({"default": Tier(group.per_user_rpm, group.per_user_tokens_per_day)},
                      "default")


def _topups(env: simpy.Environment, scenario: Scenario,
            providers: Mapping[str, Provider]) -> Generator[simpy.Event, Any, None]:
    for topup in sorted(scenario.load.topups, key=lambda t: t.at_s):
        if topup.at_s > env.now:
            yield env.timeout(topup.at_s - env.now)
        provider = providers.get(topup.provider)
        if provider is not None:
            provider.topup(topup.key, topup.usd)


def _stopper(env: simpy.Environment, at: float,
             drivers: list[ArmDriver]) -> Generator[simpy.Event, Any, None]:
    yield env.timeout(at)
    for driver in drivers:
        driver.stop()


def _estimate_duration(scenario: Scenario, setups: Mapping[str, ArmSetup], count: int) -> float:
    worst = 60.0
    for setup in setups.values():
        try:
            from loadtests.bound import throughput_bound

            inputs = bound_inputs(scenario, setup)
            if inputs is None:
                continue
            rate = throughput_bound(inputs).items_per_min
        except (ValueError, PlanError):
            continue
        if rate > 0:
            worst = max(worst, count / rate * 60.0)
    return worst


@contextmanager
def _few_young_collections() -> Iterator[None]:
    """Raise the young-generation GC threshold for the length of a plan, then restore it.

    A plan allocates millions of short-lived objects (items, states, calls, responses);
    with CPython's default of 700 net allocations the young collections walk them about
    2,000 times a million items, some 6% of a plan's CPU. They die by reference counting
    anyway; only cycles wait longer to be collected (see simulator/gc_tuning.py).
    """
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_THRESHOLD), middle, old)
    try:
        yield
    finally:
        gc.set_threshold(young, middle, old)


def plan_scenario(scenario: Scenario, options: PlanOptions | None = None, *,
                  sweep_values: Mapping[str, float] | None = None,
                  sweep_key: str | None = None) -> PlanResult:
    """Run ``scenario`` through SimPy and return the recorder of the plan (mode ``plan``)."""
    with _few_young_collections():
        return _plan(scenario, options, sweep_values, sweep_key)


def _plan(scenario: Scenario, options: PlanOptions | None,
          sweep_values: Mapping[str, float] | None, sweep_key: str | None) -> PlanResult:
    options = options or PlanOptions()
    if scenario.target is not None:
        raise PlanError("target: an external endpoint cannot be planned (the planner needs the "
                        "simulated provider's model); plan the scenario without `target:`")
    wall = time.perf_counter()
    batch = scenario.load.batch
    count = options.items if options.items is not None else (
        (batch.items or scenario.workload.items) if batch else 0)
    setups = {arm.name: arm_setup(scenario, arm) for arm in scenario.arms}
    bounds: dict[str, BoundInputs] = {}
    for name, setup in setups.items():
        if setup.arm.strategy == "interactive":
            continue
        try:
            found = bound_inputs(scenario, setup)
        except PlanError:
            continue
        if found is not None:
            bounds[name] = found
    bucket = options.bucket_s or _bucket(
        options.stop_at_s or _estimate_duration(scenario, setups, count)
        if batch else scenario.duration_s)
    recorder = recorder_for(scenario, "plan", bounds, bucket_s=bucket,
                            sweep_values=sweep_values, sweep_key=sweep_key)
    if options.items is not None:
        for info in list(recorder.arms.values()):
            if info.items_total:
                from dataclasses import replace

                recorder.arms[info.name] = replace(info, items_total=count)
    result = PlanResult(recorder)
    sim_config = simulator_config(scenario)
    batch_arms = list(batch.arms) if batch else []
    groups = list(scenario.load.users)
    # one environment per sequential batch arm ("a fresh window"); users join the first
    if batch is None or batch.order != "sequential" or len(batch_arms) <= 1:
        layout = [batch_arms]
    else:
        layout = [[name] for name in batch_arms]
    for index, arm_names in enumerate(layout):
        env = simpy.Environment()
        providers = build_providers(sim_config)
        transport = VirtualTransport(env, providers, {})
        drivers: list[ArmDriver] = []
        for name in arm_names:
            setup = setups[name]
            transport.add_routes(setup.routes, setup.config.stream)
            driver = ArmDriver(env, scenario, setup, transport, recorder.add_many,
                               ItemPages(scenario, count), on_alert=recorder.balance_alert)
            drivers.append(driver)
        user_drivers: dict[str, ArmDriver] = {}
        if index == 0:
            for group in groups:
                if group.arm in user_drivers:
                    continue
                setup = setups[group.arm]
                transport.add_routes(setup.routes, setup.config.stream)
                driver = ArmDriver(env, scenario, setup, transport, recorder.add_many, None,
                                   keep_open=True, user_limits=_user_limits(group),
                                   on_alert=recorder.balance_alert)
                user_drivers[group.arm] = driver
        procs = [env.process(d.run()) for d in drivers]
        for driver in user_drivers.values():
            env.process(driver.run())
        rng = random.Random(f"{scenario.seed}:users")
        group_procs = [env.process(_group(env, user_drivers[g.arm], g, scenario, rng))
                       for g in groups if index == 0]
        env.process(_topups(env, scenario, providers))
        if options.stop_at_s is not None:
            env.process(_stopper(env, options.stop_at_s, drivers))
        waits = procs + group_procs
        if waits:
            env.run(until=simpy.AllOf(env, waits))
        for driver in user_drivers.values():
            driver.stop()
        env.run()
        for driver in (*drivers, *user_drivers.values()):
            name = driver.setup.arm.name
            c = driver.engine.counts
            if not driver.keep_open:
                result.pending[name] = max(0, count - c.done - c.dead)
                result.status[name] = driver.status if driver.status is not None else 1
                fatal = driver.engine.fatal
                if fatal is not None:
                    recorder.job_stopped(name, fatal.status, fatal.reason)
                recorder.mark(name, start_s=driver.started, end_s=driver.finished)
            result.requests += driver.requests
        result.steps += _steps(env)
    result.wall_s = time.perf_counter() - wall
    return result


def _steps(env: simpy.Environment) -> int:
    # SimPy numbers every scheduled event from one counter: the events this plan processed
    counter = getattr(env, "_eid", None)
    return int(next(counter)) if counter is not None else 0
