"""Garbage-collector settings for a process whose main job is one batch job (``ratelab job``).

The runner allocates a few dozen tracked objects per item (its page's items, the engine's
item states, the reply's parsed objects, results and events). CPython's young collections
run every 700 net allocations and its full collections walk every object alive, the
modules imported at start-up included (about 45,000): in a 20-item batch request that is
5-6% of the client's instructions spent finding no garbage (``bench_client.py
--instructions``, with and without ``--default-gc``).

``tune_for_job`` is a deliberate, process-wide setting for ``ratelab job`` (and the
benchmark that measures it), never for a process that merely embeds the client (the
Locust harness, the gateway, tests): it freezes what start-up created, so that
collections no longer walk it, and raises the young-generation threshold so that
collections run when garbage could have accumulated. Objects still die by reference
counting; only reference cycles wait longer (at most ``YOUNG_THRESHOLD`` net
allocations). The simulator's ``ratelab serve`` does the same for its own reasons
(``simulator/gc_tuning.py``; the two packages never import each other).
"""

from __future__ import annotations

import gc

#: net container allocations between young collections (CPython's default is 700)
YOUNG_THRESHOLD = 20_000


def tune_for_job(young_threshold: int = YOUNG_THRESHOLD) -> None:
    """Collect once, freeze the surviving start-up objects and raise the young threshold.

    Call once the job's items are imported, just before the run.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)
