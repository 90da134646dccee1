"""The scenario as frozen dataclasses: what ``load_scenario`` returns and runners read.

Times are virtual seconds, rates per virtual second unless the name says otherwise, sizes in
ratelab tokens (conventions.md). Provider and client sections stay plain mappings here: the
simulator's ``parse_provider`` and the client's ``parse_client_config`` own their meaning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return EMPTY


@dataclass(frozen=True, slots=True)
class Size:
    """A token-size distribution (tokens): constant, uniform, normal, lognormal or empirical."""

    dist: str = "constant"
    value: int = 0
    min: int | None = None
    max: int | None = None
    mean: float = 0.0
    sd: float = 0.0
    median: float = 0.0
    p99: float = 0.0
    values: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()

    def expected(self) -> float:
        """The distribution's mean in tokens (before clipping), used by the throughput bound."""
        if self.dist == "constant":
            return float(self.value)
        if self.dist == "uniform":
            return ((self.min or 0) + (self.max or 0)) / 2
        if self.dist == "normal":
            return self.mean
        if self.dist == "lognormal":
            import math

            sigma = math.log(self.p99 / self.median) / 2.3263478740408408
            return self.median * math.exp(sigma * sigma / 2)
        weights = self.weights or tuple(1.0 for _ in self.values)
        return sum(v * w for v, w in zip(self.values, weights, strict=True)) / sum(weights)


@dataclass(frozen=True, slots=True)
class ProviderSpec:
    """One provider: its name, where it came from, and the merged mapping for the simulator."""

    name: str
    source: str
    data: Mapping[str, Any]
    config: object | None = None  # the simulator's parsed provider, when the simulator is present


@dataclass(frozen=True, slots=True)
class Target:
    """An external OpenAI-compatible endpoint measured instead of the simulator."""

    base_url: str
    api_key_env: str
    model: str | None = None
    spend_cap_usd: float | None = None
    max_error_rate: float = 0.05
    prices: tuple[float, float] | None = None  # USD per million input, output tokens


@dataclass(frozen=True, slots=True)
class IdScheme:
    """How work item ids look: ``sequential`` digits from ``start``, ``prefixed`` or ``hex``."""

    scheme: str = "sequential"
    start: int = 1
    prefix: str = ""

    @property
    def unique(self) -> bool:
        """Whether distinct items always get distinct ids, canonical forms included (all-digit
        ids compare as numbers): numbers without leading zeros after one fixed prefix do;
        ``hex`` ids are 48-bit hashes, which can collide (about 1% at 2,000,000 items)."""
        return self.scheme != "hex"


DEFAULT_LABELS: tuple[tuple[str, str], ...] = tuple(
    (code, f"Category {code}") for code in "ABCDEFGH"
)


@dataclass(frozen=True, slots=True)
class Workload:
    """The work: item count, token sizes, system prompt, duplicate and poison rates, labels."""

    items: int
    project_items: int = 2_000_000
    project_deadline_s: float = 4 * 3600.0
    item_tokens: Size = field(default_factory=lambda: Size(value=15))
    reply_tokens_per_item: Size = field(default_factory=lambda: Size(value=5))
    system_prompt_tokens: int = 700
    duplicate_rate: float = 0.0
    poison_rate: float = 0.0
    labels: tuple[tuple[str, str], ...] = DEFAULT_LABELS
    ids: IdScheme = field(default_factory=IdScheme)
    prompt_tokens: Size = field(default_factory=lambda: Size(value=200))
    max_tokens: int = 256
    model: str | None = None


@dataclass(frozen=True, slots=True)
class Arm:
    """A client arm: strategy, providers in failover order, and client settings (verbatim)."""

    name: str
    strategy: str
    providers: tuple[str, ...]
    client: Mapping[str, Any] = field(default_factory=_empty)
    key: str | None = None
    keys: int = 1
    description: str = ""
    client_config: object | None = None  # parse_client_config's result, when the client is present
    # the model the arm asks a provider for where it is not the task's (a fallback that
    # serves another model), by provider name
    models: Mapping[str, str] = field(default_factory=_empty)


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage of a user group: ``users`` (closed) or ``rate_per_s`` (open loop)."""

    name: str
    duration_s: float
    users: int | None = None
    spawn_rate: float | None = None
    rate_per_s: float | None = None


@dataclass(frozen=True, slots=True)
class UserGroup:
    """Interactive users: closed loop (``users``/stages), open loop (rate, Poisson) or a trace."""

    name: str
    arm: str
    mode: str
    stages: tuple[Stage, ...] = ()
    think_s: float = 0.0
    arrival: str = "constant"
    burstiness: float = 1.0
    trace: Path | None = None
    prompt_tokens: Size | None = None
    max_tokens: int | None = None
    stream: bool | None = None  # None: as the arm's client.stream.enabled
    user_ids: int = 1
    per_user_rpm: float | None = None
    per_user_tokens_per_day: int | None = None


@dataclass(frozen=True, slots=True)
class BatchLoad:
    """One batch job over the workload's items, run by each named arm in turn or in parallel."""

    arms: tuple[str, ...]
    order: str = "sequential"
    items: int | None = None


@dataclass(frozen=True, slots=True)
class SloSearch:
    """Find the highest rate or user count whose ``metric`` percentile stays under a limit."""

    users: str
    metric: str
    threshold_ms: float
    variable: str = "users"
    percentile: float = 95.0
    start: float = 1.0
    max: float = 1024.0
    tolerance: float = 0.05
    step_duration_s: float = 60.0


@dataclass(frozen=True, slots=True)
class ErrorGuard:
    """Stop the run once the error rate passes ``max_error_rate`` after ``min_requests``."""

    max_error_rate: float = 0.5
    min_requests: int = 50


@dataclass(frozen=True, slots=True)
class TopUp:
    """An admin top-up of ``usd`` on ``provider``'s ``key`` at virtual time ``at_s``."""

    at_s: float
    provider: str
    key: str
    usd: float


@dataclass(frozen=True, slots=True)
class Load:
    """The load shape: a batch job, interactive user groups, or both at once."""

    batch: BatchLoad | None = None
    users: tuple[UserGroup, ...] = ()
    slo_search: SloSearch | None = None
    error_guard: ErrorGuard = field(default_factory=ErrorGuard)
    topups: tuple[TopUp, ...] = ()


THRESHOLD_KEYS: tuple[str, ...] = (
    "min_items_per_min",
    "min_requests_per_min",
    "max_429_rate",
    "max_error_rate",
    "min_efficiency",
    "max_cost_per_item_usd",
    "max_tokens_per_item",
    "min_items_per_request",
    "max_retry_amplification",
    "max_unrecovered_rate",
    "max_latency_p95_ms",
    "max_ttft_p95_ms",
    "max_dead_letter",
    "max_lost",
)


@dataclass(frozen=True, slots=True)
class Expect:
    """Thresholds for every arm (``all``), per arm, and gate tolerances per figure path."""

    all: Mapping[str, float] = field(default_factory=_empty)
    arms: Mapping[str, Mapping[str, float]] = field(default_factory=_empty)
    tolerances: Mapping[str, float] = field(default_factory=_empty)

    def for_arm(self, arm: str) -> dict[str, float]:
        """The thresholds that apply to ``arm`` (its own override the common ones)."""
        return {**self.all, **self.arms.get(arm, {})}


@dataclass(frozen=True, slots=True)
class Scenario:
    """A loaded, checked scenario; ``raw`` is the document with providers resolved."""

    name: str
    path: Path
    providers: tuple[ProviderSpec, ...]
    workload: Workload
    arms: tuple[Arm, ...]
    load: Load
    description: str = ""
    seed: int = 0
    time_scale: float = 1.0
    duration_s: float = 600.0
    target: Target | None = None
    expect: Expect = field(default_factory=Expect)
    sweep: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    raw: Mapping[str, Any] = field(default_factory=_empty)
    gateway: object | None = None  # loadtests.scenario_gateway.GatewaySection, when present

    def arm(self, name: str) -> Arm:
        """The arm called ``name`` (KeyError if none)."""
        for arm in self.arms:
            if arm.name == name:
                return arm
        raise KeyError(name)

    def provider(self, name: str) -> ProviderSpec:
        """The provider called ``name`` (KeyError if none)."""
        for provider in self.providers:
            if provider.name == name:
                return provider
        raise KeyError(name)
