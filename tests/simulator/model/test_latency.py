"""Inter-token gaps: drawn ahead in blocks, they are the gaps drawn reply by reply."""

from __future__ import annotations

import numpy as np
import pytest

from simulator.model.latency import GapSource, gaps
from simulator.model.profile import Dist, LatencySpec

DISTS = [
    Dist.lognormal(0.03, 0.09),
    Dist("normal", mean=0.02, std=0.03),  # clipped at 0: some draws are exactly 0.0
    Dist("uniform", low=0.005, high=0.05),
    Dist("empirical", values=(0.01, 0.02, 0.04, 0.08, 0.16)),
    Dist.constant(0.025),
]


@pytest.mark.parametrize("dist", DISTS, ids=lambda d: d.kind)
def test_blocks_hand_out_the_gaps_each_reply_would_draw(dist: Dist) -> None:
    spec = LatencySpec(itl_s=dist)
    direct = np.random.default_rng(11)
    source = GapSource(spec, np.random.default_rng(11))
    counts = np.random.default_rng(3).integers(0, 400, 300).tolist()
    # a block's end met exactly, crossed, and a reply longer than a whole block
    counts[50:50] = [GapSource.BLOCK - sum(counts[:50]) % GapSource.BLOCK, 1, 0]
    counts.append(3 * GapSource.BLOCK + 7)
    factors = (1.0, 1.0, 1.37, 0.6)
    for n, count in enumerate(counts):
        factor = factors[n % len(factors)]
        assert source.take(count, factor) == gaps(spec, direct, count, factor), (n, count)

