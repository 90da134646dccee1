"""One-line progress of a job: items done, items/min, tokens/min against the limit, cost, ETA."""

from __future__ import annotations

from dataclasses import dataclass

# the shortest span (virtual seconds) a rate is given over
MIN_RATE_SPAN_S = 1.0


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    """Figures of a running job at virtual time ``elapsed_s`` since it started."""

    elapsed_s: float
    done: int
    dead: int
    total: int
    tokens: int
    cost_usd: float
    tpm_limit: int | None = None
    rate_limited: int = 0
    done_before: int = 0  # settled by earlier runs of a resumed job: in the counts and the
    dead_before: int = 0  # bar, not in the rate or the ETA
    paused_s: float = 0.0  # virtual seconds every provider still waits out a 429

    @property
    def items_per_min(self) -> float:
        """Finished items per virtual minute so far (0 in the first virtual second, when one
        reply would read as hundreds of thousands a minute)."""
        if self.elapsed_s < MIN_RATE_SPAN_S:
            return 0.0
        return 60.0 * (self.done + self.dead) / self.elapsed_s

    @property
    def tokens_per_min(self) -> float:
        """Tokens per virtual minute so far (0 in the first virtual second)."""
        return 60.0 * self.tokens / self.elapsed_s if self.elapsed_s >= MIN_RATE_SPAN_S else 0.0

    @property
    def eta_s(self) -> float | None:
        """Virtual seconds left at the current rate after the pause on a 429's retry-after,
        None before the first item."""
        rate = self.items_per_min
        left = self.total - self.done - self.dead
        return None if rate <= 0 else self.paused_s + 60.0 * left / rate


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def render(snapshot: ProgressSnapshot, width: int = 20) -> str:
    """The progress line, e.g. ``[#####.....] 500/1000 done 3 dead | 1200 items/min | ...``;
    a resumed job's counts and bar include what earlier runs settled ("400 before")."""
    s = snapshot
    before = s.done_before + s.dead_before
    total = s.total + before
    finished = s.done + s.dead + before
    filled = int(width * finished / total) if total else width
    bar = "#" * filled + "." * (width - filled)
    tpm = f"{s.tokens_per_min:,.0f} tok/min"
    if s.tpm_limit:
        tpm += f" of {s.tpm_limit:,} ({100.0 * s.tokens_per_min / s.tpm_limit:.0f}%)"
    resumed = f" ({before:,} before)" if before else ""
    # a wait of a second or more on every provider's retry-after: say so, or it looks hung
    paused = (f" | paused {_duration(s.paused_s)} on a 429's retry-after"
              if s.paused_s >= 1.0 else "")
    return (f"[{bar}] {s.done + s.done_before}/{total} done {s.dead + s.dead_before} dead"
            f"{resumed} | {s.items_per_min:,.0f} items/min | {tpm} | 429s {s.rate_limited}"
            f" | ${s.cost_usd:.4f} | ETA {_duration(s.eta_s)}{paused}")
