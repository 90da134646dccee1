"""From a loaded scenario to the objects both clocks drive: provider profiles, task, client
configs, items and the throughput-bound inputs of each arm.

The live runner and the planner must build these the same way for their figures to agree;
this module is the planner's half of that contract (see docs/planner.md, "Assembly").
Token sizes are ratelab tokens, durations virtual seconds, prices USD per million tokens.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from batchclient.config import ClientConfig, ModelLimits, Price, ProviderSettings, Task
from batchclient.policy.wire import Item
from loadtests.bound import BoundInputs
from loadtests.scenario_model import Arm, Scenario
from loadtests.workload import WorkloadGenerator, system_prompt
from simulator.model.config import (
    Dist,
    KeyProfile,
    LimitSpec,
    ProviderProfile,
    SimulatorConfig,
)

__all__ = [
    "ArmSetup",
    "PlanError",
    "arm_setup",
    "bound_inputs",
    "items",
    "simulator_config",
    "task_for",
]

# base URL of a provider in the planner: nothing listens there, the virtual transport routes
PLAN_URL = "plan://{name}/v1"


class PlanError(ValueError):
    """A scenario (or a part of it) the planner cannot model; the message names the part."""


@dataclass(frozen=True, slots=True)
class ArmSetup:
    """What one arm needs: its client config (providers filled in) and each client provider's
    route (simulator provider name, API key)."""

    arm: Arm
    config: ClientConfig
    routes: Mapping[str, tuple[str, str]]


def _profile(scenario: Scenario, name: str) -> ProviderProfile:
    spec = scenario.provider(name)
    if not isinstance(spec.config, ProviderProfile):
        raise PlanError(f"providers.{name}: not parsed by the simulator's parse_provider")
    return spec.config


def _key(profile: ProviderProfile, arm: Arm) -> KeyProfile:
    if arm.key is not None:
        for key in profile.keys:
            if key.key == arm.key:
                return key
        if profile.accept_any_key:
            return KeyProfile(arm.key, profile.organization, profile.billing.balance_usd,
                              profile.default_limits)
        raise PlanError(f"arms.{arm.name}.key: {arm.key!r} is not a key of provider "
                        f"{profile.name!r}")
    if profile.keys:
        return profile.keys[0]
    return KeyProfile("sk-ratelab", profile.organization, profile.billing.balance_usd,
                      profile.default_limits)


def _extra_keys(base: KeyProfile, count: int) -> tuple[KeyProfile, ...]:
    """Keys 2..count of an arm that spreads its job over ``count`` keys (same tier)."""
    return tuple(dataclasses.replace(base, key=f"{base.key}-k{i}") for i in range(2, count + 1))


def simulator_config(scenario: Scenario) -> SimulatorConfig:
    """The simulator configuration of ``scenario``: its providers, plus the extra keys of
    arms with ``keys > 1``; seeded and time-scaled as the live simulator is."""
    profiles = {spec.name: _profile(scenario, spec.name) for spec in scenario.providers}
    for arm in scenario.arms:
        if arm.keys <= 1:
            continue
        for name in arm.providers:
            profile = profiles[name]
            base = _key(profile, arm)
            have = {k.key for k in profile.keys}
            added = tuple(k for k in _extra_keys(base, arm.keys) if k.key not in have)
            if base.key not in have:
                added = (base, *added)
            profiles[name] = dataclasses.replace(profile, keys=(*profile.keys, *added))
    return SimulatorConfig(
        providers=tuple(profiles[spec.name] for spec in scenario.providers),
        time_scale=scenario.time_scale,
        seed=scenario.seed,
    )


def task_model(scenario: Scenario, arm: Arm | None = None) -> str:
    """The model the job asks for: the workload's, else the first chat model of the arm's
    first provider."""
    if scenario.workload.model:
        return scenario.workload.model
    name = arm.providers[0] if arm is not None else scenario.providers[0].name
    for model in _profile(scenario, name).models:
        if model.kind == "chat":
            return model.name
    raise PlanError(f"providers.{name}.models: no chat model to send the job to")


def task_for(scenario: Scenario, arm: Arm | None = None) -> Task:
    """The classification task of the workload: padded system prompt, label codes, model."""
    workload = scenario.workload
    return Task(
        name=scenario.name,
        system_prompt=system_prompt(workload, scenario.seed),
        labels=dict(workload.labels),
        model=task_model(scenario, arm),
    )


def _limits(spec: LimitSpec) -> ModelLimits:
    return ModelLimits(tpm=spec.tpm, rpm=spec.rpm)


def arm_setup(scenario: Scenario, arm: Arm) -> ArmSetup:
    """The arm's client config with one provider entry per (provider, key) in failover order:
    the key's limits and the models' prices, as the client would be configured live."""
    config = arm.client_config
    if not isinstance(config, ClientConfig):
        raise PlanError(f"arms.{arm.name}.client: not parsed by batchclient's parse_client_config")
    model = task_model(scenario, arm)
    settings: list[ProviderSettings] = []
    routes: dict[str, tuple[str, str]] = {}
    for name in arm.providers:
        profile = _profile(scenario, name)
        base = _key(profile, arm)
        keys = (base, *_extra_keys(base, arm.keys))
        prices = {m.name: Price(m.input_usd_per_mtok, m.output_usd_per_mtok)
                  for m in profile.models}
        for index, key in enumerate(keys):
            client_name = name if index == 0 else f"{name}-k{index + 1}"
            limits = key.limits.get(model) or profile.default_limits.get(model) or LimitSpec()
            settings.append(ProviderSettings(
                name=client_name, base_url=PLAN_URL.format(name=client_name),
                api_key=key.key, time_scale=scenario.time_scale,
                limits=_limits(limits),
                model_limits={m: _limits(s) for m, s in key.limits.items()},
                reserve_max_tokens=limits.counting in ("reserve", "max_estimate"),
                prices=prices,
            ))
            routes[client_name] = (name, key.key)
    config = dataclasses.replace(config, providers=tuple(settings),
                                 time_scale=scenario.time_scale, seed=scenario.seed)
    return ArmSetup(arm, config, routes)


def items(scenario: Scenario, count: int | None = None) -> Iterator[Item]:
    """The job's items, lazily, as the client receives them (id and text)."""
    generator = WorkloadGenerator(scenario.workload, scenario.seed, count)
    for ids, texts in generator.pages():
        yield from map(Item, ids, texts)


class ItemPages:
    """The job's items as ids and texts (parallel lists), taken any number at a time:
    the planner's feed hands pages to ``Engine.add_page`` without an item object or a
    generator step per item. Iterating gives the same items as ``items``."""

    __slots__ = ("_ids", "_pages", "_pos", "_texts", "unique_ids")

    def __init__(self, scenario: Scenario, count: int | None = None) -> None:
        self._pages = WorkloadGenerator(scenario.workload, scenario.seed, count).pages()
        #: every item's id differs from every other's (``Engine.add_page(unique=True)``)
        self.unique_ids: bool = scenario.workload.ids.unique
        self._ids: list[str] = []
        self._texts: list[str] = []
        self._pos = 0

    def take(self, n: int) -> tuple[list[str], list[str]]:
        """The next ``n`` items' ids and texts (fewer at the end of the job, none after)."""
        ids: list[str] = []
        texts: list[str] = []
        while len(ids) < n:
            if self._pos >= len(self._ids):
                page = next(self._pages, None)
                if page is None:
                    break
                self._ids, self._texts = page
                self._pos = 0
            pos, end = self._pos, self._pos + n - len(ids)
            ids += self._ids[pos:end]
            texts += self._texts[pos:end]
            self._pos = min(end, len(self._ids))
        return ids, texts

    def __iter__(self) -> Iterator[Item]:
        while True:
            ids, texts = self.take(_ITER_PAGE)
            if not ids:
                return
            yield from map(Item, ids, texts)


_ITER_PAGE = 1024


def _dist_mean(dist: Dist) -> float:
    if dist.kind == "constant":
        return dist.value
    if dist.kind == "normal":
        return dist.mean
    if dist.kind == "lognormal":
        return math.exp(dist.mu + dist.sigma * dist.sigma / 2)
    if dist.kind == "uniform":
        return (dist.low + dist.high) / 2
    return sum(dist.values) / len(dist.values) if dist.values else 0.0


def expected_latency_s(profile: ProviderProfile, prompt_tokens: float,
                       reply_tokens: float) -> float:
    """Mean request latency (virtual seconds): TTFT, prefill, and one gap per later token."""
    lat = profile.latency
    return (_dist_mean(lat.ttft_s) + lat.prefill_s_per_token * prompt_tokens
            + _dist_mean(lat.itl_s) * max(0.0, reply_tokens - 1))


def bound_inputs(scenario: Scenario, setup: ArmSetup) -> BoundInputs:
    """The DESIGN.md throughput-bound inputs of a batch arm (first provider, all its keys)."""
    config = setup.config
    workload = scenario.workload
    name = setup.arm.providers[0]
    profile = _profile(scenario, name)
    model = task_model(scenario, setup.arm)
    key = _key(profile, setup.arm)
    spec = key.limits.get(model) or profile.default_limits.get(model) or LimitSpec()
    batch = float(config.batch.max_items if config.strategy == "semantic_batch" else 1)
    item = workload.item_tokens.expected()
    # an item line is "id=<ID>: <text>" plus its newline; the reply adds JSON punctuation
    id_tokens = len(str(workload.ids.start + workload.items)) / 4 + 1.5
    reply = workload.reply_tokens_per_item.expected()
    overhead = 3 + 3 + 3 + len(config.providers and task_for(scenario, setup.arm).instructions) / 4
    prompt = workload.system_prompt_tokens + overhead + batch * (item + id_tokens)
    latency = expected_latency_s(profile, prompt, batch * reply)
    reserve = spec.counting in ("reserve", "max_estimate")
    return BoundInputs(
        system_prompt_tokens=workload.system_prompt_tokens,
        batch_size=batch,
        item_tokens=item + id_tokens,
        reply_tokens_per_item=reply,
        latency_s=latency,
        tpm=spec.tpm,
        input_tpm=spec.input_tpm,
        output_tpm=spec.output_tpm,
        rpm=spec.rpm,
        provider_concurrency=spec.concurrency,
        client_concurrency=config.concurrency.limit,
        max_tokens=batch * reply + config.batch.reply_slack_tokens if reserve else None,
        reserve_max_tokens=reserve,
        overhead_tokens=overhead,
        keys=max(1, setup.arm.keys),
    )
