"""The live progress line and the error-rate guard of ``ratelab run``.

The parent tails the Locust processes' event logs (``events-*.jsonl``) as they grow, so the
line and the guard see every process, distributed or not, without touching Locust's
internals. Rates are per virtual minute.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.rundir import EVENTS_GLOB


@dataclass(slots=True)
class Totals:
    """Running totals over every process's events (virtual seconds, tokens, USD)."""

    items_done: int = 0
    items_dead: int = 0
    requests: int = 0
    ok: int = 0
    http_429: int = 0
    errors: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    first_t: float = math.inf
    last_t: float = -math.inf
    # the processes that stopped at their share of the spend cap (their pids): each holds
    # its requests within its share, so the spend itself may never reach the whole cap
    capped: set[int] = field(default_factory=set)

    def add(self, rec: dict[str, object]) -> None:
        """Account one ``type: event`` record."""
        t = float(rec.get("t", 0.0))  # type: ignore[arg-type]
        self.first_t = min(self.first_t, t)
        self.last_t = max(self.last_t, t)
        if rec.get("kind") == "item":
            n = int(rec.get("items", 1))  # type: ignore[call-overload]
            if rec.get("outcome") in ("done", "cached"):
                self.items_done += n
            elif rec.get("outcome") == "dead_letter":
                self.items_dead += n
            return
        if rec.get("kind") != "request":
            return  # a chat a per-user limit refused: nothing was sent
        self.requests += 1
        outcome = rec.get("outcome")
        if outcome == "ok":
            self.ok += 1
        elif outcome == "http_429":
            self.http_429 += 1
        else:
            self.errors += 1
        self.tokens += int(rec.get("tokens_in", 0)) + int(rec.get("tokens_out", 0))  # type: ignore[call-overload]
        self.cost_usd += float(rec.get("cost_usd", 0.0))  # type: ignore[arg-type]

    @property
    def minutes(self) -> float:
        """Virtual minutes between the first and the last event."""
        span = self.last_t - self.first_t
        return span / 60.0 if math.isfinite(span) and span > 0 else 0.0

    @property
    def error_rate(self) -> float:
        """Failed requests (not counting 429s, which pace the job) over all requests."""
        return self.errors / self.requests if self.requests else 0.0


@dataclass(slots=True)
class EventTail:
    """Reads the new complete lines of every event log of a run folder on each ``poll``."""

    run_dir: Path
    totals: Totals = field(default_factory=Totals)
    _offsets: dict[Path, int] = field(default_factory=dict)

    def poll(self) -> Totals:
        """Account what was appended since the last poll; returns the totals."""
        for path in sorted(self.run_dir.glob(EVENTS_GLOB)):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
            end = data.rfind(b"\n")
            if end < 0:
                continue
            for line in data[: end + 1].splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("type") == "event":
                    self.totals.add(rec)
                elif rec.get("type") == "stop" and rec.get("reason") == "spend_cap":
                    self.totals.capped.add(int(rec.get("pid", 0)))
            self._offsets[path] = offset + end + 1
        return self.totals


def guard_tripped(totals: Totals, max_error_rate: float, min_requests: int) -> bool:
    """True once at least ``min_requests`` were sent and the error rate exceeds the maximum."""
    return totals.requests >= min_requests and totals.error_rate > max_error_rate


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--"
    seconds = max(0.0, seconds)
    if seconds >= 3600:
        return f"{seconds / 3600:.1f}h"
    if seconds >= 60:
        return f"{seconds / 60:.0f}m"
    return f"{seconds:.0f}s"


def render(totals: Totals, items_total: int, tpm_limit: float | None) -> str:
    """``items 1,200/20,000 | 3,400 items/min | 180,000/200,000 tok/min | 429s 2 | ...``.

    No rate is given over less than a virtual second of events: two replies a few
    milliseconds apart would read as a rate thousands of times the job's."""
    minutes = totals.minutes if totals.minutes * 60.0 >= 1.0 else 0.0
    rate = totals.items_done / minutes if minutes else 0.0
    tpm = totals.tokens / minutes if minutes else 0.0
    parts = []
    if items_total:
        pct = 100.0 * totals.items_done / items_total
        parts.append(f"items {totals.items_done:,}/{items_total:,} ({pct:.0f}%)")
    parts.append(f"{rate:,.0f} items/min")
    limit = f"/{tpm_limit:,.0f}" if tpm_limit else ""
    parts.append(f"{tpm:,.0f}{limit} tok/min")
    parts.append(f"req {totals.requests:,}")
    parts.append(f"429s {totals.http_429:,}")
    parts.append(f"errors {totals.errors:,}")
    parts.append(f"USD {totals.cost_usd:,.4f}")
    if items_total:
        left = items_total - totals.items_done - totals.items_dead
        eta = left / rate * 60.0 if rate > 0 else None
        parts.append(f"ETA {_duration(eta)} (virtual)")
    return " | ".join(parts)
