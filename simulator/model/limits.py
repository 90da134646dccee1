"""Rate-limit windows (sliding, token bucket, fixed) and the per key+model limit state.

Capacities are per window: a per-minute limit L judged over a window of W seconds allows
L * W / 60 in any window (Azure's 600 RPM over 1 s allows 10). All times are virtual seconds.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass

from simulator.model.config import LimitSpec

INF = math.inf
# float slack so that a request admitted "exactly at" the reset time is admitted
_EPS = 1e-9
DAY_S = 86_400.0
# expired entries dropped from a sliding window's buffers once this many have piled up
_COMPACT_AT = 1024


class SlidingWindow:
    """Rolling window: amounts added in the last ``window_s`` seconds must sum to <= capacity.

    Entries live in two parallel ``array('d')`` (times, amounts) read from a head index, so
    a window holding a minute of traffic is two flat buffers the garbage collector never
    traverses (one list per entry made full collections stall a busy server for tens of
    ms). A handle is the entry's sequence number; entries before the head have expired.
    """

    __slots__ = ("_amounts", "_base", "_expired_at", "_head", "_times", "capacity", "total",
                 "window_s")

    def __init__(self, capacity: float, window_s: float):
        self.capacity = capacity
        self.window_s = window_s
        self.total = 0.0
        self._times = array("d")
        self._amounts = array("d")
        self._head = 0  # index of the oldest entry still in the window
        self._base = 0  # sequence number (handle) of index 0
        # the `now` of the last expiry: a response checks, counts and renders one window
        # several times at one instant, and entries added since are all younger
        self._expired_at = math.nan

    def _expire(self, now: float) -> None:
        if now == self._expired_at:
            return
        self._expired_at = now
        times = self._times
        head = self._head
        end = len(times)
        if head < end and times[head] <= now - self.window_s + _EPS:
            horizon = now - self.window_s + _EPS
            amounts = self._amounts
            total = self.total
            while head < end and times[head] <= horizon:
                total -= amounts[head]
                head += 1
            self.total = total
            if head == end or (head >= _COMPACT_AT and 2 * head >= end):
                # drop the expired prefix: amortised O(1) per entry
                del times[:head]
                del self._amounts[:head]
                self._base += head
                head = 0
            self._head = head
        if head == len(times):
            self.total = 0.0  # drop accumulated float error

    # Each method below tests the instant itself before calling _expire: a response
    # reaches one window four or five times at one instant, and a call is dearer than the test.

    def used(self, now: float) -> float:
        """Amount counted in the window ending at ``now``."""
        if now != self._expired_at:
            self._expire(now)
        return self.total

    def wait(self, now: float, amount: float) -> float:
        """Seconds until ``amount`` fits (0 if it fits now, inf if it never can)."""
        if amount > self.capacity + _EPS:
            return INF
        if now != self._expired_at:
            self._expire(now)
        excess = self.total + amount - self.capacity
        if excess <= _EPS:
            return 0.0
        freed = 0.0
        times, amounts = self._times, self._amounts
        for i in range(self._head, len(times)):
            freed += amounts[i]
            if freed >= excess - _EPS:
                return max(0.0, times[i] + self.window_s - now)
        return self.window_s  # unreachable when amount <= capacity

    def add(self, now: float, amount: float) -> object:
        """Count ``amount`` at ``now``; returns a handle for ``adjust``."""
        if now != self._expired_at:
            self._expire(now)
        handle = self._base + len(self._times)
        self._times.append(now)
        self._amounts.append(amount)
        self.total += amount
        return handle

    def adjust(self, now: float, handle: object, delta: float) -> None:
        """Change an earlier amount by ``delta`` (settling a reservation); no-op once it expired."""
        if not isinstance(handle, int):
            return
        i = handle - self._base
        if self._head <= i < len(self._amounts):
            amount = self._amounts[i]
            if -amount > delta:  # max(delta, -amount) without the call
                delta = -amount
            self._amounts[i] = amount + delta
            self.total += delta

    def reset_in(self, now: float) -> float:
        """Seconds until the window is empty again (back to its initial state)."""
        if now != self._expired_at:
            self._expire(now)
        if self._head == len(self._times) or self.total <= _EPS:
            return 0.0
        left = self._times[-1] + self.window_s - now
        return left if left > 0.0 else 0.0  # max(0.0, left) without the call


class TokenBucket:
    """Bucket of ``capacity`` refilled continuously at capacity / window_s per second."""

    __slots__ = ("_last", "capacity", "level", "rate", "window_s")

    def __init__(self, capacity: float, window_s: float):
        self.capacity = capacity
        self.window_s = window_s
        self.rate = capacity / window_s
        self.level = capacity
        self._last = 0.0

    def _refill(self, now: float) -> None:
        if now > self._last:
            self.level = min(self.capacity, self.level + (now - self._last) * self.rate)
            self._last = now

    def used(self, now: float) -> float:
        """Capacity currently missing from the bucket."""
        self._refill(now)
        return self.capacity - self.level

    def wait(self, now: float, amount: float) -> float:
        """Seconds until the bucket holds ``amount`` (inf if it exceeds the capacity)."""
        if amount > self.capacity + _EPS:
            return INF
        self._refill(now)
        if self.level >= amount - _EPS:
            return 0.0
        return (amount - self.level) / self.rate

    def add(self, now: float, amount: float) -> object:
        """Take ``amount`` out of the bucket (the level may go negative)."""
        self._refill(now)
        self.level -= amount
        return None

    def adjust(self, now: float, handle: object, delta: float) -> None:
        """Take ``delta`` more (or give back -delta), never above capacity."""
        self._refill(now)
        self.level = min(self.capacity, self.level - delta)

    def reset_in(self, now: float) -> float:
        """Seconds until the bucket is full."""
        self._refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate)


class FixedWindow:
    """Counter reset at every multiple of ``window_s`` (virtual time 0 is a boundary)."""

    __slots__ = ("capacity", "generation", "start", "total", "window_s")

    def __init__(self, capacity: float, window_s: float):
        self.capacity = capacity
        self.window_s = window_s
        self.start = 0.0
        self.total = 0.0
        self.generation = 0

    def _roll(self, now: float) -> None:
        if now >= self.start + self.window_s - _EPS:
            self.start = math.floor((now + _EPS) / self.window_s) * self.window_s
            self.total = 0.0
            self.generation += 1

    def used(self, now: float) -> float:
        """Amount counted in the current window."""
        self._roll(now)
        return self.total

    def wait(self, now: float, amount: float) -> float:
        """Seconds until ``amount`` fits: 0, the time to the next boundary, or inf."""
        if amount > self.capacity + _EPS:
            return INF
        self._roll(now)
        if self.total + amount <= self.capacity + _EPS:
            return 0.0
        return max(0.0, self.start + self.window_s - now)

    def add(self, now: float, amount: float) -> object:
        """Count ``amount`` in the current window; the handle is the window's generation."""
        self._roll(now)
        self.total += amount
        return self.generation

    def adjust(self, now: float, handle: object, delta: float) -> None:
        """Settle an amount counted in the same window; a past window is left alone."""
        self._roll(now)
        if handle == self.generation:
            self.total = max(0.0, self.total + delta)

    def reset_in(self, now: float) -> float:
        """Seconds until the next boundary (0 if nothing is counted)."""
        self._roll(now)
        if self.total <= _EPS:
            return 0.0
        return max(0.0, self.start + self.window_s - now)


Window = SlidingWindow | TokenBucket | FixedWindow
_ALGORITHMS: dict[str, type[SlidingWindow] | type[TokenBucket] | type[FixedWindow]] = {
    "sliding": SlidingWindow,
    "token_bucket": TokenBucket,
    "fixed": FixedWindow,
}


def make_window(algorithm: str, per_minute: int, window_s: float) -> Window:
    """A window of ``algorithm`` enforcing ``per_minute`` scaled to ``window_s`` seconds."""
    capacity = max(1.0, per_minute * window_s / 60.0)
    return _ALGORITHMS[algorithm](capacity, window_s)


# the limits in the order they are checked; the name is what 429 messages and stats use
REQUESTS, TOKENS, INPUT, OUTPUT, DAY, CONCURRENCY = (
    "requests", "tokens", "input_tokens", "output_tokens", "tokens_per_day", "concurrency",
)


# Made for every refused request (twice when the full gate explains a refusal): a plain
# slots dataclass (a frozen one's __init__ sets each field through object.__setattr__), a
# value by convention; ``unsafe_hash`` keeps the hash a frozen one had.
@dataclass(slots=True, unsafe_hash=True)
class Denial:
    """Why a request was refused: which limit, its figures, and when a retry can succeed."""

    limit: str  # one of REQUESTS, TOKENS, INPUT, OUTPUT, DAY, CONCURRENCY
    capacity: float  # per window
    used: float
    requested: float
    wait_s: float  # virtual seconds until the request fits (inf: never, too large)

    @property
    def too_large(self) -> bool:
        """The request alone exceeds the limit: no retry can ever succeed."""
        return math.isinf(self.wait_s)


def _denial(name: str, window: Window, now: float, amount: float) -> Denial:
    return Denial(name, window.capacity, window.used(now), amount, window.wait(now, amount))


class LimitState:
    """The live limits of one key on one model: windows per limit and the in-flight count."""

    __slots__ = ("concurrency", "day", "inflight", "input", "output", "requests", "spec",
                 "tokens")

    def __init__(self, spec: LimitSpec):
        self.spec = spec
        algo = spec.algorithm
        self.requests: Window | None = None
        if spec.rpm is not None:
            self.requests = make_window(algo, spec.rpm, spec.request_window_s or spec.window_s)
        self.tokens = make_window(algo, spec.tpm, spec.window_s) if spec.tpm else None
        self.input = make_window(algo, spec.input_tpm, spec.window_s) if spec.input_tpm else None
        self.output = (make_window(algo, spec.output_tpm, spec.window_s)
                       if spec.output_tpm else None)
        self.day = (FixedWindow(float(spec.tokens_per_day), DAY_S)
                    if spec.tokens_per_day else None)
        self.concurrency = spec.concurrency
        self.inflight = 0

    def reservation(self, prompt: int, max_tokens: int | None, n: int, best_of: int) -> int:
        """Tokens counted on the TPM window at admission under the spec's counting mode."""
        mode = self.spec.counting
        if mode == "actual":
            return prompt
        cap = max_tokens if max_tokens is not None else self.spec.default_max_tokens
        if mode == "reserve":
            return prompt + n * cap
        if mode == "max_estimate":
            return max(prompt, max_tokens or 0)
        return prompt + cap + best_of  # azure

    def check(self, now: float, reserved: int, prompt: int) -> Denial | None:
        """The first limit that refuses a request counting ``reserved`` TPM tokens, or None."""
        if self.concurrency is not None and self.inflight >= self.concurrency:
            return Denial(CONCURRENCY, self.concurrency, self.inflight, 1, 1.0)
        # spelled out rather than looped over a tuple built per request: the hot path
        if self.requests is not None and self.requests.wait(now, 1) > 0.0:
            return _denial(REQUESTS, self.requests, now, 1)
        if self.tokens is not None and self.tokens.wait(now, reserved) > 0.0:
            return _denial(TOKENS, self.tokens, now, reserved)
        if self.input is not None and self.input.wait(now, prompt) > 0.0:
            return _denial(INPUT, self.input, now, prompt)
        # output is counted as generated: the check is only "not exhausted"
        if self.output is not None and self.output.wait(now, 1) > 0.0:
            return _denial(OUTPUT, self.output, now, 1)
        if self.day is not None and self.day.wait(now, prompt) > 0.0:
            return _denial(DAY, self.day, now, prompt)
        return None

    def retry_wait(self, now: float, reserved: int, prompt: int) -> float:
        """Virtual seconds until every limit admits this request (after counting refusals)."""
        wait = 0.0
        for window, amount in ((self.requests, 1), (self.tokens, reserved),
                               (self.input, prompt), (self.output, 1), (self.day, prompt)):
            if window is not None:
                wait = max(wait, window.wait(now, amount))
        return wait

    def count_request(self, now: float) -> None:
        """Count one request on the RPM window (a refused or failed request)."""
        if self.requests is not None:
            self.requests.add(now, 1)

    def admit(self, now: float, reserved: int, prompt: int) -> object:
        """Count an admitted request on every window and take a concurrency slot; returns
        the TPM window's handle, which ``settle`` needs (with ``reserved`` and ``prompt``:
        the caller keeps the three on its own per-admission record, no ticket object)."""
        if self.requests is not None:
            self.requests.add(now, 1)
        handle = self.tokens.add(now, reserved) if self.tokens is not None else None
        if self.input is not None:
            self.input.add(now, prompt)
        if self.day is not None:
            self.day.add(now, prompt)
        self.inflight += 1
        return handle

    def settle(self, now: float, tokens_handle: object, reserved: int, prompt: int,
               completion: int) -> None:
        """Settle to actual usage: ``completion`` tokens were generated and delivered, of an
        admission that counted ``reserved`` TPM tokens (``tokens_handle``) for ``prompt``."""
        inflight = self.inflight - 1
        self.inflight = inflight if inflight > 0 else 0
        if self.tokens is not None:
            if self.spec.counting == "actual":
                if completion:
                    self.tokens.add(now, completion)
            else:
                self.tokens.adjust(now, tokens_handle, prompt + completion - reserved)
        if self.output is not None and completion:
            self.output.add(now, completion)
        if self.day is not None and completion:
            self.day.add(now, completion)
