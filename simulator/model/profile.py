"""The frozen dataclasses of a simulator configuration (parsed by ``config.py``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

ALGORITHMS = ("sliding", "token_bucket", "fixed")
COUNTING = ("reserve", "actual", "max_estimate", "azure")
HEADER_STYLES = ("openai", "anthropic", "none")
MONEY_STYLES = ("402", "openai", "anthropic")
RESPONDERS = ("lorem", "echo", "batch_json")
DIST_KINDS = ("constant", "normal", "lognormal", "uniform", "empirical")
DEFAULT_CODES = ("A", "B", "C", "D", "E", "F", "G", "H")
# z-score of the 99th percentile of the standard normal
Z99 = 2.3263478740408408


@dataclass(frozen=True, slots=True)
class Dist:
    """A seeded distribution of non-negative values (seconds or tokens, per the key naming it)."""

    kind: str = "constant"
    value: float = 0.0  # constant
    mean: float = 0.0  # normal
    std: float = 0.0
    mu: float = 0.0  # lognormal: ln(median)
    sigma: float = 0.0  # lognormal: (ln(p99) - ln(median)) / z99
    low: float = 0.0  # uniform
    high: float = 0.0
    values: tuple[float, ...] = ()  # empirical

    @staticmethod
    def constant(value: float) -> Dist:
        """A distribution that always yields ``value``."""
        return Dist("constant", value=value)

    @staticmethod
    def lognormal(median: float, p99: float) -> Dist:
        """A lognormal distribution given by its median and 99th percentile."""
        mu = math.log(median)
        return Dist("lognormal", mu=mu, sigma=(math.log(p99) - mu) / Z99)

    @property
    def is_zero(self) -> bool:
        """True for the constant 0 (lets the hot path skip sampling)."""
        return self.kind == "constant" and self.value == 0.0


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """Rate limits of one key on one model; rates are per minute, windows in seconds."""

    algorithm: str = "sliding"  # sliding | token_bucket | fixed
    window_s: float = 60.0  # window (or bucket refill period) of the token limits
    request_window_s: float | None = None  # RPM judged over this sub-window (1 s, 10 s)
    rpm: int | None = None
    tpm: int | None = None
    input_tpm: int | None = None
    output_tpm: int | None = None
    concurrency: int | None = None
    tokens_per_day: int | None = None
    counting: str = "reserve"  # reserve | actual | max_estimate | azure
    default_max_tokens: int = 15  # what `reserve` charges when max_tokens is absent (cookbook)


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """A served model: kind, context window, prices in USD per million tokens."""

    name: str
    kind: str = "chat"  # chat | embeddings
    context_window: int = 128_000
    max_output_tokens: int = 16_384
    input_usd_per_mtok: float = 0.0
    output_usd_per_mtok: float = 0.0
    dims: int = 1536
    owned_by: str = "ratelab"


@dataclass(frozen=True, slots=True)
class KeyProfile:
    """A tenant: API key, organization, prepaid balance (None = unlimited), limits per model."""

    key: str
    organization: str
    balance_usd: float | None
    limits: Mapping[str, LimitSpec]


@dataclass(frozen=True, slots=True)
class BillingSpec:
    """Prepaid billing: default balance, charge headers, cost cap, how exhaustion answers."""

    balance_usd: float | None = None  # default balance of every key; None = unlimited
    charge_headers: bool = True  # X-MDB-Charged-USD / X-MDB-Balance-USD on billed replies
    cost_cap_usd: float | None = None  # refuse (400) when prompt + max_tokens would cost more
    money_style: str = "402"  # 402 | openai (429 insufficient_quota) | anthropic (429 spend limit)
    refund_undelivered: bool = True  # on finish, refund completion tokens never delivered


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Self-hosted GPU: sequences in flight slow every token; beyond max_seqs requests queue."""

    max_seqs: int = 48  # sequences decoded at once; more wait FIFO for a slot
    knee_seqs: int = 32  # inter-token latency is flat up to this many sequences
    itl_growth_per_seq: float = 0.04  # fractional ITL increase per sequence above the knee
    max_queue: int | None = None  # queued requests beyond this get 503


@dataclass(frozen=True, slots=True)
class LatencySpec:
    """Time to first token and inter-token latency in virtual seconds."""

    ttft_s: Dist = field(default_factory=lambda: Dist.constant(0.0))
    itl_s: Dist = field(default_factory=lambda: Dist.constant(0.0))
    prefill_s_per_token: float = 0.0  # added to TTFT per prompt token
    embeddings_s: Dist = field(default_factory=lambda: Dist.constant(0.0))


@dataclass(frozen=True, slots=True)
class ResponderSpec:
    """How replies are synthesised, and the batch_json faults with their rates."""

    kind: str = "lorem"  # lorem | echo | batch_json
    output_tokens: Dist = field(default_factory=lambda: Dist.lognormal(60.0, 400.0))
    codes: tuple[str, ...] = DEFAULT_CODES
    drop_item_rate: float = 0.0  # per item
    invent_id_rate: float = 0.0  # per reply
    repeat_id_rate: float = 0.0  # per reply
    malformed_json_rate: float = 0.0  # per reply
    truncate_rate: float = 0.0  # per reply


@dataclass(frozen=True, slots=True)
class Outage:
    """A scheduled outage: every request in [start_s, end_s) virtual seconds gets ``status``."""

    start_s: float
    end_s: float
    status: int = 503


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """Random faults, each at its own rate per admitted chat request, and scheduled outages."""

    error_500_rate: float = 0.0
    error_503_rate: float = 0.0
    reset_rate: float = 0.0
    hold_rate: float = 0.0
    hold_s: float = 600.0
    slow_first_token_rate: float = 0.0
    slow_first_token_s: float = 30.0
    stall_rate: float = 0.0
    stall_s: float = 30.0
    repetition_rate: float = 0.0
    mid_stream_error_rate: float = 0.0
    outages: tuple[Outage, ...] = ()


@dataclass(frozen=True, slots=True)
class ProviderProfile:
    """One simulated provider: models, tenants, limits, billing, latency, responder, faults."""

    name: str
    models: tuple[ModelProfile, ...]
    keys: tuple[KeyProfile, ...]
    default_limits: Mapping[str, LimitSpec]  # per model, for keys that do not override
    header_style: str = "openai"
    organization: str = "org-ratelab"
    count_refused: bool = True  # refused requests (400 cap, 402, 429) still count against RPM
    count_5xx: bool = True  # random 500/503 count against RPM (never against tokens)
    accept_any_key: bool = False  # unknown keys become tenants on the default tier
    billing: BillingSpec = field(default_factory=BillingSpec)
    latency: LatencySpec = field(default_factory=LatencySpec)
    gpu: GpuSpec | None = None
    responder: ResponderSpec = field(default_factory=ResponderSpec)
    faults: FaultSpec = field(default_factory=FaultSpec)


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Everything one simulator process serves; the first provider is also served at /v1."""

    providers: tuple[ProviderProfile, ...]
    admin_token: str = "ratelab-admin"
    time_scale: float = 1.0
    seed: int = 0
    max_body_bytes: int = 4 * 1024 * 1024
