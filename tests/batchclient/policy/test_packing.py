"""Packing's greedy fit: the whole-head sum ``pack_sizes`` takes when every item fits gives
what growing the batch item by item gives, for any sizes, budget and instructions."""

from __future__ import annotations

import random

from batchclient.policy.packing import Packer
from tests.batchclient.bc_fakes import task


def test_pack_sizes_is_the_item_by_item_greedy_fit() -> None:
    rng = random.Random(7)
    packers = [Packer(task()), Packer(task(instructions=""), reply_slack_tokens=0),
               Packer(task(instructions="x"), reply_slack_tokens=9)]
    whole = 0
    for _ in range(20_000):
        packer = rng.choice(packers)
        sizes = [(rng.randrange(0, 400), rng.randrange(0, 40))
                 for _ in range(rng.randrange(0, 30))]
        max_items = rng.randrange(1, 32)
        head = sizes[:max_items]
        everything = packer.grow(head, 10 ** 9)[1] + packer.grow(head, 10 ** 9)[2]
        budget = rng.randrange(max(1, everything - 60), everything + 60)
        fit = packer.pack_sizes(sizes, max_items, budget)
        assert fit == packer.grow(head, budget), (sizes, max_items, budget)
        whole += bool(head) and fit[0] == len(head)
    assert whole > 5_000  # the whole-head path was taken often, not only the item by item
