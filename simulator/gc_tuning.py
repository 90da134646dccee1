"""Garbage-collector settings for a process whose main job is serving the simulator.

A busy simulator keeps every in-flight request's objects (aiohttp's request, task,
coroutine frames, the model's admission; about 55 tracked objects each) young for as
long as the request sleeps. CPython's young collections run every 700 net allocations
and walk all of them: with 1,000 requests in flight that is a 2-8 ms stall several times
a second, and full collections also walk every object created at import (about 47,000),
20-80 ms each. Both land directly on served latencies.

``tune_for_serving`` is a deliberate, process-wide setting for ``ratelab serve`` (and the
benchmark that measures it), never for a process that merely embeds the simulator
(tests, ``serve_in_thread``): it freezes what start-up created, so that collections no
longer walk it, and raises the young-generation threshold so that collections run when
garbage actually accumulates, not every few hundred allocations. Objects still die by
reference counting as before; only reference cycles wait longer (at most
``YOUNG_THRESHOLD`` net allocations) to be collected.
"""

from __future__ import annotations

import gc

#: net container allocations between young collections (CPython's default is 700)
YOUNG_THRESHOLD = 20_000


def tune_for_serving(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Collect once, freeze the surviving start-up objects and raise the young threshold.

    Call after the server has started (its routes, models and imports exist). Idempotent
    enough to call twice: a second call freezes whatever was created in between.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
