"""Seeded latency sampling: TTFT and inter-token gaps, with the self-hosted GPU load model."""

from __future__ import annotations

import random

import numpy as np

from simulator.model.config import Dist, GpuSpec, LatencySpec


def sample(dist: Dist, rng: random.Random) -> float:
    """One non-negative draw from ``dist`` (seconds or tokens, per the key that names it)."""
    kind = dist.kind
    if kind == "constant":
        return dist.value
    if kind == "lognormal":
        return rng.lognormvariate(dist.mu, dist.sigma)
    if kind == "normal":
        return max(0.0, rng.gauss(dist.mean, dist.std))
    if kind == "uniform":
        return rng.uniform(dist.low, dist.high)
    values = dist.values
    return values[int(rng.random() * len(values))]


def gpu_itl_factor(gpu: GpuSpec | None, seqs_in_flight: int) -> float:
    """Multiplier of the inter-token latency with ``seqs_in_flight`` sequences decoding together."""
    if gpu is None or seqs_in_flight <= gpu.knee_seqs:
        return 1.0
    return 1.0 + gpu.itl_growth_per_seq * (seqs_in_flight - gpu.knee_seqs)


def ttft(spec: LatencySpec, rng: random.Random, prompt_tokens: int) -> float:
    """Virtual seconds to the first token: a draw plus prefill time for the prompt."""
    return sample(spec.ttft_s, rng) + spec.prefill_s_per_token * prompt_tokens


def gaps(spec: LatencySpec, rng: np.random.Generator, count: int,
         factor: float) -> tuple[float, ...]:
    """``count`` inter-token gaps in virtual seconds, each scaled by the load ``factor``.

    Drawn in one numpy call (a reply has hundreds of tokens; one Python draw each was the
    provider model's hot spot), from the provider's own gap generator.
    """
    if count <= 0:
        return ()
    dist = spec.itl_s
    if dist.kind == "constant":
        return (dist.value * factor,) * count
    drawn = _draw(dist, rng, count)
    if factor != 1.0:
        drawn = drawn * factor
    return tuple(drawn.tolist())


class GapSource:
    """``gaps`` of one provider, drawn ahead in blocks: the same gaps, reply after reply.

    A generator's draws of one distribution come in the same order whether asked for in
    one call or several (numpy's ziggurat, doubles and bounded integers keep no state
    outside the bit generator between calls), so ``BLOCK`` gaps drawn at once and handed
    out ``count`` at a time are the values ``gaps`` would draw reply by reply: a reply's
    ~110 gaps cost a slice instead of a numpy call. The one generator must serve nothing
    else (the provider's own gap generator).
    """

    BLOCK = 8192

    __slots__ = ("_block", "_next", "_rng", "_spec")

    def __init__(self, spec: LatencySpec, rng: np.random.Generator) -> None:
        self._spec = spec
        self._rng = rng
        # a tuple: a reply's gaps are a slice of it, one copy (a list's slice made a tuple
        # would be two)
        self._block: tuple[float, ...] = ()
        self._next = 0

    def take(self, count: int, factor: float) -> tuple[float, ...]:
        """``gaps(spec, rng, count, factor)`` of the next reply (virtual seconds)."""
        if count <= 0:
            return ()
        dist = self._spec.itl_s
        if dist.kind == "constant":
            return (dist.value * factor,) * count
        start, block = self._next, self._block
        end = start + count
        if end > len(block):
            # the unused tail first, then as many fresh draws as this reply needs beyond it
            fresh = tuple(_draw(dist, self._rng, max(self.BLOCK, count)).tolist())
            block = self._block = block[start:] + fresh
            start, end = 0, count
        self._next = end
        if factor != 1.0:
            # numpy's elementwise product is the same IEEE multiplication
            return tuple([gap * factor for gap in block[start:end]])
        return block[start:end]


def _draw(dist: Dist, rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` draws of a non-constant ``dist`` in one numpy call."""
    kind = dist.kind
    if kind == "lognormal":
        return rng.lognormal(dist.mu, dist.sigma, count)
    if kind == "normal":
        return np.maximum(rng.normal(dist.mean, dist.std, count), 0.0)
    if kind == "uniform":
        return rng.uniform(dist.low, dist.high, count)
    return np.asarray(dist.values, dtype=float)[rng.integers(0, len(dist.values), count)]
