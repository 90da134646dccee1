"""From a scenario to what the batching client and the recorder need, for one arm.

The client's settings for an arm are the scenario's ``client:`` mapping plus the providers
the run serves (base URL, key, limits, prices from the simulator profile), the scenario's
``time_scale`` and seed. The bound inputs are measured with the client's own packer on
sample items, so the bound counts the very tokens the client sends.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from batchclient.config import ClientConfig, Task, parse_client_config
from batchclient.policy.packing import batch_packer
from batchclient.policy.tokens import reply_tokens, text_tokens
from batchclient.policy.wire import Item
from loadtests.bound import BoundInputs
from loadtests.scenario_model import Arm, Scenario
from loadtests.workload import WorkloadGenerator, system_prompt
from simulator.model.profile import LimitSpec
from simulator.model.structured import batch_object

DEFAULT_MODEL = "gpt-4o-mini"


class SetupError(ValueError):
    """The scenario cannot be wired to the client (names the arm and what is missing)."""


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _profile(scenario: Scenario, name: str) -> Any:
    """The simulator's parsed ProviderProfile of provider ``name`` (None for external targets)."""
    try:
        return scenario.provider(name).config
    except KeyError:
        return None


def arm_model(scenario: Scenario, arm: Arm) -> str:
    """The model an arm asks for: the workload's, the target's, or the first chat model served."""
    if scenario.workload.model:
        return scenario.workload.model
    if scenario.target is not None and scenario.target.model:
        return scenario.target.model
    profile = _profile(scenario, arm.providers[0]) if arm.providers else None
    if profile is not None:
        for model in profile.models:
            if model.kind == "chat":
                return str(model.name)
    return DEFAULT_MODEL


def arm_key(scenario: Scenario, arm: Arm, provider: str) -> str:
    """The API key an arm uses at a simulated provider: its own ``key`` or the profile's first."""
    if arm.key:
        return arm.key
    profile = _profile(scenario, provider)
    if profile is not None and profile.keys:
        return str(profile.keys[0].key)
    return "sk-ratelab"


def _key_limits(scenario: Scenario, arm: Arm, provider: str) -> Mapping[str, Any]:
    """The limits per model of the arm's key at a simulated provider (its tier's, for a key
    the profile does not list); none for an external target."""
    profile = _profile(scenario, provider)
    if profile is None:
        return {}
    key = arm_key(scenario, arm, provider)
    for k in profile.keys:
        if k.key == key:
            return {**profile.default_limits, **k.limits}
    return profile.default_limits


def _limit_spec(scenario: Scenario, arm: Arm, provider: str, model: str) -> Any:
    return _key_limits(scenario, arm, provider).get(model)


def provider_entries(
    scenario: Scenario, arm: Arm, urls: Mapping[str, str], model: str
) -> list[dict[str, Any]]:
    """The client's ``providers:`` list for an arm: URL, key, limits, prices, in failover order."""
    if scenario.target is not None:
        key = os.environ.get(scenario.target.api_key_env)
        if not key:
            raise SetupError(f"target.api_key_env: ${scenario.target.api_key_env} is not set")
        target: dict[str, Any] = {"name": "target", "base_url": scenario.target.base_url,
                                  "api_key": key, "time_scale": 1.0}
        if scenario.target.prices is not None:
            price_in, price_out = scenario.target.prices
            target["prices"] = {model: {"input": price_in, "output": price_out}}
        return [target]
    entries: list[dict[str, Any]] = []
    for name in arm.providers:
        if name not in urls:
            raise SetupError(f"arms.{arm.name}.providers: provider {name!r} is not served")
        entry: dict[str, Any] = {"name": name, "base_url": urls[name],
                                 "api_key": arm_key(scenario, arm, name),
                                 "time_scale": scenario.time_scale}
        asked = arm.models.get(name)
        if asked is not None:
            entry["model"] = asked  # a fallback serving another model: its limits apply
        spec = _limit_spec(scenario, arm, name, asked or model)
        if spec is not None:
            entry.update(_client_limits(spec))
            entry["tpm_counting"] = "actual" if spec.counting == "actual" else "reserve_max_tokens"
        # every model's own limits: a routing rule that sends items to another model
        # throttles them against that model's window, not the task model's
        # (an empty one: that model has no limit)
        entry["model_limits"] = {
            m: _client_limits(s) for m, s in _key_limits(scenario, arm, name).items()}
        profile = _profile(scenario, name)
        if profile is not None:
            entry["prices"] = {
                m.name: {"input": m.input_usd_per_mtok, "output": m.output_usd_per_mtok}
                for m in profile.models
            }
        entries.append(entry)
    return entries


def client_config(
    scenario: Scenario, arm: Arm, urls: Mapping[str, str], run_dir: str | Path
) -> ClientConfig:
    """The ClientConfig of ``arm`` against the served providers (relative paths: ``run_dir``)."""
    data = _plain(arm.client)
    if arm.strategy != "interactive":
        data["strategy"] = arm.strategy
    data["providers"] = provider_entries(scenario, arm, urls, arm_model(scenario, arm))
    data["time_scale"] = 1.0 if scenario.target is not None else scenario.time_scale
    data.setdefault("seed", scenario.seed)
    if isinstance(data.get("cache_path"), str):
        data["cache_path"] = str(Path(run_dir) / data["cache_path"])
    return parse_client_config(data, f"{scenario.path}: arms.{arm.name}.client")


def _client_limits(spec: LimitSpec) -> dict[str, int]:
    """The client config's limits of a simulator limit spec: TPM, RPM, and input and output
    TPM where the provider limits them apart (those it leaves unset are left out)."""
    pairs = (("tpm", spec.tpm), ("rpm", spec.rpm), ("input_tpm", spec.input_tpm),
             ("output_tpm", spec.output_tpm))
    return {k: int(v) for k, v in pairs if v}


def topup_times(scenario: Scenario, arm: Arm) -> tuple[float, ...]:
    """The virtual times of the scenario's top-ups of ``arm``'s providers: an arm whose
    balance runs out waits for the next one and goes on (the engine's ``topups``), as an
    operator who tops up and resumes the job would."""
    return tuple(sorted(t.at_s for t in scenario.load.topups if t.provider in arm.providers))


def arm_task(scenario: Scenario, arm: Arm) -> Task:
    """The classification task of a batch arm: the workload's system prompt, labels and model."""
    wl = scenario.workload
    per_item = max(16, math.ceil(wl.reply_tokens_per_item.expected()) + 4)
    return Task(
        name=arm.name,
        system_prompt=system_prompt(wl, scenario.seed),
        labels=dict(wl.labels),
        model=arm_model(scenario, arm),
        max_tokens_per_item=per_item,
    )


def slot_config(config: ClientConfig, slot: int, slots: int) -> ClientConfig:
    """``config`` for batch slot ``slot`` of ``slots``: the slots together are one client.

    Each keeps to ``1/slots`` of every key's limits (``share``: the headers still show every
    slot's use) and takes its part of the in-flight limit (the remainder to the first
    slots, at least one each), so that the slots neither race for one limit window nor send
    ``slots`` times the requests in flight that the scenario's bound counts."""
    if slots <= 1:
        return config
    c = config.concurrency

    def part(total: int) -> int:
        return max(1, total // slots + (1 if slot < total % slots else 0))

    return replace(
        config,
        providers=tuple(replace(p, share=1.0 / slots) for p in config.providers),
        concurrency=replace(c, limit=part(c.limit), max=max(part(c.max), c.min)),
    )


def slot_items(scenario: Scenario, slot: int, slots: int, count: int | None = None) -> list[Item]:
    """Items ``slot, slot+slots, ...`` of the job (ids and texts from the seeded generator)."""
    batch = scenario.load.batch
    total = count if count is not None else (batch.items if batch and batch.items else None)
    gen = WorkloadGenerator(scenario.workload, scenario.seed, total)
    return [Item(w.id, w.text) for w in gen.items(start=slot, step=slots)]


def job_items(scenario: Scenario) -> int:
    """Items of the batch job."""
    batch = scenario.load.batch
    return (batch.items or scenario.workload.items) if batch else 0


def _dist_mean(dist: Any) -> float:
    kind = getattr(dist, "kind", "constant")
    if kind == "constant":
        return float(dist.value)
    if kind == "normal":
        return float(dist.mean)
    if kind == "lognormal":
        return float(math.exp(dist.mu + dist.sigma**2 / 2))
    if kind == "uniform":
        return float(dist.low + dist.high) / 2
    values = getattr(dist, "values", ())
    return float(sum(values) / len(values)) if values else 0.0


def bound_inputs(scenario: Scenario, arm: Arm, config: ClientConfig) -> BoundInputs | None:
    """The DESIGN.md bound's inputs for a batch arm, measured with the client's packer."""
    if arm.strategy == "interactive" or not arm.providers:
        return None
    task = arm_task(scenario, arm)
    packer = batch_packer(task, config.batch)
    max_items = config.batch.max_items if config.strategy == "semantic_batch" else 1
    sample = slot_items(scenario, 0, 1, min(max(200, max_items * 10), max(1, job_items(scenario))))
    if not sample:
        return None
    b = max(1, packer.pack(sample, max_items, config.batch.token_budget))
    groups = [sample[i : i + b] for i in range(0, len(sample) - b + 1, b)] or [sample[:b]]
    prompt = sum(packer.prompt_tokens(g) for g in groups) / len(groups)
    code_len = max(len(c) for c in task.labels)
    if config.strategy == "semantic_batch":
        reply = sum(reply_tokens([i.id for i in g], code_len) for g in groups) / len(groups)
        if config.batch.wrapped:
            reply += text_tokens(batch_object(""))  # the object the array comes in
    else:
        reply = scenario.workload.reply_tokens_per_item.expected()
    max_tokens = sum(packer.max_tokens(g) for g in groups) / len(groups)
    provider = arm.providers[0]
    model = task.model
    spec = _limit_spec(scenario, arm, provider, model)
    profile = _profile(scenario, provider)
    latency_s = 0.0
    if profile is not None:
        lat = profile.latency
        latency_s = (_dist_mean(lat.ttft_s) + lat.prefill_s_per_token * prompt
                     + _dist_mean(lat.itl_s) * max(0.0, reply - 1))
    return BoundInputs(
        system_prompt_tokens=prompt,
        batch_size=b,
        item_tokens=0.0,
        reply_tokens_per_item=reply / b,
        latency_s=latency_s,
        tpm=getattr(spec, "tpm", None),
        input_tpm=getattr(spec, "input_tpm", None),
        output_tpm=getattr(spec, "output_tpm", None),
        rpm=getattr(spec, "rpm", None),
        tokens_per_day=getattr(spec, "tokens_per_day", None),
        provider_concurrency=getattr(spec, "concurrency", None),
        client_concurrency=config.concurrency.limit,
        max_tokens=max_tokens,
        reserve_max_tokens=getattr(spec, "counting", "actual") == "reserve",
        keys=arm.keys,
    )


def apply_overrides(
    scenario: Scenario, duration_s: float | None = None, items: int | None = None
) -> Scenario:
    """The scenario shortened by ``--duration-s`` (virtual seconds) and ``--items``."""
    from loadtests.scenario import with_overrides

    changes: dict[str, Any] = {}
    if duration_s is not None:
        changes["duration_s"] = duration_s
    if items is not None:
        changes["workload.items"] = items
        batch = scenario.load.batch
        if batch is not None and batch.items is not None:
            changes["load.batch.items"] = min(batch.items, items)
    return with_overrides(scenario, changes) if changes else scenario
