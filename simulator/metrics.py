"""Prometheus text exposition of the simulator: the shell's HTTP counters and the model's stats."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping


class ShellCounters:
    """What the HTTP shell saw: responses by provider, endpoint and status, requests in
    flight and requests queued for a GPU slot. A dropped connection is counted as the
    status a proxy would log for it: 502 for a reset, 504 for a held-then-closed one."""

    __slots__ = ("_in_flight", "_queued", "_responses")

    def __init__(self) -> None:
        self._responses: Counter[tuple[str, str, int]] = Counter()
        self._in_flight: Counter[str] = Counter()
        self._queued: Counter[str] = Counter()

    def response(self, provider: str, endpoint: str, status: int) -> None:
        """Count one answered request."""
        self._responses[(provider, endpoint, status)] += 1

    def in_flight(self, provider: str, delta: int) -> None:
        """Move the gauge of admitted requests not yet finished."""
        self._in_flight[provider] += delta

    def queued(self, provider: str, delta: int) -> None:
        """Move the gauge of admitted requests waiting for a GPU slot."""
        self._queued[provider] += delta

    def gauges(self, provider: str) -> tuple[int, int]:
        """(in flight, queued) for one provider."""
        return self._in_flight[provider], self._queued[provider]

    def responses(self) -> dict[tuple[str, str, int], int]:
        """A copy of the response counts by (provider, endpoint, status)."""
        return dict(self._responses)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


Leaf = tuple[tuple[str, ...], float]


def _flatten(prefix: tuple[str, ...], value: object, out: list[Leaf]) -> None:
    if isinstance(value, int | float):  # bool included
        out.append((prefix, float(value)))
    elif isinstance(value, Mapping):
        for key, child in value.items():
            _flatten((*prefix, str(key)), child, out)


def render_metrics(counters: ShellCounters, stats: Mapping[str, object]) -> str:
    """The ``/metrics`` page: shell counters, then every numeric leaf of each provider's
    ``stats()`` as ``ratelab_model_stat{provider, path}`` (path joined with ``/``)."""
    lines = [
        "# HELP ratelab_http_responses_total Responses by provider, endpoint and HTTP status.",
        "# TYPE ratelab_http_responses_total counter",
    ]
    for (provider, endpoint, status), n in sorted(counters.responses().items()):
        lines.append(
            f'ratelab_http_responses_total{{provider="{_label(provider)}",'
            f'endpoint="{endpoint}",status="{status}"}} {n}'
        )
    lines += [
        "# HELP ratelab_in_flight Admitted requests not yet finished.",
        "# TYPE ratelab_in_flight gauge",
    ]
    for provider in stats:
        lines.append(f'ratelab_in_flight{{provider="{_label(provider)}"}} '
                     f"{counters.gauges(provider)[0]}")
    lines += [
        "# HELP ratelab_queued Admitted requests waiting for a GPU slot.",
        "# TYPE ratelab_queued gauge",
    ]
    for provider in stats:
        lines.append(f'ratelab_queued{{provider="{_label(provider)}"}} '
                     f"{counters.gauges(provider)[1]}")
    lines += [
        "# HELP ratelab_model_stat Numeric figures of the provider model's stats().",
        "# TYPE ratelab_model_stat gauge",
    ]
    for provider, provider_stats in stats.items():
        leaves: list[Leaf] = []
        _flatten((), provider_stats, leaves)
        for path, value in leaves:
            lines.append(
                f'ratelab_model_stat{{provider="{_label(provider)}",'
                f'path="{_label("/".join(path))}"}} {value!r}'
            )
    return "\n".join(lines) + "\n"
