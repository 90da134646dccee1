"""Checks of a scenario's meaning, after the schema: references, limits, stages, sizes.

The schema says what shape a scenario has; these checks say whether it can run: every name
an arm or load refers to exists, no limit is zero, no stage is empty, a batch job's
providers answer item batches with codes of the workload's labels, and the provider and
client sections pass their owners' parsers (the simulator's and the client's) when present.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from loadtests.scenario_model import DEFAULT_LABELS, Scenario
from loadtests.scenario_schema import KeyPath, LineMap, Problem
from loadtests.shapes import TraceError, read_trace
from simulator.model.profile import DEFAULT_CODES, RESPONDERS

# keys whose value is a rate limit: zero would admit nothing, negative is meaningless
LIMIT_KEYS = frozenset(
    {
        "rpm",
        "tpm",
        "input_tpm",
        "output_tpm",
        "itpm",
        "otpm",
        "tpd",
        "rpd",
        "concurrency",
        "max_concurrent",
        "concurrent",
        "concurrent_requests",
        "requests_per_minute",
        "tokens_per_minute",
        "tokens_per_day",
    }
)


def meaning_problems(doc: Mapping[str, Any], lines: LineMap, base: Path) -> list[Problem]:
    """Every meaning problem of a schema-valid document whose providers are resolved."""
    problems: list[Problem] = []
    add = problems.append
    providers = doc.get("providers", [])
    arms = doc["arms"]
    load = doc["load"]
    users = load.get("users", [])

    for section, items in (("providers", providers), ("arms", arms)):
        _unique(section, items, lines, add)
    _unique("load.users", users, lines, add, prefix=("load", "users"))

    if not providers and "target" not in doc:
        add(lines.problem(("providers",), "a scenario needs providers (the simulator) or a target"))
    target = doc.get("target")
    if target is not None:
        if float(doc.get("time_scale", 1.0)) != 1.0:
            add(lines.problem(("time_scale",), "a target is a real endpoint: it runs in wall "
                                               "time, set time_scale: 1"))
        if "spend_cap_usd" in target and "prices" not in target:
            # without prices the client can only meter what the endpoint reports it charged
            # (the simulator's X-MDB-Charged-USD), which a real deployment does not send
            add(lines.problem(("target", "spend_cap_usd"), "a spend cap needs target.prices "
                                                           "(USD per million tokens) to meter"))
    for index, provider in enumerate(providers):
        for path, message in _limit_problems(provider, ()):
            add(lines.problem(("providers", index, *path), message))

    provider_names = {p["name"] for p in providers}
    arm_names = {a["name"]: a["strategy"] for a in arms}
    served = {p["name"]: set(p.get("models") or {}) for p in providers}
    for index, arm in enumerate(arms):
        listed = arm.get("providers") or [p["name"] for p in providers[:1]]
        for j, name in enumerate(arm.get("providers", [])):
            if name not in provider_names:
                add(
                    lines.problem(
                        ("arms", index, "providers", j), _unknown("provider", name, provider_names)
                    )
                )
        for name, model in (arm.get("models") or {}).items():
            if name not in listed:
                add(lines.problem(("arms", index, "models", name),
                                  _unknown("provider of this arm", name, set(listed))))
            elif served.get(name) and model not in served[name]:
                add(lines.problem(("arms", index, "models", name),
                                  f"provider {name!r} does not serve model {model!r} "
                                  f"(it serves {', '.join(sorted(served[name]))})"))
    # The job's model must reach a provider of every arm (the live client refuses to start,
    # and a plan would wait forever for a provider that takes it).
    model = doc.get("workload", {}).get("model")
    if model and "target" not in doc:
        for arm in arms:
            listed = arm.get("providers") or [p["name"] for p in providers[:1]]
            asks = {name: (arm.get("models") or {}).get(name, model) for name in listed}
            if not any(not served.get(name) or asked in served[name]
                       for name, asked in asks.items()):
                offered = sorted({m for name in listed for m in served.get(name, ())})
                add(lines.problem(("workload", "model"),
                                  f"arm {arm['name']!r}: no provider of the arm serves model "
                                  f"{model!r} (they serve {', '.join(offered)})"))

    batch = load.get("batch")
    if batch is not None:
        for j, name in enumerate(batch.get("arms", [])):
            if name not in arm_names:
                add(lines.problem(("load", "batch", "arms", j), _unknown("arm", name, arm_names)))
            elif arm_names[name] == "interactive":
                add(
                    lines.problem(
                        ("load", "batch", "arms", j),
                        f"arm {name!r} is interactive; a batch job needs a batch strategy",
                    )
                )
        if doc["workload"]["items"] == 0 and "items" not in batch:
            add(
                lines.problem(
                    ("workload", "items"), "a batch job with no items: set workload.items > 0"
                )
            )

    for index, group in enumerate(users):
        here = ("load", "users", index)
        if group["arm"] not in arm_names:
            add(lines.problem((*here, "arm"), _unknown("arm", group["arm"], arm_names)))
        problems.extend(_group_problems(group, here, lines, base))

    slo = load.get("slo_search")
    group_names = {u["name"] for u in users}
    if slo is not None and slo["users"] not in group_names:
        add(
            lines.problem(
                ("load", "slo_search", "users"), _unknown("user group", slo["users"], group_names)
            )
        )

    for j, topup in enumerate(load.get("topups", [])):
        if topup["provider"] not in provider_names:
            add(
                lines.problem(
                    ("load", "topups", j, "provider"),
                    _unknown("provider", topup["provider"], provider_names),
                )
            )

    for name in doc.get("expect", {}).get("arms", {}):
        if name not in arm_names:
            add(lines.problem(("expect", "arms", name), _unknown("arm", name, arm_names)))

    workload = doc["workload"]
    for key in ("item_tokens", "reply_tokens_per_item", "prompt_tokens"):
        if key in workload:
            problems.extend(_size_problems(workload[key], ("workload", key), lines))
    if workload.get("duplicate_rate", 0) + workload.get("poison_rate", 0) > 1:
        add(
            lines.problem(
                ("workload", "poison_rate"), "duplicate_rate + poison_rate must not exceed 1"
            )
        )

    for key in doc.get("sweep", {}):
        missing = _missing_key(doc, key)
        if missing:
            add(lines.problem(("sweep", key), missing))
    problems.extend(_responder_problems(doc, lines))
    return problems


def _responder_problems(doc: Mapping[str, Any], lines: LineMap) -> Iterator[Problem]:
    """A batch job's providers must answer item batches, with codes of the workload's
    labels: a prose responder (the simulator's default, ``lorem``) answers no item, and a
    code outside the taxonomy is refused, so every such item would be paid for again and
    again and then dead-lettered."""
    batch = doc["load"].get("batch")
    providers = doc.get("providers", [])
    if batch is None or not providers:
        return
    strategies = {a["name"]: a["strategy"] for a in doc["arms"]}
    names = batch.get("arms", [n for n, s in strategies.items() if s != "interactive"])
    used: dict[str, str] = {}  # provider -> the first batch arm that sends to it
    for arm in doc["arms"]:
        if arm["name"] in names and strategies[arm["name"]] != "interactive":
            for provider in arm.get("providers", [providers[0]["name"]]):
                used.setdefault(provider, arm["name"])
    labels = {str(code) for code in doc["workload"].get("labels") or dict(DEFAULT_LABELS)}
    for index, provider in enumerate(providers):
        arm = used.get(provider["name"])
        if arm is None:
            continue
        responder = provider.get("responder") or {}
        kind = responder.get("kind", "lorem")
        if kind not in RESPONDERS:
            continue  # the simulator's parser names an unknown kind (plugin_problems)
        if kind != "batch_json":
            yield lines.problem(
                ("providers", index, "responder", "kind") if "kind" in responder
                else ("providers", index),
                f"arm {arm!r} sends item batches to provider {provider['name']!r}, whose "
                f"responder writes {kind!r} replies: no item would be answered (set "
                "responder: {kind: batch_json})")
            continue
        foreign = [str(c) for c in responder.get("codes", DEFAULT_CODES)
                   if str(c) not in labels]
        if foreign:
            yield lines.problem(
                ("providers", index, "responder", "codes") if "codes" in responder
                else ("workload", "labels"),
                f"provider {provider['name']!r} answers with codes {', '.join(foreign)} that "
                "workload.labels does not have: the client would refuse those answers")


def _unique(
    section: str,
    items: list[dict[str, Any]],
    lines: LineMap,
    add: Callable[[Problem], None],
    prefix: KeyPath | None = None,
) -> None:
    seen: set[str] = set()
    for index, item in enumerate(items):
        name = item.get("name")
        if name in seen:
            add(
                lines.problem(
                    (*(prefix or (section,)), index, "name"), f"duplicate {section} name {name!r}"
                )
            )
        seen.add(str(name))


def _unknown(kind: str, name: str, known: Mapping[str, Any] | set[str]) -> str:
    listing = ", ".join(sorted(known)) or "none defined"
    return f"unknown {kind} {name!r} (known: {listing})"


def _limit_problems(
    node: Any, path: KeyPath, in_limits: bool = False
) -> Iterator[tuple[KeyPath, str]]:
    """Zero or negative limits and negative rates or prices anywhere in a provider mapping."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            key_s = str(key)
            child = (*path, key_s)
            if isinstance(value, bool):
                continue
            if isinstance(value, int | float):
                is_limit = key_s in LIMIT_KEYS or in_limits
                if is_limit and value <= 0:
                    yield (
                        child,
                        f"a limit of {value} admits nothing: must be > 0 (omit it for no limit)",
                    )
                elif value < 0 and (
                    "rate" in key_s or "price" in key_s or key_s.endswith(("_s", "_usd"))
                ):
                    yield child, f"must not be negative, got {value}"
            else:
                yield from _limit_problems(value, child, in_limits or key_s == "limits")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _limit_problems(value, (*path, index), in_limits)


def _group_problems(
    group: Mapping[str, Any], here: KeyPath, lines: LineMap, base: Path
) -> Iterator[Problem]:
    mode = group["mode"]
    if mode == "trace":
        if "trace" not in group:
            yield lines.problem(
                here, "a trace user group needs `trace:` (a CSV of timestamps and token sizes)"
            )
        elif not (base / group["trace"]).is_file():
            yield lines.problem(
                (*here, "trace"), f"no trace file {group['trace']!r} (looked in {base})"
            )
        else:
            # read now (a trace is small): a bad row is refused before the run, not found by
            # the load generator (live) or the planner halfway through
            try:
                read_trace(base / group["trace"])
            except (OSError, UnicodeDecodeError, TraceError) as exc:
                yield lines.problem((*here, "trace"), str(exc))
        return
    stages = group.get("stages")
    if stages is not None and "step" in group:
        yield lines.problem((*here, "step"), "give either stages or step, not both")
    if mode == "closed":
        if stages is None and "step" not in group and "users" not in group:
            yield lines.problem(here, "a closed-loop group needs users, stages or step")
        if group.get("users") == 0:
            yield lines.problem((*here, "users"), "a user group with no users")
        for j, stage in enumerate(stages or []):
            if not stage.get("users"):
                yield lines.problem((*here, "stages", j), "a stage with no users: set users >= 1")
    else:
        if stages is None and not group.get("rate_per_s"):
            yield lines.problem(
                here, "an open-loop group needs rate_per_s > 0 or stages with rate_per_s"
            )
        for j, stage in enumerate(stages or []):
            if not stage.get("rate_per_s"):
                yield lines.problem(
                    (*here, "stages", j), "an open-loop stage with no arrivals: set rate_per_s > 0"
                )
    if "prompt_tokens" in group:
        yield from _size_problems(group["prompt_tokens"], (*here, "prompt_tokens"), lines)


def _size_problems(raw: Any, here: KeyPath, lines: LineMap) -> Iterator[Problem]:
    if not isinstance(raw, Mapping):
        return
    lo, hi = raw.get("min"), raw.get("max")
    if lo is not None and hi is not None and lo > hi:
        yield lines.problem((*here, "min"), f"min {lo} is above max {hi}")
    if raw["dist"] == "lognormal" and raw["p99"] < raw["median"]:
        yield lines.problem((*here, "p99"), "p99 must be at least the median")
    if (
        raw["dist"] == "empirical"
        and "weights" in raw
        and len(raw["weights"]) != len(raw["values"])
    ):
        yield lines.problem((*here, "weights"), "weights must have one entry per value")
    if raw["dist"] == "empirical" and "weights" in raw and sum(raw["weights"]) <= 0:
        yield lines.problem((*here, "weights"), "weights must not all be zero")


def _missing_key(doc: Mapping[str, Any], key: str) -> str | None:
    """Why the dotted ``key`` does not name a settable place in ``doc`` (None if it does)."""
    node: Any = doc
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            match = [x for x in node if isinstance(x, Mapping) and x.get("name") == part]
            if not match and not (part.isdigit() and int(part) < len(node)):
                return f"sweep key {key!r}: no element {part!r}"
            node = match[0] if match else node[int(part)]
        elif isinstance(node, Mapping):
            if part not in node and not last:
                return f"sweep key {key!r}: no key {part!r}"
            if last:
                return None
            node = node[part]
        else:
            return f"sweep key {key!r}: {part!r} is below a plain value"
    return None


def _optional(module: str, attr: str) -> Callable[..., Any] | None:
    """A parser of another part, or None while that part is not installed yet."""
    try:
        found: Callable[..., Any] = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None
    return found


def plugin_problems(scenario: Scenario, lines: LineMap) -> tuple[list[Problem], Scenario]:
    """Hand providers to the simulator's ``parse_provider`` and arms to ``parse_client_config``.

    Their errors (``source: key.path: message``) are mapped back to a line of the scenario,
    or of the profile file when the key comes from the profile.
    """
    problems: list[Problem] = []
    parse_provider = _optional("simulator.model.config", "parse_provider")
    parse_client = _optional("batchclient.config", "parse_client_config")
    providers = list(scenario.providers)
    arms = list(scenario.arms)
    scenario_file = str(scenario.path)
    if parse_provider is not None:
        for index, spec in enumerate(providers):
            inline = spec.source.startswith(f"{scenario_file}:")
            source = scenario_file if inline else spec.source
            prefix: KeyPath = ("providers", index)
            try:
                if inline:
                    config = parse_provider(
                        _plain(spec.data),
                        source,
                        path=f"providers[{index}]",
                        base_dir=scenario.path.parent,
                    )
                else:
                    config = parse_provider(_plain(spec.data), source)
            except (ValueError, TypeError, KeyError) as exc:
                path, message = _split_error(str(exc), source)
                if inline:
                    problems.append(lines.problem(path, message))
                else:
                    problems.append(_profile_problem(lines, prefix, spec.source, path, message))
                continue
            providers[index] = dataclasses.replace(spec, config=config)
    if parse_client is not None:
        for index, arm in enumerate(arms):
            client = _plain(arm.client)
            if arm.strategy != "interactive":
                if "strategy" in client and client["strategy"] != arm.strategy:
                    problems.append(
                        lines.problem(
                            ("arms", index, "client", "strategy"),
                            f"{client['strategy']!r} contradicts the arm's {arm.strategy!r}",
                        )
                    )
                    continue
                client["strategy"] = arm.strategy
            try:
                config = parse_client(client, scenario_file)
            except (ValueError, TypeError, KeyError) as exc:
                path, message = _split_error(str(exc), scenario_file)
                problems.append(lines.problem(("arms", index, "client", *path), message))
                continue
            arms[index] = dataclasses.replace(arm, client_config=config)
    return problems, dataclasses.replace(scenario, providers=tuple(providers), arms=tuple(arms))


def _split_error(text: str, source: str) -> tuple[KeyPath, str]:
    """``source: a.b[0]: message`` -> (("a", "b", 0), "message"); unparsed text is the message."""
    if text.startswith(f"{source}: "):
        text = text[len(source) + 2 :]
    head, sep, rest = text.partition(": ")
    if sep and re.fullmatch(r"[A-Za-z0-9_<>.\[\]-]+", head):
        parts: list[str | int] = []
        for token in re.findall(r"\[(\d+)\]|([^.\[\]]+)", head):
            parts.append(int(token[0]) if token[0] else token[1])
        if parts in (["<top>"], ["<root>"]):
            parts = []
        return tuple(parts), rest
    return (), text


def _profile_problem(
    lines: LineMap, prefix: KeyPath, profile: str, path: KeyPath, message: str
) -> Problem:
    """Locate a profile key: in the scenario's overrides if set there, else in the profile."""
    override = (*prefix, "overrides", *path)
    if path and lines.has(override):
        return lines.problem(override, message)
    try:
        text = Path(profile).read_text(encoding="utf-8")
        profile_lines = LineMap.from_text(profile, text)
    except (OSError, ValueError):
        return lines.problem(prefix, f"profile {profile}: {message}")
    return profile_lines.problem(path, message)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
