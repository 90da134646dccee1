"""``/metrics``: the shell's HTTP response counters, then the model's own Prometheus figures."""

from __future__ import annotations

from collections.abc import Iterable

from simulator.model.stats import render_prometheus


class ShellCounters:
    """HTTP answers by provider, endpoint and status as the shell wrote them, including the
    ones the model never sees (unparsable or oversized bodies). A dropped connection counts
    as the status a proxy would log for it: 502 for a reset, 504 for a held-then-closed one."""

    __slots__ = ("_statuses",)

    def __init__(self) -> None:
        self._statuses: dict[tuple[str, str], dict[int, int]] = {}

    def statuses(self, provider: str, endpoint: str) -> dict[int, int]:
        """The live counts by status of one provider and endpoint, for a handler to add
        to (``d[status] = d.get(status, 0) + 1``): the labels are looked up once, not per
        request."""
        counts = self._statuses.get((provider, endpoint))
        if counts is None:
            counts = self._statuses[(provider, endpoint)] = {}
        return counts

    def response(self, provider: str, endpoint: str, status: int) -> None:
        """Count one answered request."""
        counts = self.statuses(provider, endpoint)
        counts[status] = counts.get(status, 0) + 1

    def responses(self) -> dict[tuple[str, str, int], int]:
        """A copy of the counts by (provider, endpoint, status)."""
        return {(provider, endpoint, status): n
                for (provider, endpoint), counts in self._statuses.items()
                for status, n in counts.items() if n}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(counters: ShellCounters, stats: Iterable[dict]) -> str:
    """The ``/metrics`` page (Prometheus text format) from the counters and each
    provider's ``stats()``."""
    lines = [
        "# HELP ratelab_http_responses_total HTTP responses by provider, endpoint and status.",
        "# TYPE ratelab_http_responses_total counter",
    ]
    for (provider, endpoint, status), n in sorted(counters.responses().items()):
        lines.append(f'ratelab_http_responses_total{{provider="{_label(provider)}",'
                     f'endpoint="{endpoint}",status="{status}"}} {n}')
    return "\n".join(lines) + "\n" + render_prometheus(stats)
