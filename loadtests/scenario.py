"""Load a scenario YAML: ``yaml.safe_load``, the JSON Schema, then meaning, into frozen dataclasses.

``load_scenario(path)`` returns a :class:`Scenario` or raises :class:`ScenarioError`, whose
``str()`` lists every problem as ``file:line: key.path: message``. ``with_overrides`` applies
dotted-key overrides (the planner's sweeps) and checks the result the same way.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from loadtests.scenario_checks import meaning_problems, plugin_problems
from loadtests.scenario_model import (
    DEFAULT_LABELS,
    Arm,
    BatchLoad,
    ErrorGuard,
    Expect,
    IdScheme,
    Load,
    ProviderSpec,
    Scenario,
    Size,
    SloSearch,
    Stage,
    Target,
    TopUp,
    UserGroup,
    Workload,
)
from loadtests.scenario_schema import (
    KeyPath,
    LineMap,
    Problem,
    ScenarioError,
    read_yaml,
    schema_problems,
)

__all__ = [
    "Scenario",
    "ScenarioError",
    "load_scenario",
    "parse_scenario",
    "set_dotted",
    "with_overrides",
]


def load_scenario(path: str | Path) -> Scenario:
    """Read, check and parse the scenario at ``path``; raise ScenarioError."""
    path = Path(path)
    data, lines = read_yaml(path)
    return parse_scenario(data, lines, path)


def parse_scenario(data: Any, lines: LineMap, path: Path) -> Scenario:
    """Check an already-loaded scenario document (schema, providers, meaning) and build it."""
    if not isinstance(data, dict):
        raise ScenarioError([lines.problem((), "a scenario must be a YAML mapping")])
    problems = schema_problems(data, lines)
    if problems:
        raise ScenarioError(_by_line(problems))
    doc = copy.deepcopy(data)
    doc["providers"] = _resolve_providers(doc.get("providers", []), lines, path.parent)
    problems = meaning_problems(doc, lines, path.parent)
    if problems:
        raise ScenarioError(_by_line(problems))
    scenario = _build(doc, path)
    problems, scenario = plugin_problems(scenario, lines)
    if problems:
        raise ScenarioError(problems)
    if "gateway" in doc:
        from loadtests.scenario_gateway import parse_gateway

        names = tuple(p.name for p in scenario.providers)
        problems, section = parse_gateway(doc["gateway"], lines, names, str(path))
        if problems:
            raise ScenarioError(problems)
        scenario = dataclasses.replace(scenario, gateway=section)
    return scenario


def _by_line(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line))


def with_overrides(scenario: Scenario, overrides: Mapping[str, Any]) -> Scenario:
    """A copy of ``scenario`` with dotted keys set (``arms.batch.client.batch_size``), re-checked.

    List elements are addressed by their ``name`` (arms, providers, user groups) or index;
    a key whose parent does not exist is refused, naming the key.
    """
    doc = copy.deepcopy(_thaw(scenario.raw))
    lines = LineMap(str(scenario.path), {(): 1})
    for key, value in overrides.items():
        set_dotted(doc, key, value, str(scenario.path))
    return parse_scenario(doc, lines, scenario.path)


def set_dotted(doc: dict[str, Any], key: str, value: Any, file: str) -> None:
    """Set dotted ``key`` in the plain document ``doc`` (list elements by name or index)."""
    parts = key.split(".")
    node: Any = doc
    walked: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _find_index(node, part)
            if index is None:
                raise ScenarioError(
                    [
                        Problem(
                            file,
                            1,
                            key,
                            f"no element {part!r} under {'.'.join(walked) or '<root>'}",
                        )
                    ]
                )
            if last:
                node[index] = value
                return
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
                return
            if part not in node:
                raise ScenarioError(
                    [Problem(file, 1, key, f"no key {part!r} under {'.'.join(walked) or '<root>'}")]
                )
            node = node[part]
        else:
            raise ScenarioError(
                [Problem(file, 1, key, f"{'.'.join(walked)} is not a mapping or list")]
            )
        walked.append(part)


def _find_index(items: list[Any], part: str) -> int | None:
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return index
    if part.isdigit() and int(part) < len(items):
        return int(part)
    return None


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_thaw(v) for v in value]
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_providers(
    entries: list[dict[str, Any]], lines: LineMap, base: Path
) -> list[dict[str, Any]]:
    """Replace ``profile:`` entries by the profile's mapping with overrides merged in."""
    resolved: list[dict[str, Any]] = []
    problems: list[Problem] = []
    for index, entry in enumerate(entries):
        if "profile" not in entry:
            resolved.append(entry)
            continue
        profile_path = (base / entry["profile"]).resolve()
        if not profile_path.is_file():
            problems.append(
                lines.problem(
                    ("providers", index, "profile"),
                    f"no profile file {entry['profile']!r} (looked in {base})",
                )
            )
            continue
        try:
            data, _ = read_yaml(profile_path)
        except ScenarioError as exc:
            problems.extend(exc.problems)
            continue
        if not isinstance(data, dict):
            problems.append(
                lines.problem(
                    ("providers", index, "profile"),
                    f"profile {entry['profile']!r} is not a YAML mapping",
                )
            )
            continue
        merged = _deep_merge(data, entry.get("overrides", {}))
        merged["name"] = entry["name"]
        merged["_profile"] = str(entry["profile"])
        resolved.append(merged)
    if problems:
        raise ScenarioError(problems)
    return resolved


def _size(raw: Any, default: Size) -> Size:
    if raw is None:
        return default
    if isinstance(raw, int):
        return Size(value=raw)
    return Size(
        dist=raw["dist"],
        value=int(raw.get("value", 0)),
        min=raw.get("min"),
        max=raw.get("max"),
        mean=float(raw.get("mean", 0.0)),
        sd=float(raw.get("sd", 0.0)),
        median=float(raw.get("median", 0.0)),
        p99=float(raw.get("p99", 0.0)),
        values=tuple(raw.get("values", ())),
        weights=tuple(float(w) for w in raw.get("weights", ())),
    )


def _target(raw: Mapping[str, Any]) -> Target:
    prices = raw.get("prices")
    return Target(
        **{k: v for k, v in raw.items() if k != "prices"},
        prices=None if prices is None
        else (float(prices["input_usd_per_mtok"]), float(prices["output_usd_per_mtok"])),
    )


def _workload(raw: Mapping[str, Any]) -> Workload:
    base = Workload(items=int(raw["items"]))
    labels = raw.get("labels")
    ids = raw.get("ids", {})
    return Workload(
        items=base.items,
        project_items=int(raw.get("project_items", base.project_items)),
        project_deadline_s=float(raw.get("project_deadline_s", base.project_deadline_s)),
        item_tokens=_size(raw.get("item_tokens"), base.item_tokens),
        reply_tokens_per_item=_size(raw.get("reply_tokens_per_item"), base.reply_tokens_per_item),
        system_prompt_tokens=int(raw.get("system_prompt_tokens", base.system_prompt_tokens)),
        duplicate_rate=float(raw.get("duplicate_rate", 0.0)),
        poison_rate=float(raw.get("poison_rate", 0.0)),
        labels=tuple((str(k), str(v)) for k, v in labels.items()) if labels else DEFAULT_LABELS,
        ids=IdScheme(
            scheme=ids.get("scheme", "sequential"),
            start=int(ids.get("start", 1)),
            prefix=str(ids.get("prefix", "")),
        ),
        prompt_tokens=_size(raw.get("prompt_tokens"), base.prompt_tokens),
        max_tokens=int(raw.get("max_tokens", base.max_tokens)),
        model=raw.get("model"),
    )


def user_stages(raw: Mapping[str, Any], duration_s: float) -> tuple[Stage, ...]:
    """The stages of a user group: explicit ``stages``, a ``step`` load, or one stage."""
    if "stages" in raw:
        return tuple(
            Stage(
                name=str(s.get("name", f"stage{i + 1}")),
                duration_s=float(s["duration_s"]),
                users=s.get("users"),
                spawn_rate=s.get("spawn_rate"),
                rate_per_s=s.get("rate_per_s"),
            )
            for i, s in enumerate(raw["stages"])
        )
    if "step" in raw:
        step = raw["step"]
        return tuple(
            Stage(
                name=f"step{i + 1}",
                duration_s=float(step["step_duration_s"]),
                users=int(step["start_users"]) + i * int(step["step_users"]),
            )
            for i in range(int(step["steps"]))
        )
    return (
        Stage(
            name="steady",
            duration_s=duration_s,
            users=raw.get("users"),
            rate_per_s=raw.get("rate_per_s"),
        ),
    )


def _users(raw: Mapping[str, Any], duration_s: float, base: Path) -> UserGroup:
    return UserGroup(
        name=raw["name"],
        arm=raw["arm"],
        mode=raw["mode"],
        stages=user_stages(raw, duration_s) if raw["mode"] != "trace" else (),
        think_s=float(raw.get("think_s", 0.0)),
        arrival=raw.get("arrival", "constant"),
        burstiness=float(raw.get("burstiness", 1.0)),
        trace=(base / raw["trace"]).resolve() if "trace" in raw else None,
        prompt_tokens=_size(raw.get("prompt_tokens"), Size(value=0))
        if "prompt_tokens" in raw
        else None,
        max_tokens=raw.get("max_tokens"),
        stream=None if raw.get("stream") is None else bool(raw["stream"]),
        user_ids=int(raw.get("user_ids", 1)),
        per_user_rpm=raw.get("per_user", {}).get("rpm"),
        per_user_tokens_per_day=raw.get("per_user", {}).get("tokens_per_day"),
    )


def _build(doc: dict[str, Any], path: Path) -> Scenario:
    base = path.parent
    duration_s = float(doc.get("duration_s", 600.0))
    providers = tuple(
        ProviderSpec(
            name=p["name"],
            source=str((base / p["_profile"]).resolve())
            if "_profile" in p
            else f"{path}:providers.{p['name']}",
            data=_freeze({k: v for k, v in p.items() if k != "_profile"}),
        )
        for p in doc.get("providers", [])
    )
    first = (providers[0].name,) if providers else ()
    arms = tuple(
        Arm(
            name=a["name"],
            strategy=a["strategy"],
            providers=tuple(a.get("providers", first)),
            client=_freeze(a.get("client", {})),
            key=a.get("key"),
            keys=int(a.get("keys", 1)),
            description=a.get("description", ""),
            models=_freeze(a.get("models", {})),
        )
        for a in doc["arms"]
    )
    load_raw = doc["load"]
    batch = None
    if "batch" in load_raw:
        b = load_raw["batch"]
        default_arms = tuple(a.name for a in arms if a.strategy != "interactive")
        batch = BatchLoad(
            arms=tuple(b.get("arms", default_arms)),
            order=b.get("order", "sequential"),
            items=b.get("items"),
        )
    slo = load_raw.get("slo_search")
    guard = load_raw.get("error_guard", {})
    load = Load(
        batch=batch,
        users=tuple(_users(u, duration_s, base) for u in load_raw.get("users", [])),
        slo_search=SloSearch(**slo) if slo else None,
        error_guard=ErrorGuard(**guard),
        topups=tuple(TopUp(**t) for t in load_raw.get("topups", [])),
    )
    expect_raw = doc.get("expect", {})
    target_raw = doc.get("target")
    return Scenario(
        name=doc["name"],
        path=path,
        description=doc.get("description", ""),
        seed=int(doc.get("seed", 0)),
        time_scale=float(doc.get("time_scale", 1.0)),
        duration_s=duration_s,
        providers=providers,
        target=_target(target_raw) if target_raw else None,
        workload=_workload(doc["workload"]),
        arms=arms,
        load=load,
        expect=Expect(
            all=_freeze(expect_raw.get("all", {})),
            arms=_freeze(expect_raw.get("arms", {})),
            tolerances=_freeze(expect_raw.get("tolerances", {})),
        ),
        sweep=tuple((k, tuple(v)) for k, v in doc.get("sweep", {}).items()),
        raw=_freeze(_unresolve(doc)),
    )


def _unresolve(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with providers as plain inline mappings (profiles already merged)."""
    out = dict(doc)
    out["providers"] = [
        {k: v for k, v in p.items() if k != "_profile"} for p in doc.get("providers", [])
    ]
    return out


def key_line(lines: LineMap, path: KeyPath) -> int:
    """The line of ``path`` in the scenario (for callers reporting their own problems)."""
    return lines.line(path)


def problems_text(problems: Sequence[Problem]) -> str:
    """Problems one per line, as ``ratelab validate`` prints them."""
    return "\n".join(str(p) for p in problems)
