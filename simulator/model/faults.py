"""Random and scheduled faults, decided with the provider's seeded RNG."""

from __future__ import annotations

import random
from dataclasses import dataclass

from simulator.model.config import FaultSpec
from simulator.model.plan import Fault


def outage_status(spec: FaultSpec, now: float) -> int | None:
    """The status of a scheduled outage covering virtual time ``now``, else None."""
    for outage in spec.outages:
        if outage.start_s <= now < outage.end_s:
            return outage.status
    return None


def random_5xx(spec: FaultSpec, rng: random.Random) -> int | None:
    """500 or 503 at their configured rates (one draw, disjoint intervals), else None."""
    if not (spec.error_500_rate or spec.error_503_rate):
        return None
    u = rng.random()
    if u < spec.error_500_rate:
        return 500
    if u < spec.error_500_rate + spec.error_503_rate:
        return 503
    return None


# Made for every admitted reply when per-reply faults are configured: a plain slots
# dataclass (a frozen one's __init__ sets each field through object.__setattr__), a value
# by convention (NO_FAULTS is shared: nothing changes one once made); ``unsafe_hash``
# keeps the hash a frozen one had.
@dataclass(slots=True, unsafe_hash=True)
class StreamFaults:
    """The faults drawn for one admitted chat reply."""

    fault: Fault | None
    slow_first_token_s: float  # extra virtual seconds before the first token
    repetition: bool  # replace the reply by a repetition loop


NO_FAULTS = StreamFaults(None, 0.0, False)


def has_stream_faults(spec: FaultSpec) -> bool:
    """Whether any per-reply fault is configured (lets the hot path skip the draws)."""
    return bool(spec.reset_rate or spec.hold_rate or spec.stall_rate
                or spec.mid_stream_error_rate or spec.slow_first_token_rate
                or spec.repetition_rate)


def draw_repetition(spec: FaultSpec, rng: random.Random) -> bool:
    """Whether this reply degenerates into a repetition loop."""
    return bool(spec.repetition_rate) and rng.random() < spec.repetition_rate


def draw_connection_fault(spec: FaultSpec, rng: random.Random, n_chunks: int) -> StreamFaults:
    """At most one connection fault (reset, hold, stall, error: disjoint, each at its own rate)
    for a reply of ``n_chunks`` chunks, plus an independent slow first token."""
    slow = 0.0
    if spec.slow_first_token_rate and rng.random() < spec.slow_first_token_rate:
        slow = spec.slow_first_token_s
    fault = None
    if spec.reset_rate or spec.hold_rate or spec.stall_rate or spec.mid_stream_error_rate:
        u = rng.random()
        edge = spec.reset_rate
        if u < edge:
            fault = Fault("reset", at_chunk=rng.randrange(max(1, n_chunks)))
        elif u < (edge := edge + spec.hold_rate):
            fault = Fault("hold", duration_s=spec.hold_s)
        elif u < (edge := edge + spec.stall_rate):
            fault = Fault("stall", at_chunk=rng.randrange(1, n_chunks) if n_chunks > 1 else 0,
                          duration_s=spec.stall_s)
        elif u < edge + spec.mid_stream_error_rate:
            fault = Fault("error", at_chunk=rng.randrange(max(1, n_chunks)))
    return StreamFaults(fault, slow, False)
