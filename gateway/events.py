"""In-process event hub (task state changes and streamed tokens) and the gateway's counters.

The hub reaches subscribers in the same process; with Redis, ``gateway.relay`` carries
events between processes, and an SSE subscriber also polls the store (pub/sub delivers at
most once), so it sees the states of a task another gateway process runs in any case.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from batchclient.cost import CostMeter

Event = dict[str, Any]


class EventHub:
    """Fan-out of per-task events to the asyncio queues subscribed to that task.

    The tokens of a streaming task are also kept (``keep_s`` wall seconds after it ends) so
    a subscriber who arrives late still gets the whole reply. A ``restart`` event (an
    attempt that streamed tokens failed and the task is tried again) drops the kept tokens:
    they belong to a reply that will not be the result, and a subscriber drops those it got.
    """

    def __init__(self, keep_s: float = 60.0, max_tokens: int = 100_000) -> None:
        self._subs: dict[str, set[asyncio.Queue[Event]]] = defaultdict(set)
        self._tokens: dict[str, list[Event]] = {}
        self.keep_s = keep_s
        self.max_tokens = max_tokens
        # where events of tasks run here also go (the other processes), if anywhere
        self.relay: Callable[[str, Event], None] | None = None

    def subscribe(self, task_id: str) -> asyncio.Queue[Event]:
        """A queue receiving every later event of ``task_id``."""
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._subs[task_id].add(q)
        return q

    def tokens(self, task_id: str) -> list[Event]:
        """Token events of the task seen so far by this process."""
        return list(self._tokens.get(task_id, ()))

    def unsubscribe(self, task_id: str, q: asyncio.Queue[Event]) -> None:
        """Stop delivering to ``q``."""
        subs = self._subs.get(task_id)
        if subs is not None:
            subs.discard(q)
            if not subs:
                del self._subs[task_id]

    def publish(self, task_id: str, event: Event) -> None:
        """An event of a task this process runs: to the local subscribers and the relay."""
        self.deliver(task_id, event)
        if self.relay is not None:
            self.relay(task_id, event)

    def deliver(self, task_id: str, event: Event) -> None:
        """Deliver ``event`` to the task's local subscribers (none: dropped)."""
        if "token" in event:
            kept = self._tokens.setdefault(task_id, [])
            if len(kept) < self.max_tokens:
                kept.append(event)
        elif "restart" in event:
            self._tokens.pop(task_id, None)
        elif (event.get("state") in ("done", "failed", "dead_lettered", "queued")
              and task_id in self._tokens):
            if event["state"] == "queued":
                del self._tokens[task_id]   # retried: the next attempt streams anew
            else:
                asyncio.get_running_loop().call_later(
                    self.keep_s, self._tokens.pop, task_id, None)
        for q in self._subs.get(task_id, ()):
            q.put_nowait(event)


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


class Metrics:
    """Counters of one gateway process: accepted and refused tasks, outcomes, latencies
    (virtual seconds from acceptance to a final state, the last ``keep`` per lane)."""

    def __init__(self, keep: int = 20000) -> None:
        self.accepted: dict[str, int] = defaultdict(int)
        self.refused: dict[tuple[str, str], int] = defaultdict(int)
        self.finished: dict[tuple[str, str], int] = defaultdict(int)
        self.upstream_calls: dict[int, int] = defaultdict(int)
        self.upstream_calls_by: dict[tuple[str, int], int] = defaultdict(int)
        self.unavailable = 0
        # upstreams out of the rotation and why (the router's own map, read live)
        self.out_of_rotation: Mapping[str, str] = {}
        # what each upstream charged (the batching client's meter: charge headers, else
        # the upstream's prices) and the balance it reports; the charges by lane and user
        self.costs: dict[str, CostMeter] = {}
        self.cost_by_user: dict[str, float] = defaultdict(float)
        self.cache_hits = 0   # packed items answered from the item cache
        self._latency: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=keep))

    def observe_latency(self, lane: str, seconds: float) -> None:
        """Record one time-to-result."""
        self._latency[lane].append(seconds)

    def latency(self, lane: str) -> dict[str, float]:
        """p50/p95/p99 and count of the lane's recent times to result (seconds)."""
        values = sorted(self._latency.get(lane, ()))
        return {"count": float(len(values)), "p50": _quantile(values, 0.5),
                "p95": _quantile(values, 0.95), "p99": _quantile(values, 0.99)}

    def snapshot(self, depths: Mapping[str, int] | None) -> dict[str, Any]:
        """Everything as JSON-ready values (``GET /metrics?format=json``)."""
        return {
            "queue_depth": dict(depths) if depths is not None else None,
            "accepted": dict(self.accepted),
            "refused": [{"tier": t, "limit": lim, "count": n}
                        for (t, lim), n in sorted(self.refused.items())],
            "finished": [{"lane": lane, "state": s, "count": n}
                         for (lane, s), n in sorted(self.finished.items())],
            "upstream_calls": {str(k): v for k, v in sorted(self.upstream_calls.items())},
            "upstream_calls_by_upstream": self._by_upstream(),
            "state_unavailable": self.unavailable,
            "out_of_rotation": dict(self.out_of_rotation),
            "item_cache_hits": self.cache_hits,
            "cost_usd": {
                "total": sum(m.total_usd for m in self.costs.values()),
                "by_upstream": {name: {"total": m.total_usd, "by_model": dict(m.by_model),
                                       "balance": m.balance_usd}
                                for name, m in sorted(self.costs.items())},
                # the meters' tasks are the lanes (``WorkerPool._charge``)
                "by_lane": _summed(m.by_task for m in self.costs.values()),
                "by_user": dict(self.cost_by_user)},
            "latency_s": {lane: self.latency(lane) for lane in sorted(self._latency)},
        }

    def _by_upstream(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (name, status), n in sorted(self.upstream_calls_by.items()):
            out.setdefault(name, {})[str(status)] = n
        return out

    def prometheus(self, depths: Mapping[str, int] | None) -> str:
        """The same figures in Prometheus text format."""
        lines = ["# TYPE ratelab_gateway_queue_depth gauge"]
        for q, n in sorted((depths or {}).items()):
            lines.append(f'ratelab_gateway_queue_depth{{queue="{q}"}} {n}')
        lines.append("# TYPE ratelab_gateway_accepted_total counter")
        for lane, n in sorted(self.accepted.items()):
            lines.append(f'ratelab_gateway_accepted_total{{lane="{lane}"}} {n}')
        lines.append("# TYPE ratelab_gateway_refused_total counter")
        for (tier, limit), n in sorted(self.refused.items()):
            lines.append(f'ratelab_gateway_refused_total{{tier="{tier}",limit="{limit}"}} {n}')
        lines.append("# TYPE ratelab_gateway_finished_total counter")
        for (lane, state), n in sorted(self.finished.items()):
            lines.append(f'ratelab_gateway_finished_total{{lane="{lane}",state="{state}"}} {n}')
        lines.append("# TYPE ratelab_gateway_upstream_calls_total counter")
        for (name, status), n in sorted(self.upstream_calls_by.items()):
            lines.append(f'ratelab_gateway_upstream_calls_total{{upstream="{name}",'
                         f'status="{status}"}} {n}')
        lines.append("# TYPE ratelab_gateway_upstream_out_of_rotation gauge")
        for name in sorted(self.out_of_rotation):
            lines.append(f'ratelab_gateway_upstream_out_of_rotation{{upstream="{name}"}} 1')
        lines.append("# TYPE ratelab_gateway_item_cache_hits_total counter")
        lines.append(f"ratelab_gateway_item_cache_hits_total {self.cache_hits}")
        lines.append("# TYPE ratelab_gateway_cost_usd_total counter")
        for name, meter in sorted(self.costs.items()):
            for model, usd in sorted(meter.by_model.items()):
                lines.append(f'ratelab_gateway_cost_usd_total{{upstream="{name}",'
                             f'model="{model}"}} {usd:.9f}')
        lines.append("# TYPE ratelab_gateway_balance_usd gauge")
        for name, meter in sorted(self.costs.items()):
            if meter.balance_usd is not None:
                lines.append(f'ratelab_gateway_balance_usd{{upstream="{name}"}} '
                             f'{meter.balance_usd:.9f}')
        lines.append("# TYPE ratelab_gateway_state_unavailable_total counter")
        lines.append(f"ratelab_gateway_state_unavailable_total {self.unavailable}")
        lines.append("# TYPE ratelab_gateway_time_to_result_seconds summary")
        for lane in sorted(self._latency):
            stats = self.latency(lane)
            for q in ("p50", "p95", "p99"):
                quant = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}[q]
                lines.append(f'ratelab_gateway_time_to_result_seconds{{lane="{lane}",'
                             f'quantile="{quant}"}} {stats[q]:.6f}')
            lines.append(f'ratelab_gateway_time_to_result_seconds_count{{lane="{lane}"}} '
                         f'{int(stats["count"])}')
        return "\n".join(lines) + "\n"


def _summed(parts: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Values of the same key added across ``parts``."""
    out: dict[str, float] = defaultdict(float)
    for part in parts:
        for key, value in part.items():
            out[key] += value
    return dict(out)
