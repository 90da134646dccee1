"""Inside one Locust process: the client's runners on the asyncio bridge, and their events.

The client's event hook (called on the asyncio thread) turns each ``batchclient.events.Event``
into a neutral recorder ``Event`` appended to this process's JSONL log, and queues the
matching Locust statistic; a greenlet fires the queue into ``events.request`` (Locust's
statistics are gevent-side state). Request types keep requests, items and failures apart:
``REQ`` (answered 2xx), ``429``, ``ERR`` (any other failure), ``ITEM`` (an item's final
state; dead letters are failures), ``TTFT`` (time to first token of a streamed reply),
``LIMIT`` (a chat refused by a per-user limit before it was sent). Response times are
virtual milliseconds.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchclient.cache import SqliteResultCache
from batchclient.config import ClientConfig
from batchclient.cost import SpendBudget
from batchclient.events import Event as ClientEvent
from batchclient.interactive import InteractiveClient, UserLimited
from batchclient.policy.job import EXIT_SPEND_CAP
from batchclient.policy.userlimits import Tier, UserLimits
from batchclient.runner import JobResult, Runner
from batchclient.store import SqliteJobStore
from batchclient.transport import AiohttpTransport
from loadtests.bridge import AsyncBridge
from loadtests.recorder import Event, outcome_for_status
from loadtests.run_plans import run_scenario
from loadtests.run_setup import arm_task, client_config, slot_config, slot_items, topup_times
from loadtests.rundir import SLOTS_FILE, EventLog, RunSpec, SlotClaims, started
from loadtests.scenario_model import Arm, Scenario, UserGroup
from loadtests.shapes import stage_at
from loadtests.workload import chat_text

ITEM_OUTCOMES = {"done": "done", "cached": "cached", "dead": "dead_letter", "skip": "requeued"}


@dataclass(frozen=True, slots=True)
class Stat:
    """One Locust statistic to fire: ``events.request.fire(**as_kwargs())``."""

    request_type: str
    name: str
    response_time: float
    response_length: int
    exception: str | None = None

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``events.request.fire``."""
        return {
            "request_type": self.request_type,
            "name": self.name,
            "response_time": self.response_time,
            "response_length": self.response_length,
            "exception": None if self.exception is None else RuntimeError(self.exception),
            "context": {},
        }


def request_outcome(ev: ClientEvent) -> str:
    """The recorder outcome of a client request event."""
    if ev.error and ev.error.startswith("watchdog"):
        return "cancelled"
    if ev.status == 0:
        return "timeout" if ev.error == "timeout" else "error"
    return outcome_for_status(ev.status)


def to_recorder(ev: ClientEvent, arm: str, now: float, stage: str | None = None) -> Event | None:
    """The neutral recorder event of a client event (None for balance alerts)."""
    t = ev.at if ev.at > 0 else now
    if ev.kind == "request":
        return Event(
            t=t,
            kind="request",
            arm=arm,
            outcome=request_outcome(ev),
            status=ev.status,
            latency_s=ev.response_time_ms / 1000.0,
            ttft_s=None if ev.ttft_ms is None else ev.ttft_ms / 1000.0,
            tokens_in=ev.tokens_in,
            tokens_out=ev.tokens_out,
            items=ev.items,
            items_ok=ev.items_ok,  # counted by the client per call_id, not from log order
            cost_usd=ev.cost_usd,
            retry=ev.outcome == "retry",
            truncated=ev.truncated,
            stage=stage,
        )
    if ev.kind == "item":
        outcome = ITEM_OUTCOMES.get(ev.outcome)
        if outcome is None:
            return None
        return Event(t=t, kind="item", arm=arm, outcome=outcome, items=1, stage=stage)
    return None


def to_stats(ev: Event) -> list[Stat]:
    """The Locust statistics of a recorder event."""
    if ev.kind == "item":
        failed = ev.outcome == "dead_letter"
        return [Stat("ITEM", f"{ev.arm}:{ev.outcome}", 0.0, ev.items,
                     "dead-lettered" if failed else None)]
    ms = ev.latency_s * 1000.0
    size = ev.tokens_in + ev.tokens_out
    if ev.outcome == "ok":
        stats = [Stat("REQ", ev.arm, ms, size)]
        if ev.ttft_s is not None:
            stats.append(Stat("TTFT", ev.arm, ev.ttft_s * 1000.0, 0))
        return stats
    if ev.outcome == "http_429":
        return [Stat("429", ev.arm, ms, 0, "HTTP 429 rate limited")]
    return [Stat("ERR", ev.arm, ms, 0, f"{ev.outcome} (status {ev.status})")]


class RunClock:
    """Virtual seconds since the run's shared origin (``time.monotonic()`` based)."""

    def __init__(self, origin_monotonic: float, time_scale: float) -> None:
        self.origin = origin_monotonic
        self.time_scale = time_scale

    def now(self) -> float:
        """Virtual seconds since the origin."""
        import time

        return (time.monotonic() - self.origin) * self.time_scale

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` virtual seconds."""
        await asyncio.sleep(max(0.0, seconds) / self.time_scale)


@dataclass(slots=True)
class ProcessState:
    """Everything one Locust process shares: scenario, log, clock, queued stats, runners."""

    spec: RunSpec
    scenario: Scenario
    bridge: AsyncBridge
    log: EventLog
    claims: SlotClaims
    clock: RunClock
    stats: deque[Stat] = field(default_factory=deque)
    chat_runners: dict[str, tuple[Runner, InteractiveClient]] = field(default_factory=dict)
    batch_runners: list[Runner] = field(default_factory=list)
    chat_lock: asyncio.Lock | None = None
    chat_tasks: list[asyncio.Future[None]] = field(default_factory=list)
    users_started: int = 0
    # An external target's spend cap, this process's share: the budget every runner of the
    # process (the batch job and the chats) holds its requests in flight against, so none
    # is sent that could pass it; a runner stopped by it stops the process's work.
    spend: SpendBudget | None = None
    capped: bool = False

    @property
    def run_dir(self) -> Path:
        """The run folder."""
        return Path(self.spec.run_dir)

    def hook(self, arm: str, group: UserGroup | None = None) -> Callable[[ClientEvent], None]:
        """The client event hook of ``arm``: log the recorder event, queue Locust stats."""

        def on_event(ev: ClientEvent) -> None:
            now = self.clock.now()
            # a request belongs to the stage it was sent in (its finish may fall in the next)
            sent = (ev.at if ev.at > 0 else now) - ev.response_time_ms / 1000.0
            stage = self.stage_of(group, sent) if group is not None else None
            if ev.kind == "balance":
                # the fuel gauge's alert (the client's low_balance_usd): a record of its own
                self.log.record("alert", {"arm": arm, "t": ev.at if ev.at > 0 else now,
                                          "balance_usd": ev.balance_usd, "pid": os.getpid()})
                return
            rec = to_recorder(ev, arm, now, stage)
            if rec is None:
                return
            self.log.event(rec)
            self.stats.extend(to_stats(rec))

        return on_event

    def cap_spend(self) -> None:
        """A runner stopped at its spend cap (this process's share of the target's, or an
        arm's own ``spend_cap_usd``): note it and stop the others (loop thread)."""
        self.capped = True
        self.log.record("stop", {"reason": "spend_cap", "pid": os.getpid(), "spent_usd":
                                 None if self.spend is None else self.spend.spent_usd})
        self.stop_batch()
        self.stop_chats()

    def stage_of(self, group: UserGroup, now: float) -> str | None:
        """The stage of ``group`` at virtual time ``now``."""
        at = stage_at(group.stages, now)
        if at is None:
            # past the last stage (Locust's shape ticks once a wall second): still its load
            return group.stages[-1].name if group.stages and now > 0 else None
        return at.stage.name

    def config(self, arm: Arm) -> ClientConfig:
        """The client settings of ``arm`` for this run."""
        return client_config(self.scenario, arm, self.spec.provider_urls, self.run_dir)

    async def run_batch_arm(self, arm: Arm, slot: int) -> JobResult:
        """Run ``arm``'s job over this slot's items; log a ``job`` record and return the result."""
        config = self.config(arm)
        config = slot_config(config, slot, self.spec.slots)  # the slots are one client
        store = SqliteJobStore(str(self.run_dir / f"store-{arm.name}-{slot}.sqlite"))
        store.import_items(slot_items(self.scenario, slot, self.spec.slots))
        cache = SqliteResultCache(config.cache_path) if config.cache_path else None
        transport = AiohttpTransport(config.providers, config.stream,
                                     limit=max(64, config.concurrency.max))
        runner = Runner(arm_task(self.scenario, arm), config, transport, store, cache=cache,
                        clock=self.clock, on_event=self.hook(arm.name), spend=self.spend,
                        topups=topup_times(self.scenario, arm))
        self.batch_runners.append(runner)
        try:
            result = await runner.run()
            # The job's span is the runner's own, from its first dispatch (after the
            # preflight's check of every item) to its last save: the wall milliseconds of
            # the check and of closing the store would count time_scale-fold in virtual
            # time (6 virtual seconds at 60x for 20,000 items), and the planner has neither.
            end = self.clock.now()
            start = end - result.elapsed_s
        finally:
            await transport.close()
            store.close()
            if cache is not None:
                cache.close()
        if result.exit_status == EXIT_SPEND_CAP and not self.capped:
            self.cap_spend()  # the run stops as at the cap: a "stop" record, chats stopped
        self.log.record("job", {
            "arm": arm.name, "slot": slot, "pid": os.getpid(), "start_s": start,
            "end_s": end, "total": result.total, "done": result.done,
            "dead": result.dead, "pending": result.pending, "exit_status": result.exit_status,
            "reason": result.reason,
        })
        return result

    async def run_batch(self, slot: int) -> list[JobResult]:
        """Every batch arm of the scenario over this slot, in sequence or in parallel."""
        batch = self.scenario.load.batch
        if batch is None:
            return []
        arms = [self.scenario.arm(name) for name in batch.arms]
        if batch.order == "parallel":
            return list(await asyncio.gather(*(self.run_batch_arm(a, slot) for a in arms)))
        results = []
        for index, arm in enumerate(arms):
            if index:
                # a fresh rolling window for the next arm: wait out the provider's window
                await self.clock.sleep(60.0)
            results.append(await self.run_batch_arm(arm, slot))
            if any(r._stop for r in self.batch_runners):
                break
        return results

    def stop_batch(self) -> None:
        """Ask every batch runner of this process to stop (call on the loop thread)."""
        for runner in self.batch_runners:
            runner.stop()

    async def chat_client(self, arm: Arm, group: UserGroup) -> InteractiveClient:
        """The interactive client of ``arm`` (one keep-open runner per arm and process)."""
        if self.chat_lock is None:
            self.chat_lock = asyncio.Lock()
        async with self.chat_lock:
            found = self.chat_runners.get(arm.name)
            if found is not None:
                return found[1]
            config = self.config(arm)
            store = SqliteJobStore(str(self.run_dir / f"chat-{arm.name}-{os.getpid()}.sqlite"))
            limits = None
            if group.per_user_rpm is not None or group.per_user_tokens_per_day is not None:
                limits = UserLimits({"user": Tier(group.per_user_rpm,
                                                  group.per_user_tokens_per_day)}, "user")
            transport = AiohttpTransport(config.providers, config.stream,
                                         limit=max(64, config.concurrency.limit))
            runner = Runner(arm_task(self.scenario, arm), config, transport, store,
                            clock=self.clock, on_event=self.hook(arm.name, group),
                            user_limits=limits, keep_open=True, spend=self.spend,
                            topups=topup_times(self.scenario, arm))
            self.chat_tasks.append(asyncio.ensure_future(self._keep(runner, transport, store)))
            client = InteractiveClient(runner)
            self.chat_runners[arm.name] = (runner, client)
            return client

    async def _keep(self, runner: Runner, transport: AiohttpTransport,
                    store: SqliteJobStore) -> None:
        try:
            result = await runner.run()
        finally:
            await transport.close()
            store.close()
        if result.exit_status == EXIT_SPEND_CAP and not self.capped:
            self.cap_spend()  # a chat could not be sent within the cap: the run stops

    async def chat(self, arm: Arm, group: UserGroup, user: str, prompt_tokens: int,
                   max_tokens: int) -> UserLimited | None:
        """Send one chat as ``user``; returns the refusal when a per-user limit or the
        lane's stop (a fatal answer) refused it."""
        client = await self.chat_client(arm, group)
        text = chat_text(prompt_tokens)
        try:
            await client.chat(user, [{"role": "user", "content": text}], max_tokens,
                              stream=group.stream)
        except UserLimited as exc:
            if not exc.stopped:
                # refused by the user's own limit before sending: counted apart, as the
                # planner counts it
                now = self.clock.now()
                self.log.event(Event(now, "limited", arm.name, "refused",
                                     stage=self.stage_of(group, now)))
            return exc
        return None

    def stop_chats(self) -> None:
        """Stop every interactive runner (call on the loop thread)."""
        for runner, _ in self.chat_runners.values():
            runner.stop()


def open_process(spec_path: str | Path) -> ProcessState:
    """Load the run spec and scenario, open this process's log, claims and asyncio bridge."""
    from loadtests.bridge import get_bridge

    spec = RunSpec.read(spec_path)
    scenario, _ = run_scenario(spec.scenario_path, spec.duration_s, spec.items, spec.overrides)
    run_dir = Path(spec.run_dir)
    claims = SlotClaims(run_dir / SLOTS_FILE)
    spec = started(spec, claims)
    cap = scenario.target.spend_cap_usd if scenario.target is not None else None
    return ProcessState(
        spec=spec,
        scenario=scenario,
        bridge=get_bridge(),
        log=EventLog(run_dir / f"events-{os.getpid()}.jsonl"),
        claims=claims,
        clock=RunClock(spec.origin_monotonic, spec.time_scale),
        spend=None if cap is None else SpendBudget(cap / max(1, spec.slots)),
    )
