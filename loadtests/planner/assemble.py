"""From a loaded scenario to the objects the planner drives: provider profiles, the client
config of each arm with its routes, and the job's items.

The task, the client settings and the throughput-bound inputs are the live runner's own
(``loadtests.run_setup``): plan and live figures agree only if both clocks drive the same
client. This module adds what only virtual time needs: the extra keys of arms with
``keys > 1`` (live runs serve one key), a route from each client provider to the simulated
provider and key, and the items as pages. Token sizes are ratelab tokens, durations virtual
seconds, prices USD per million tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from batchclient.config import ClientConfig, ProviderSettings, Task
from batchclient.configreader import ConfigError
from batchclient.policy.wire import Item
from loadtests.bound import BoundInputs
from loadtests.run_setup import SetupError, arm_task, client_config
from loadtests.run_setup import bound_inputs as live_bound_inputs
from loadtests.scenario_model import Arm, Scenario
from loadtests.workload import WorkloadGenerator
from simulator.model.config import KeyProfile, ProviderProfile, SimulatorConfig

__all__ = [
    "ArmSetup",
    "PlanError",
    "arm_setup",
    "bound_inputs",
    "items",
    "simulator_config",
    "task_for",
]

# base URL of a provider in the planner: nothing listens there (``.invalid`` never
# resolves), the virtual transport routes by the client provider's name
PLAN_URL = "http://plan.invalid/{name}/v1"


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


def _check_served(scenario: Scenario, arm: Arm) -> None:
    """Refuse an arm whose first provider has no chat model to send the job to (the live
    client would be refused every request)."""
    if scenario.workload.model:
        return
    name = arm.providers[0] if arm.providers else scenario.providers[0].name
    if not any(model.kind == "chat" for model in _profile(scenario, name).models):
        raise PlanError(f"providers.{name}.models: no chat model to send the job to")


def task_for(scenario: Scenario, arm: Arm) -> Task:
    """The arm's classification task, as the live runner builds it (``arm_task``)."""
    _check_served(scenario, arm)
    return arm_task(scenario, arm)


def arm_setup(scenario: Scenario, arm: Arm) -> ArmSetup:
    """The arm's client config as the live runner builds it (``client_config``: every key's
    limits and the models' prices, in failover order), with each provider's extra keys
    after it when the arm spreads its job over ``keys`` of them."""
    if not isinstance(arm.client_config, ClientConfig):
        raise PlanError(f"arms.{arm.name}.client: not parsed by batchclient's parse_client_config")
    _check_served(scenario, arm)
    for name in arm.providers:
        _key(_profile(scenario, name), arm)  # a key the provider does not have is refused
    urls = {name: PLAN_URL.format(name=name) for name in arm.providers}
    try:
        # the planner's result cache lives in memory: the run folder is not read
        config = client_config(scenario, arm, urls, ".")
    except (SetupError, ConfigError) as exc:
        raise PlanError(str(exc)) from exc
    settings: list[ProviderSettings] = []
    routes: dict[str, tuple[str, str]] = {}
    for entry in config.providers:
        settings.append(entry)
        routes[entry.name] = (entry.name, entry.api_key)
        for index in range(2, arm.keys + 1):
            name, key = f"{entry.name}-k{index}", f"{entry.api_key}-k{index}"
            settings.append(dataclasses.replace(entry, name=name, api_key=key,
                                                base_url=PLAN_URL.format(name=name)))
            routes[name] = (entry.name, key)
    return ArmSetup(arm, dataclasses.replace(config, providers=tuple(settings)), routes)


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


def bound_inputs(scenario: Scenario, setup: ArmSetup) -> BoundInputs | None:
    """The DESIGN.md throughput-bound inputs of a batch arm, as the live runner measures them
    (``run_setup.bound_inputs``: the client's packer over a sample of the items)."""
    return live_bound_inputs(scenario, setup.arm, setup.config)
