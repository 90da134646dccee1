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
    kind = dist.kind
    if kind == "constant":
        return (dist.value * factor,) * count
    if kind == "lognormal":
        drawn = rng.lognormal(dist.mu, dist.sigma, count)
    elif kind == "normal":
        drawn = np.maximum(rng.normal(dist.mean, dist.std, count), 0.0)
    elif kind == "uniform":
        drawn = rng.uniform(dist.low, dist.high, count)
    else:
        drawn = np.asarray(dist.values, dtype=float)[rng.integers(0, len(dist.values), count)]
    if factor != 1.0:
        drawn = drawn * factor
    return tuple(drawn.tolist())
