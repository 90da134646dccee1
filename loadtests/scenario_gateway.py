"""The scenario's ``gateway:`` section: a ratelab gateway in front of a simulated provider.

The section mixes harness keys (which provider, Redis and process count, how users are
spread over tiers, how they wait for results, the background job) with the gateway's own
configuration keys (``tiers``, ``lanes``, ``workers``, ``batching``, ...), which are handed
to ``gateway.config.parse_config`` so a bad key is reported with the scenario's file and
line. ``upstreams`` and ``time_scale`` come from the scenario, never from the section.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from loadtests.scenario_schema import KeyPath, LineMap, Problem

HARNESS_KEYS: tuple[str, ...] = (
    "provider", "redis", "processes", "results", "poll_s", "tasks_per_visit", "user_tiers",
    "background",
)
OWNED_BY_SCENARIO: tuple[str, ...] = ("upstreams", "time_scale", "db_path", "users")
# How a caller waits for its result: polling GET /v1/tasks/{id} every poll_s, or
# subscribing to GET /v1/tasks/{id}/events (SSE) until the final state arrives.
RESULT_MODES: tuple[str, ...] = ("poll", "subscribe")
JOB_USER = "batch-job"
GATEWAY_FILE = "gateway.json"     # in the run folder: the gateway URLs for the users
TASKS_GLOB = "gateway-*.jsonl"    # in the run folder: the users' task lines


@dataclass(frozen=True, slots=True)
class BackgroundJob:
    """Item tasks one user submits to the background lane at ``rate_per_s`` (virtual)."""

    items: int
    user: str = JOB_USER
    tier: str | None = None
    rate_per_s: float = 50.0


@dataclass(frozen=True, slots=True)
class GatewaySection:
    """The parsed ``gateway:`` section; ``config`` is the gateway's mapping without upstreams
    (see :func:`gateway_mapping`), ``user_tiers`` the tier weights of user ids ``u0..``,
    ``results`` the weights of the result modes (``poll``, ``subscribe``) over the users."""

    provider: str
    config: Mapping[str, Any]
    user_tiers: tuple[tuple[str, int], ...]
    redis: bool = False
    processes: int = 1
    results: tuple[tuple[str, float], ...] = (("poll", 1.0),)
    poll_s: float = 2.0
    tasks_per_visit: int = 1
    background: BackgroundJob | None = None
    tiers: tuple[str, ...] = field(default=())


def tier_for(index: int, weights: tuple[tuple[str, int], ...]) -> str:
    """The tier of user ``u<index>``: weights laid out over ``index mod sum(weights)``."""
    total = sum(w for _, w in weights)
    at = index % total
    for tier, weight in weights:
        if at < weight:
            return tier
        at -= weight
    return weights[-1][0]


def result_mode_for(index: int, weights: tuple[tuple[str, float], ...]) -> str:
    """How user ``u<index>`` waits for results. The golden-ratio sequence spreads the modes
    evenly over any run of consecutive users, so every tier (laid out in blocks by
    :func:`tier_for`) gets its share of each mode."""
    total = sum(w for _, w in weights)
    at = ((index * 0.6180339887498949) % 1.0) * total
    for mode, weight in weights:
        if at < weight:
            return mode
        at -= weight
    return weights[-1][0]


def user_tier_map(section: GatewaySection, user_ids: int) -> dict[str, str]:
    """``users:`` of the gateway configuration: ``u0..u<user_ids-1>`` and the job's user."""
    users = {f"u{i}": tier_for(i, section.user_tiers) for i in range(user_ids)}
    if section.background is not None and section.background.tier is not None:
        users[section.background.user] = section.background.tier
    return users


def gateway_mapping(section: GatewaySection, *, base_url: str, api_key_env: str | None = None,
                    api_key: str | None = None, rpm: int | None, tpm: int | None,
                    model: str, time_scale: float, user_ids: int,
                    tpm_counting: str | None = None) -> dict[str, Any]:
    """The full gateway configuration mapping (``parse_config`` input) for this run;
    ``tpm_counting`` is the provider's counting mode (the gateway's default: None)."""
    upstream: dict[str, Any] = {"name": section.provider, "base_url": base_url,
                                "models": [model], "rpm": rpm, "tpm": tpm}
    if tpm_counting is not None:
        upstream["tpm_counting"] = tpm_counting
    if api_key_env is not None:
        upstream["api_key_env"] = api_key_env
    else:
        upstream["api_key"] = api_key
    return {**_plain(section.config), "upstreams": [upstream], "time_scale": time_scale,
            "users": user_tier_map(section, user_ids)}


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def parse_gateway(raw: Any, lines: LineMap, providers: tuple[str, ...], source: str
                  ) -> tuple[list[Problem], GatewaySection | None]:
    """Check and parse the ``gateway:`` mapping; the gateway keys go through the gateway's
    own ``parse_config`` (a stand-in upstream), its errors located in the scenario."""
    here: KeyPath = ("gateway",)
    problems: list[Problem] = []

    def bad(key: str | tuple[str, ...], message: str) -> None:
        path = (key,) if isinstance(key, str) else key
        problems.append(lines.problem((*here, *path), message))

    if not isinstance(raw, Mapping):
        return [lines.problem(here, "expected a mapping")], None
    for key in OWNED_BY_SCENARIO:
        if key in raw:
            bad(key, "set by the harness (the scenario's provider, time_scale and "
                     "user_tiers); remove it")
    provider = raw.get("provider", providers[0] if providers else "")
    if provider not in providers:
        bad("provider", f"no provider {provider!r}; known: {', '.join(providers) or 'none'}")
    redis = raw.get("redis", False)
    if not isinstance(redis, bool):
        bad("redis", f"expected true or false, got {redis!r}")
    processes = raw.get("processes", 1)
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        bad("processes", f"expected an integer >= 1, got {processes!r}")
    elif processes > 1 and redis is not True:
        bad("processes", "several gateway processes share state through Redis: "
                         "set redis: true")
    results = _results(raw.get("results", "poll"), bad)
    poll_s = raw.get("poll_s", 2.0)
    if not _number(poll_s) or poll_s <= 0:
        bad("poll_s", f"expected a number > 0 (virtual seconds), got {poll_s!r}")
    per_visit = raw.get("tasks_per_visit", 1)
    if not isinstance(per_visit, int) or isinstance(per_visit, bool) or per_visit < 1:
        bad("tasks_per_visit", f"expected an integer >= 1, got {per_visit!r}")
    config = {k: v for k, v in raw.items() if k not in HARNESS_KEYS + OWNED_BY_SCENARIO}
    tiers = _check_config(config, lines, source, problems)
    weights = _user_tiers(raw.get("user_tiers"), tiers, lines, problems)
    background = _background(raw.get("background"), tiers, lines, problems)
    if problems:
        return problems, None
    return [], GatewaySection(
        provider=str(provider), config=MappingProxyType(config), user_tiers=weights,
        redis=bool(redis), processes=int(processes), results=results,
        poll_s=float(poll_s), tasks_per_visit=int(per_visit), background=background,
        tiers=tiers)


def _results(raw: Any, bad: Any) -> tuple[tuple[str, float], ...]:
    """``poll``, ``subscribe``, or a mapping of the two to weights (``{poll: 1,
    subscribe: 1}``: half the users each)."""
    modes = ", ".join(RESULT_MODES)
    if isinstance(raw, str):
        if raw not in RESULT_MODES:
            bad("results", f"expected one of {modes} or a mapping of them to weights, "
                           f"got {raw!r}")
            return ()
        return ((raw, 1.0),)
    if not isinstance(raw, Mapping) or not raw:
        bad("results", f"expected one of {modes} or a mapping of them to weights "
                       "(e.g. {poll: 1, subscribe: 1})")
        return ()
    out = []
    valid = True
    for mode, weight in raw.items():
        if mode not in RESULT_MODES:
            bad(("results", str(mode)), f"expected one of {modes}, got {mode!r}")
            valid = False
        elif not _number(weight) or weight < 0:
            bad(("results", str(mode)), f"expected a weight >= 0, got {weight!r}")
            valid = False
        elif weight > 0:
            out.append((str(mode), float(weight)))
    if valid and not out:
        bad("results", "expected at least one mode with a weight > 0")
    return tuple(out)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(config: Mapping[str, Any], lines: LineMap, source: str,
                  problems: list[Problem]) -> tuple[str, ...]:
    """Run the gateway's parse_config on the section's gateway keys; the tier names."""
    from batchclient.configreader import ConfigError
    from gateway.config import parse_config
    from loadtests.scenario_checks import _split_error

    probe = {**_plain(config), "upstreams": [{"base_url": "http://127.0.0.1:1/v1",
                                              "api_key": "sk-check"}]}
    try:
        parsed = parse_config(probe, source)
    except ConfigError as exc:
        path, message = _split_error(str(exc), source)
        problems.append(lines.problem(("gateway", *path), message))
        return ()
    return tuple(parsed.tiers)


def _user_tiers(raw: Any, tiers: tuple[str, ...], lines: LineMap,
                problems: list[Problem]) -> tuple[tuple[str, int], ...]:
    here: KeyPath = ("gateway", "user_tiers")
    if raw is None:
        return ((tiers[0] if tiers else "free", 1),)
    if not isinstance(raw, Mapping) or not raw:
        problems.append(lines.problem(here, "expected a mapping of tier name to weight "
                                            "(e.g. {free: 70, pro: 25, enterprise: 5})"))
        return ()
    out: list[tuple[str, int]] = []
    for tier, weight in raw.items():
        if tiers and tier not in tiers:
            problems.append(lines.problem((*here, str(tier)),
                                          f"no tier {tier!r}; known: {', '.join(tiers)}"))
        elif not isinstance(weight, int) or isinstance(weight, bool) or weight < 1:
            problems.append(lines.problem((*here, str(tier)),
                                          f"expected an integer weight >= 1, got {weight!r}"))
        else:
            out.append((str(tier), weight))
    return tuple(out)


def _background(raw: Any, tiers: tuple[str, ...], lines: LineMap,
                problems: list[Problem]) -> BackgroundJob | None:
    here: KeyPath = ("gateway", "background")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        problems.append(lines.problem(here, "expected a mapping (items, user, tier, rate_per_s)"))
        return None
    allowed = ("items", "user", "tier", "rate_per_s")
    for key in raw:
        if key not in allowed:
            problems.append(lines.problem((*here, str(key)),
                                          f"unknown key; allowed: {', '.join(allowed)}"))
    items = raw.get("items")
    if not isinstance(items, int) or isinstance(items, bool) or items < 1:
        problems.append(lines.problem((*here, "items"), f"expected an integer >= 1, got {items!r}"))
        items = 1
    user = raw.get("user", JOB_USER)
    if not isinstance(user, str) or not user:
        problems.append(lines.problem((*here, "user"), "expected a non-empty user id"))
    tier = raw.get("tier")
    if tier is not None and tiers and tier not in tiers:
        problems.append(lines.problem((*here, "tier"),
                                      f"no tier {tier!r}; known: {', '.join(tiers)}"))
    rate = raw.get("rate_per_s", 50.0)
    if not _number(rate) or rate <= 0:
        problems.append(lines.problem((*here, "rate_per_s"),
                                      f"expected a number > 0 (items per virtual second), "
                                      f"got {rate!r}"))
        rate = 1.0
    return BackgroundJob(int(items), str(user), tier, float(rate))
