"""The throughput bound of DESIGN.md: the most items per minute the rate limits allow.

For requests carrying a system prompt of S tokens and b items of i input and o output
tokens each (or ``max_tokens`` where the provider reserves it):

    min( TPM * b / (S + b*(i+o)),  RPM * b,  60 * C * b / latency(b) )

with input and output TPM as separate terms where the provider splits them, and a daily
token cap as its average over the day (``TPD * b / (S + b*(i+o)) / 1440``): a job that
runs for days goes at that pace, whatever its TPM. The binding term is reported as one of
``tpm``, ``rpm``, ``tokens_per_day``, ``concurrency`` (the provider's concurrent request
limit) or ``latency`` (the client's own in-flight cap over the request latency).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

BINDINGS = ("tpm", "rpm", "tokens_per_day", "concurrency", "latency")
MINUTES_PER_DAY = 1440.0

# term of the bound -> the binding it reports as (input and output TPM are TPM)
TERM_BINDING = {
    "tpm": "tpm",
    "input_tpm": "tpm",
    "output_tpm": "tpm",
    "rpm": "rpm",
    "tokens_per_day": "tokens_per_day",
    "concurrency": "concurrency",
    "latency": "latency",
}


@dataclass(frozen=True, slots=True)
class BoundInputs:
    """What the bound needs: token sizes (tokens), limits per key, latency (seconds), key count.

    A limit left ``None`` does not bind. ``reserve_max_tokens`` counts ``max_tokens`` per
    request instead of the expected reply, as providers that reserve it up front do.
    """

    system_prompt_tokens: float
    batch_size: float
    item_tokens: float
    reply_tokens_per_item: float
    latency_s: float
    tpm: float | None = None
    input_tpm: float | None = None
    output_tpm: float | None = None
    rpm: float | None = None
    tokens_per_day: float | None = None
    provider_concurrency: float | None = None
    client_concurrency: float | None = None
    max_tokens: float | None = None
    reserve_max_tokens: bool = False
    overhead_tokens: float = 0.0
    keys: int = 1


@dataclass(frozen=True, slots=True)
class Bound:
    """The bound in items per (virtual) minute, the binding limit and every term's value."""

    items_per_min: float
    binding: str
    terms: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    batch_size: float = 1.0
    input_tokens_per_request: float = 0.0
    output_tokens_per_request: float = 0.0

    @property
    def requests_per_min(self) -> float:
        """Requests per minute at the bound."""
        return self.items_per_min / self.batch_size

    @property
    def tokens_per_item(self) -> float:
        """Input plus expected output tokens per item (the system prompt shared by the batch)."""
        return (self.input_tokens_per_request + self.output_tokens_per_request) / self.batch_size

    def efficiency(self, achieved_items_per_min: float) -> float:
        """Achieved / bound (0 when the bound is 0)."""
        return achieved_items_per_min / self.items_per_min if self.items_per_min > 0 else 0.0


def throughput_bound(inputs: BoundInputs) -> Bound:
    """The DESIGN.md bound for ``inputs``; raises ValueError when nothing bounds throughput."""
    b = inputs.batch_size
    if b <= 0:
        raise ValueError("batch_size must be > 0")
    prompt = inputs.overhead_tokens + inputs.system_prompt_tokens + b * inputs.item_tokens
    reply_expected = b * inputs.reply_tokens_per_item
    reply = reply_expected
    if inputs.reserve_max_tokens and inputs.max_tokens is not None:
        reply = max(reply_expected, inputs.max_tokens)
    keys = max(1, inputs.keys)
    terms: dict[str, float] = {}
    if inputs.tpm is not None:
        terms["tpm"] = keys * inputs.tpm * b / (prompt + reply)
    if inputs.input_tpm is not None and prompt > 0:
        terms["input_tpm"] = keys * inputs.input_tpm * b / prompt
    if inputs.output_tpm is not None and reply > 0:
        terms["output_tpm"] = keys * inputs.output_tpm * b / reply
    if inputs.rpm is not None:
        terms["rpm"] = keys * inputs.rpm * b
    if inputs.tokens_per_day is not None:
        # a day counts what was used (the reply's actual tokens), whatever TPM reserves
        terms["tokens_per_day"] = (keys * inputs.tokens_per_day * b
                                   / (prompt + reply_expected) / MINUTES_PER_DAY)
    if inputs.latency_s > 0:
        if inputs.provider_concurrency is not None:
            terms["concurrency"] = 60.0 * keys * inputs.provider_concurrency * b / inputs.latency_s
        if inputs.client_concurrency is not None:
            terms["latency"] = 60.0 * inputs.client_concurrency * b / inputs.latency_s
    if not terms:
        raise ValueError("no limit bounds throughput: give a TPM, RPM or concurrency and a latency")
    name = min(terms, key=lambda k: (terms[k], k))
    value = terms[name]
    return Bound(
        items_per_min=value if math.isfinite(value) else math.inf,
        binding=TERM_BINDING[name],
        terms=MappingProxyType(terms),
        batch_size=b,
        input_tokens_per_request=prompt,
        output_tokens_per_request=reply_expected,
    )
