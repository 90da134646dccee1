"""Per key and model counters, and their Prometheus text rendering for ``/metrics``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(slots=True)
class Counters:
    """What one key did on one model: requests by HTTP status, tokens, USD charged."""

    statuses: dict[int, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usd: float = 0.0

    def count(self, status: int) -> None:
        """Count one request answered with ``status``."""
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def as_dict(self) -> dict:
        """JSON-ready view (status codes as strings)."""
        return {
            "requests": {str(k): v for k, v in sorted(self.statuses.items())},
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "usd": round(self.usd, 10),
        }


def mask_key(key: str) -> str:
    """An API key shortened for an unauthenticated page: ``sk-...abcd``."""
    return key if len(key) <= 8 else f"{key[:3]}...{key[-4:]}"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(stats: Iterable[dict]) -> str:
    """Prometheus text exposition of providers' ``Provider.stats()`` dicts (keys masked)."""
    requests: list[str] = []
    tokens: list[str] = []
    usd: list[str] = []
    balance: list[str] = []
    inflight: list[str] = []
    queued: list[str] = []
    for s in stats:
        p = _label(s["provider"])
        inflight.append(f'ratelab_inflight{{provider="{p}"}} {s["in_flight"]}')
        queued.append(f'ratelab_gpu_queue{{provider="{p}"}} {s["queued"]}')
        for key, entry in s["keys"].items():
            k = _label(mask_key(key))
            if entry["balance_usd"] is not None:
                balance.append(
                    f'ratelab_balance_usd{{provider="{p}",key="{k}"}} {entry["balance_usd"]}')
            for model, c in entry["models"].items():
                m = _label(model)
                base = f'provider="{p}",key="{k}",model="{m}"'
                for status, n in c["requests"].items():
                    requests.append(f'ratelab_requests_total{{{base},status="{status}"}} {n}')
                tokens.append(f'ratelab_tokens_total{{{base},kind="prompt"}} '
                              f'{c["prompt_tokens"]}')
                tokens.append(f'ratelab_tokens_total{{{base},kind="completion"}} '
                              f'{c["completion_tokens"]}')
                usd.append(f'ratelab_charged_usd_total{{{base}}} {c["usd"]}')
    out = []
    for name, kind, help_text, lines in (
        ("ratelab_requests_total", "counter", "Requests by HTTP status.", requests),
        ("ratelab_tokens_total", "counter", "Tokens counted in usage.", tokens),
        ("ratelab_charged_usd_total", "counter", "USD charged.", usd),
        ("ratelab_balance_usd", "gauge", "Prepaid balance left in USD.", balance),
        ("ratelab_inflight", "gauge", "Requests in flight.", inflight),
        ("ratelab_gpu_queue", "gauge", "Requests waiting for a GPU slot.", queued),
    ):
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"
