"""The run summary (``summary.json``, schema ``ratelab.summary/1``): contract, checks, figures.

The key paths in ``CONTRACT_ARM_PATHS`` and ``CONTRACT_TOP_PATHS`` are a contract read by the
gate, the planner and outside tools; docs/summary.md documents every key. A *figure* is
named ``<arm>.<dotted.path>`` (``batch.throughput.items_per_min``); arm names hold no dots.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = "ratelab.summary/1"

CONTRACT_TOP_PATHS: tuple[str, ...] = ("schema", "scenario", "mode", "partial", "arms")

CONTRACT_ARM_PATHS: tuple[str, ...] = (
    "name",
    "strategy",
    "items.total",
    "items.done",
    "items.skipped",
    "items.dead_letter",
    "items.lost",
    "requests.total",
    "requests.ok",
    "requests.http_429",
    "requests.http_402",
    "requests.http_5xx",
    "requests.timeouts",
    "requests.retries",
    "throughput.items_per_min",
    "throughput.requests_per_min",
    "throughput.tokens_per_min",
    "bound.items_per_min",
    "bound.binding",
    "bound.efficiency",
    "latency_ms.p50",
    "latency_ms.p90",
    "latency_ms.p95",
    "latency_ms.p99",
    "ttft_ms.p50",
    "ttft_ms.p90",
    "ttft_ms.p95",
    "ttft_ms.p99",
    "cost_usd.total",
    "cost_usd.per_item",
    "projection.items",
    "projection.duration_s",
    "projection.cost_usd",
)

# expect threshold -> (figure path inside an arm, comparison): ">=" means higher is fine
THRESHOLD_FIGURES: Mapping[str, tuple[str, str]] = {
    "min_items_per_min": ("throughput.items_per_min", ">="),
    "min_requests_per_min": ("throughput.requests_per_min", ">="),
    "max_429_rate": ("requests.rate_429", "<="),
    "max_error_rate": ("requests.error_rate", "<="),
    "min_efficiency": ("bound.efficiency", ">="),
    "max_cost_per_item_usd": ("cost_usd.per_item", "<="),
    "max_tokens_per_item": ("tokens.per_item", "<="),
    "min_items_per_request": ("items.per_request", ">="),
    "max_retry_amplification": ("requests.retry_amplification", "<="),
    "max_unrecovered_rate": ("requests.unrecovered_rate", "<="),
    "max_latency_p95_ms": ("latency_ms.p95", "<="),
    "max_ttft_p95_ms": ("ttft_ms.p95", "<="),
    "max_dead_letter": ("items.dead_letter", "<="),
    "max_lost": ("items.lost", "<="),
}

# figure path inside an arm -> which way is better, for the gate and compare
DIRECTIONS: Mapping[str, str] = {
    "throughput.items_per_min": "higher",
    "throughput.requests_per_min": "higher",
    "throughput.tokens_per_min": "higher",
    "throughput.steady_items_per_min": "higher",
    "throughput.steady_tokens_per_min": "higher",
    "bound.steady_efficiency": "higher",
    "bound.efficiency": "higher",
    "items.done": "higher",
    "items.per_request": "higher",
    "items.survival": "higher",
    "tokens.per_item": "lower",
    "tokens.per_request": "lower",
    "requests.rate_429": "lower",
    "requests.error_rate": "lower",
    "requests.retry_amplification": "lower",
    "requests.unrecovered_rate": "lower",
    "requests.http_429": "lower",
    "cost_usd.per_item": "lower",
    "cost_usd.total": "lower",
    "latency_ms.p50": "lower",
    "latency_ms.p95": "lower",
    "latency_ms.p99": "lower",
    "ttft_ms.p95": "lower",
    "items.dead_letter": "lower",
    "items.lost": "lower",
    "projection.duration_s": "lower",
    "projection.cost_usd": "lower",
}


class SummaryError(ValueError):
    """A summary file that cannot be read or breaks the ``ratelab.summary/1`` contract."""


def dig(node: Any, dotted: str) -> Any:
    """The value at ``dotted`` inside nested mappings, or None if any step is missing."""
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def contract_problems(summary: Any) -> list[str]:
    """Every contract key path missing from ``summary`` (empty when it is usable)."""
    if not isinstance(summary, Mapping):
        return ["summary is not a JSON object"]
    problems = [f"missing key {p!r}" for p in CONTRACT_TOP_PATHS if p not in summary]
    if summary.get("schema") not in (None, SCHEMA):
        problems.append(f"schema is {summary.get('schema')!r}, expected {SCHEMA!r}")
    arms = summary.get("arms")
    if not isinstance(arms, list):
        return [*problems, "arms is not a list"]
    for index, arm in enumerate(arms):
        for path in CONTRACT_ARM_PATHS:
            keys = path.split(".")
            node: Any = arm
            for key in keys:
                if not isinstance(node, Mapping) or key not in node:
                    problems.append(f"arms[{index}]: missing key {path!r}")
                    break
                node = node[key]
    return problems


def load_summary(path: str | Path) -> dict[str, Any]:
    """Read a ``summary.json`` (or a run folder holding one) and check the contract."""
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SummaryError(f"{path}: cannot read: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise SummaryError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise SummaryError(f"{path}: not UTF-8 text: {exc.reason}") from exc
    problems = contract_problems(data)
    if problems:
        raise SummaryError(f"{path}: not a {SCHEMA} summary: " + "; ".join(problems[:5]))
    result: dict[str, Any] = data
    return result


def arm_by_name(summary: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    """The arm object called ``name``, or None."""
    for arm in summary.get("arms", []):
        if arm.get("name") == name:
            found: Mapping[str, Any] = arm
            return found
    return None


def figure(summary: Mapping[str, Any], name: str) -> float | None:
    """The numeric figure ``<arm>.<path>`` (None when missing or not a number)."""
    arm_name, _, path = name.partition(".")
    arm = arm_by_name(summary, arm_name)
    value = dig(arm, path) if arm is not None else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def direction(name: str) -> str:
    """``higher`` or ``lower`` is better for figure ``<arm>.<path>`` (``equal`` when unknown)."""
    return DIRECTIONS.get(name.partition(".")[2], "equal")


@dataclass(frozen=True, slots=True)
class Check:
    """One ``expect:`` threshold held against an arm's figure."""

    arm: str
    threshold: str
    figure: str
    op: str
    limit: float
    now: float | None

    @property
    def ok(self) -> bool:
        """True when the figure is present and on the right side of the limit."""
        if self.now is None or math.isnan(self.now):
            return False
        return self.now >= self.limit if self.op == ">=" else self.now <= self.limit

    def as_dict(self) -> dict[str, Any]:
        """JSON form, as stored under ``checks`` in summary.json."""
        return {
            "arm": self.arm,
            "threshold": self.threshold,
            "figure": f"{self.arm}.{self.figure}",
            "op": self.op,
            "limit": self.limit,
            "now": self.now,
            "ok": self.ok,
        }


def evaluate_expect(
    arms: Sequence[Mapping[str, Any]], thresholds: Mapping[str, Mapping[str, float]]
) -> list[Check]:
    """Hold each arm's figures against its thresholds (``{arm: {min_items_per_min: ...}}``)."""
    checks: list[Check] = []
    for arm in arms:
        for key, limit in thresholds.get(str(arm.get("name")), {}).items():
            path, op = THRESHOLD_FIGURES[key]
            value = dig(arm, path)
            now = (
                float(value)
                if isinstance(value, int | float) and not isinstance(value, bool)
                else None
            )
            checks.append(Check(str(arm.get("name")), key, path, op, float(limit), now))
    return checks


def find_knee(
    values: Sequence[float],
    throughputs: Sequence[float],
    error_rates: Sequence[float],
    min_gain: float = 0.05,
    max_error_rate: float = 0.01,
) -> int:
    """Index of the knee of a sweep: the last setting before throughput stops improving by
    ``min_gain`` (relative) or the error rate passes ``max_error_rate``."""
    if not values:
        raise ValueError("an empty sweep has no knee")
    knee = 0
    for i in range(1, len(values)):
        if error_rates[i] > max_error_rate:
            break
        if throughputs[i] < throughputs[knee] * (1 + min_gain):
            break
        knee = i
    return knee


def write_summary(summary: Mapping[str, Any], path: str | Path) -> None:
    """Write ``summary`` as indented JSON (non-finite floats as null, so any JSON reader copes)."""
    Path(path).write_text(
        json.dumps(_finite(summary), indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value
