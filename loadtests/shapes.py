"""Load shapes as pure functions of virtual time: stages, step loads, open-loop arrivals, traces.

Nothing here imports Locust (importing it monkey-patches the process); ``locustfile.py`` wraps
:class:`LoadPlan` in a ``LoadTestShape``. Times are virtual seconds unless named ``wall``;
rates are per virtual second.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtests.scenario_model import Scenario, Stage, UserGroup

# Users spawned per *virtual* second when a stage names no spawn rate: effectively at once.
INSTANT_SPAWN = 1_000_000.0


@dataclass(frozen=True, slots=True)
class StageAt:
    """The stage active at a time: its index, the stage, and its start (virtual seconds)."""

    index: int
    stage: Stage
    start_s: float


def stage_at(stages: Sequence[Stage], t: float) -> StageAt | None:
    """The stage running at virtual time ``t`` since the group started, None after the last."""
    start = 0.0
    for index, stage in enumerate(stages):
        if t < start + stage.duration_s:
            return StageAt(index, stage, start)
        start += stage.duration_s
    return None


def stages_length(stages: Sequence[Stage]) -> float:
    """Total virtual seconds of ``stages``."""
    return sum(s.duration_s for s in stages)


def next_gap(rate_per_s: float, arrival: str, burstiness: float, rng: random.Random) -> float:
    """Virtual seconds to the next open-loop arrival at ``rate_per_s``.

    ``constant`` spaces arrivals evenly; ``poisson`` draws gamma gaps of shape ``burstiness``
    and mean ``1/rate`` (burstiness 1 is a Poisson process, below 1 burstier, above 1 more
    regular), as vLLM's ``bench serve`` does. A rate of 0 gives ``inf``.
    """
    if rate_per_s <= 0:
        return math.inf
    if arrival == "constant":
        return 1.0 / rate_per_s
    return rng.gammavariate(burstiness, 1.0 / (rate_per_s * burstiness))


def arrivals(
    stages: Sequence[Stage],
    arrival: str,
    burstiness: float,
    rng: random.Random,
    share: float = 1.0,
) -> Iterator[tuple[float, str]]:
    """Open-loop arrival times (virtual s from the group's start) with their stage names.

    ``share`` scales every stage's ``rate_per_s`` (a process generates its share of the total).
    """
    t = 0.0
    while True:
        at = stage_at(stages, t)
        if at is None:
            return
        rate = (at.stage.rate_per_s or 0.0) * share
        gap = next_gap(rate, arrival, burstiness, rng)
        end = at.start_s + at.stage.duration_s
        if t + gap >= end:
            # no arrival left in this stage: start the next stage's clock at its beginning
            t = end
            continue
        t += gap
        yield t, at.stage.name


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One request of a trace: when (virtual s from start), prompt and output sizes (tokens)."""

    t_s: float
    prompt_tokens: int
    max_tokens: int


class TraceError(ValueError):
    """A trace file is unreadable; the message names the file and line."""


def read_trace(path: str | Path) -> list[TraceRow]:
    """Rows of a CSV trace with columns ``t_s, prompt_tokens`` and ``max_tokens`` (or
    ``output_tokens``), sorted by time."""
    rows: list[TraceRow] = []
    # utf-8-sig: a byte order mark (Excel writes one) is not part of the first column name
    with Path(path).open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        for n, raw in enumerate(reader, start=2):
            try:
                out = raw.get("max_tokens") or raw.get("output_tokens") or "0"
                row = TraceRow(float(raw["t_s"]), int(float(raw["prompt_tokens"])),
                               int(float(out)))
            except (KeyError, TypeError, ValueError) as exc:
                raise TraceError(f"{path}:{n}: expected t_s, prompt_tokens, max_tokens") from exc
            # float() reads "nan" and "inf": a request at no time, or never, is no request
            if not (math.isfinite(row.t_s) and row.t_s >= 0):
                raise TraceError(f"{path}:{n}: t_s: expected seconds >= 0, got {raw['t_s']}")
            if row.prompt_tokens < 0 or row.max_tokens < 0:
                raise TraceError(f"{path}:{n}: expected token counts >= 0")
            rows.append(row)
    rows.sort(key=lambda r: r.t_s)
    return rows


@dataclass(frozen=True, slots=True)
class Tick:
    """What the shape asks for now: closed-loop users per group, and the spawn rate (per wall s)."""

    users: dict[str, int]
    spawn_rate: float
    stage: str | None


class LoadPlan:
    """The scenario's load over virtual time: closed-loop users per stage, and when it ends.

    Fixed users (a batch-job user and an arrival generator per open or trace group, per slot)
    are counted in :meth:`fixed_users`; closed groups follow their stages. The run ends at
    ``duration_s``, or earlier once every group's stages are over and the batch job is done.
    """

    def __init__(self, scenario: Scenario, slots: int = 1) -> None:
        self.scenario = scenario
        self.slots = slots
        self.groups: tuple[UserGroup, ...] = scenario.load.users
        self.closed = tuple(g for g in self.groups if g.mode == "closed")
        self.has_batch = scenario.load.batch is not None and bool(scenario.load.batch.arms)

    def fixed_users(self) -> int:
        """Users that run for the whole test: batch slots and one generator per open/trace group."""
        generators = sum(1 for g in self.groups if g.mode != "closed")
        return self.slots * ((1 if self.has_batch else 0) + generators)

    def group_length_s(self, group: UserGroup) -> float:
        """Virtual seconds a group is active (a trace: until its last row)."""
        if group.mode == "trace":
            if group.trace is None:
                return 0.0
            rows = read_trace(group.trace)
            return rows[-1].t_s if rows else 0.0
        return stages_length(group.stages)

    def interactive_length_s(self) -> float:
        """Virtual seconds until every user group is done (0 with none)."""
        return max((self.group_length_s(g) for g in self.groups), default=0.0)

    def tick(self, t: float, batch_done: bool) -> Tick | None:
        """Users wanted at virtual time ``t`` (None: the test is over)."""
        if t >= self.scenario.duration_s:
            return None
        interactive_over = t >= self.interactive_length_s()
        if interactive_over and (batch_done or not self.has_batch):
            return None
        users: dict[str, int] = {}
        spawn = INSTANT_SPAWN
        stage_name: str | None = None
        for group in self.closed:
            at = stage_at(group.stages, t)
            users[group.name] = 0 if at is None else int(at.stage.users or 0)
            if at is not None:
                stage_name = stage_name or at.stage.name
                if at.stage.spawn_rate:
                    spawn = min(spawn, at.stage.spawn_rate)
        # spawn rates are per virtual second; Locust counts wall seconds
        return Tick(users, spawn * self.scenario.time_scale, stage_name)

    def stage_name(self, group: UserGroup, t: float) -> str | None:
        """The name of ``group``'s stage at virtual time ``t`` (None after the last)."""
        at = stage_at(group.stages, t)
        return None if at is None else at.stage.name


@dataclass(slots=True)
class Settle:
    """Whether a count has stopped moving: unchanged for ``quiet_s`` seconds, or ``max_s``
    seconds since the first look (any clock; the shape uses wall seconds).

    The shape ends a run only once Locust's request count has settled, so that the requests
    still in flight when the load ends reach Locust's statistics before it writes its CSV
    (rewritten every second) and HTML reports.
    """

    quiet_s: float
    max_s: float
    _start: float | None = None
    _changed: float = 0.0
    _count: int = 0

    def settled(self, now: float, count: int) -> bool:
        """Look at ``count`` at time ``now``; True once it has been still long enough."""
        if self._start is None:
            self._start, self._changed, self._count = now, now, count
            return False
        if count != self._count:
            self._changed, self._count = now, count
        return now - self._changed >= self.quiet_s or now - self._start >= self.max_s
