"""Gateway configuration: frozen dataclasses parsed once, errors naming file and key path.

Rates are per virtual minute, durations virtual seconds (``time_scale`` compresses them
as in docs/conventions.md), sizes bytes, tokens by the ratelab tokenizer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType

from batchclient.config import (
    DEFAULT_INSTRUCTIONS,
    BreakerSettings,
    Price,
    StreamSettings,
    read_prices,
)
from batchclient.configreader import ConfigError, Reader, load_yaml

LANES: tuple[str, ...] = ("interactive", "background")


@dataclass(frozen=True, slots=True)
class Upstream:
    """One provider the gateway calls with its shared key; ``rpm``/``tpm`` are the limits
    the gateway enforces for that key (None: learned from the provider's rate-limit headers).
    ``failover_on_429``: while this key is rate limited (a 429, or its window at the
    gateway is full) calls go to the next upstream instead of waiting. ``prices`` (USD per
    million tokens, per model) price calls when the provider sends no charge header;
    ``low_balance_usd``: the balance the provider reports under which the gateway warns.
    ``reserve_max_tokens`` tells whether the provider counts ``max_tokens`` against TPM at
    admission (``tpm_counting: reserve_max_tokens``, the default) or only actual usage
    (``actual``), as the batching client's ``tpm_counting``; ``share`` is the part of the
    key's limits the gateway processes may use together (lower than 1 when other clients
    use the key too); with Redis each process takes an even part of it."""

    name: str
    base_url: str
    api_key: str
    models: tuple[str, ...] = ("gpt-4o-mini",)
    rpm: int | None = None
    tpm: int | None = None
    failover_on_429: bool = False
    prices: Mapping[str, Price] = field(default_factory=dict)
    low_balance_usd: float | None = None
    reserve_max_tokens: bool = True
    share: float = 1.0


@dataclass(frozen=True, slots=True)
class TierLimits:
    """A pricing tier: requests per minute (bucket of ``burst`` requests), tokens per day."""

    rpm: float | None = 10.0
    tokens_per_day: int | None = 100_000
    burst: float | None = None

    @property
    def capacity(self) -> float | None:
        """Requests the bucket holds when full (``burst``, else one minute's worth)."""
        return self.burst if self.burst is not None else self.rpm


@dataclass(frozen=True, slots=True)
class LaneSettings:
    """Interactive-lane protection: ``reserved_workers`` never take background work and the
    background lane plans at most ``background_ceiling`` of the provider window;
    ``interactive_p95_budget_s`` is the latency target the benchmark checks."""

    interactive_p95_budget_s: float = 2.0
    reserved_workers: int = 2
    background_ceiling: float = 0.8
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class BatchingSettings:
    """Semantic batching of ``item``-form background tasks: up to ``max_items`` per
    request, ``labels`` code -> name, a shared ``system_prompt``; ``cache``: an item
    answered once (same normalised text, task and model) is answered from the cache."""

    enabled: bool = True
    max_items: int = 20
    token_budget: int = 16000
    max_misses: int = 3
    system_prompt: str = "You classify short texts."
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType(
        {c: c for c in "ABCDEFGH"}))
    instructions: str = DEFAULT_INSTRUCTIONS
    cache: bool = True


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The whole gateway: upstreams (in failover order), tiers, users, lanes, workers.

    ``lease_s`` is how long a running task stays leased before another worker may take it
    again (longer than any call); ``window_margin_s`` keeps a call in the gateway's provider
    window that much past 60 s, since the provider admitted it a little after we sent it.
    ``probe_s``: an upstream that refused for its balance or key (402, 401) is out of the
    rotation that long before one call probes it again.
    """

    upstreams: tuple[Upstream, ...]
    tiers: Mapping[str, TierLimits]
    default_tier: str
    users: Mapping[str, str] = field(default_factory=dict)
    lanes: LaneSettings = LaneSettings()
    workers: int = 8
    batching: BatchingSettings = BatchingSettings()
    time_scale: float = 1.0
    max_body_bytes: int = 1024 * 1024
    lease_s: float = 300.0
    max_attempts: int = 5
    request_timeout_s: float = 120.0
    default_max_tokens: int = 256
    db_path: str = "gateway.db"
    window_margin_s: float = 1.0
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    probe_s: float = 60.0
    # the batching client's streaming watchdog over every streamed task (a task streams
    # when its body asks, so ``enabled`` is always true here)
    stream: StreamSettings = field(default_factory=lambda: StreamSettings(enabled=True))

    @property
    def upstream(self) -> Upstream:
        """The primary provider (the first in failover order); its first model is the
        default model."""
        return self.upstreams[0]

    @property
    def models(self) -> tuple[str, ...]:
        """Every model some upstream serves, in configuration order."""
        return tuple(dict.fromkeys(m for u in self.upstreams for m in u.models))

    def tier_of(self, user: str) -> str:
        """The tier name of ``user`` (the default tier when unlisted)."""
        return self.users.get(user, self.default_tier)


DEFAULT_TIERS: Mapping[str, TierLimits] = MappingProxyType({
    "free": TierLimits(rpm=10, tokens_per_day=100_000),
    "pro": TierLimits(rpm=60, tokens_per_day=1_000_000),
    "enterprise": TierLimits(rpm=600, tokens_per_day=None),
})


def default_config(base_url: str = "http://127.0.0.1:8000/v1", api_key: str = "sk-ratelab",
                   **changes: object) -> GatewayConfig:
    """The documented defaults in front of one provider (the simulator's default key)."""
    cfg = GatewayConfig(upstreams=(Upstream("default", base_url, api_key),),
                        tiers=DEFAULT_TIERS, default_tier="free")
    return replace(cfg, **changes) if changes else cfg  # type: ignore[arg-type]


def _upstream(r: Reader) -> Upstream:
    key = r.raw("api_key")
    env = r.raw("api_key_env")
    if env is not None:
        if not isinstance(env, str) or not env:
            raise r.fail("api_key_env", "the name of an environment variable")
        if env not in os.environ:
            raise ConfigError(f"{r.source}: {r.key('api_key_env')}: environment variable "
                              f"{env!r} is not set")
        key = os.environ[env]
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{r.source}: {r.key('api_key')}: expected a non-empty string "
                          "(or api_key_env naming a variable)")
    models = r.raw("models")
    if models is None:
        models = ["gpt-4o-mini"]
    if not isinstance(models, list) or not models or not all(
            isinstance(m, str) and m for m in models):
        raise r.fail("models", "a non-empty list of model names")
    base_url = r.str_("base_url").rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise r.fail("base_url", "an http(s) URL")
    counting = r.choice("tpm_counting", "reserve_max_tokens", ("reserve_max_tokens", "actual"))
    up = Upstream(r.str_("name", "default"), base_url, key, tuple(models),
                  r.opt_int("rpm"), r.opt_int("tpm"), r.bool_("failover_on_429", False),
                  prices=MappingProxyType(read_prices(r)),
                  low_balance_usd=r.opt_float("low_balance_usd"),
                  reserve_max_tokens=counting == "reserve_max_tokens",
                  share=r.float_("share", 1.0, 1e-6))
    if up.share > 1.0:
        raise r.fail("share", "a fraction of the key's limits, at most 1")
    r.finish()
    return up


def _tier(r: Reader) -> TierLimits:
    rpm = r.opt_float("rpm")
    burst = r.opt_float("burst")
    for name, value in (("rpm", rpm), ("burst", burst)):
        if value is not None and value <= 0:
            raise r.fail(name, "a number > 0")
    tier = TierLimits(rpm, r.opt_int("tokens_per_day"), burst)
    r.finish()
    return tier


def parse_config(data: object, source: str) -> GatewayConfig:
    """Parse a gateway configuration mapping; ``source`` names the file in errors."""
    r = Reader(data, source, "")
    ups_raw = r.raw("upstreams")
    if not isinstance(ups_raw, list) or not ups_raw:
        raise r.fail("upstreams", "a non-empty list of provider mappings")
    upstreams = tuple(_upstream(Reader(u, source, f"upstreams[{i}]"))
                      for i, u in enumerate(ups_raw))
    seen: set[str] = set()
    for i, up in enumerate(upstreams):
        if up.name in seen:
            raise ConfigError(f"{source}: upstreams[{i}].name: expected a name no other "
                              f"upstream has, got {up.name!r} again")
        seen.add(up.name)
    tiers_raw = r.raw("tiers")
    if tiers_raw is None:
        tiers: Mapping[str, TierLimits] = DEFAULT_TIERS
    else:
        if not isinstance(tiers_raw, dict) or not tiers_raw:
            raise r.fail("tiers", "a mapping of tier name to limits")
        tiers = MappingProxyType({str(name): _tier(r.child("tiers").child(str(name)))
                                  for name in tiers_raw})
    default_tier = r.str_("default_tier", next(iter(tiers)))
    if default_tier not in tiers:
        raise r.fail("default_tier", "one of " + ", ".join(tiers))
    users_raw = r.raw("users") or {}
    if not isinstance(users_raw, dict):
        raise r.fail("users", "a mapping of user id to tier name")
    for user, tier in users_raw.items():
        if tier not in tiers:
            raise ConfigError(f"{source}: users.{user}: expected one of {', '.join(tiers)}, "
                              f"got {tier!r}")
    users = MappingProxyType({str(u): str(t) for u, t in users_raw.items()})
    workers = r.int_("workers", 8, 1)
    lr = r.child("lanes")
    lanes = LaneSettings(
        lr.float_("interactive_p95_budget_s", 2.0), lr.int_("reserved_workers", 2, 0),
        lr.float_("background_ceiling", 0.8), lr.bool_("enabled", True))
    if lanes.background_ceiling > 1:
        raise lr.fail("background_ceiling", "a fraction in [0, 1]")
    if lanes.reserved_workers >= workers:
        raise lr.fail("reserved_workers", f"fewer than workers ({workers})")
    lr.finish()
    br = r.child("batching")
    labels_raw = br.raw("labels")
    labels: Mapping[str, str] = BatchingSettings().labels
    if labels_raw is not None:
        if isinstance(labels_raw, list) and labels_raw:
            labels = MappingProxyType({str(c): str(c) for c in labels_raw})
        elif isinstance(labels_raw, dict) and labels_raw:
            labels = MappingProxyType({str(c): str(n) for c, n in labels_raw.items()})
        else:
            raise br.fail("labels", "a list of codes or a mapping code -> label")
    batching = BatchingSettings(
        br.bool_("enabled", True), br.int_("max_items", 20, 1), br.int_("token_budget", 16000, 1),
        br.int_("max_misses", 3, 1), br.str_("system_prompt", "You classify short texts."),
        labels, br.str_("instructions", DEFAULT_INSTRUCTIONS), br.bool_("cache", True))
    br.finish()
    kr = r.child("breaker")
    breaker = BreakerSettings(kr.int_("failures", 5, 1), kr.float_("cooldown_s", 30.0, 1e-9))
    kr.finish()
    sr = r.child("stream")
    stream = StreamSettings(
        enabled=True, first_token_s=sr.float_("first_token_s", 5.0, 1e-9),
        loop_min_period=sr.int_("loop_min_period", 8, 1),
        loop_repeats=sr.int_("loop_repeats", 4, 2))
    sr.finish()
    cfg = GatewayConfig(
        upstreams=upstreams, tiers=tiers, default_tier=default_tier, users=users, lanes=lanes,
        workers=workers, batching=batching,
        time_scale=r.float_("time_scale", 1.0, 1e-9),
        max_body_bytes=r.int_("max_body_bytes", 1024 * 1024, 1),
        lease_s=r.float_("lease_s", 300.0, 1e-9),
        max_attempts=r.int_("max_attempts", 5, 1),
        request_timeout_s=r.float_("request_timeout_s", 120.0, 1e-9),
        default_max_tokens=r.int_("default_max_tokens", 256, 1),
        db_path=r.str_("db_path", "gateway.db"),
        window_margin_s=r.float_("window_margin_s", 1.0),
        breaker=breaker,
        probe_s=r.float_("probe_s", 60.0, 1e-9),
        stream=stream,
    )
    r.finish()
    return cfg


def load_config(path: str | Path) -> GatewayConfig:
    """Read a YAML gateway configuration (``yaml.safe_load``) and parse it."""
    return parse_config(load_yaml(path), str(path))
