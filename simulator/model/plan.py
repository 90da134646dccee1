"""The values the model hands to its shells: refusals, admissions and response plans."""

from __future__ import annotations

import operator
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import reduce
from itertools import accumulate, islice

from simulator.model.tokens import CHARS_PER_TOKEN, split_chunks

# A reply's chunk time is a running sum of its gaps from t0 + ttft, rounded after each
# addition, and must be the same float wherever it is computed (the planner reads one
# time of a reply, the server sleeps until each). Before 3.12, sum() adds floats one by
# one in a C double, left to right: those roundings, several times faster than a fold
# (a plan sums ~110 gaps a reply). 3.12's sum() compensates the roundings: a fold there.
if sys.version_info < (3, 12):
    def _running_sum(values: Iterable[float], start: float) -> float:
        """``start`` plus each of ``values`` in order, one rounding per addition."""
        return sum(values, start)
else:
    def _running_sum(values: Iterable[float], start: float) -> float:
        """``start`` plus each of ``values`` in order, one rounding per addition."""
        return reduce(operator.add, values, start)


# Usage and ResponsePlan are made on every admission, a Fault on every faulted reply and
# a Refusal on every refused request (a run against a tight window refuses most): plain
# slots dataclasses, since a frozen one's __init__ costs three times as much
# (object.__setattr__ per field). Treat them as values all the same: nothing changes them
# once made (``unsafe_hash`` keeps the hash the frozen ones had).


@dataclass(slots=True)
class Usage:
    """Token usage of a reply, as OpenAI's ``usage`` object reports it."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(slots=True, unsafe_hash=True)
class Fault:
    """What the shell must do to the connection (see provider.py's docstring for each kind)."""

    kind: str  # reset | hold | stall | error
    at_chunk: int = 0
    duration_s: float = 0.0  # virtual seconds (hold, stall)


@dataclass(slots=True)
class ResponsePlan:
    """How to deliver a reply: first-chunk delay, gaps between chunks, the text, the fault.

    The reply goes out in chunks of 4 characters, one token each (the last may be
    shorter); ``chunks`` splits ``text`` on first use only, since a non-stream reply is
    sent whole and never needs the split.
    """

    ttft_s: float  # virtual seconds before the first byte/chunk
    itl_s: tuple[float, ...]  # virtual gap before each later chunk (n_chunks - 1)
    text: str  # the whole reply
    finish_reason: str  # stop | length | error
    usage: Usage
    fault: Fault | None = None
    tool_call: str | None = None  # the function a tool-call reply calls; ``text`` its arguments
    _chunks: tuple[str, ...] | None = field(default=None, init=False, repr=False,
                                            compare=False)

    @property
    def n_chunks(self) -> int:
        """Number of chunks (tokens) of the reply."""
        return (len(self.text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN

    def chunk_times(self, t0: float) -> list[float]:
        """Virtual time (seconds) each chunk is due when the reply starts at ``t0``: one
        entry even for an empty reply; a stall fault delays chunk ``at_chunk`` and every
        later one. The server sleeps until these times; the planner waits for them."""
        gaps = self.n_chunks - 1
        if gaps < 0:
            gaps = 0
        itl = self.itl_s
        # a running sum from t0 + ttft, one gap at a time in order (the same floats as the
        # loop it replaces), summed in C by accumulate
        times = list(accumulate(itl if len(itl) <= gaps else itl[:gaps],
                                initial=t0 + self.ttft_s))
        fault = self.fault
        if fault is not None and fault.kind == "stall":
            at = min(fault.at_chunk, len(times) - 1)
            for i in range(at, len(times)):
                times[i] += fault.duration_s
        return times

    def chunk_time(self, t0: float, index: int) -> float:
        """``chunk_times(t0)[min(index, last)]`` (a negative ``index``: the last chunk's)
        without the list: the same running sum, stopped at the chunk wanted. A plan needs
        one time of a reply (its end, or where a fault cuts it), not every chunk's."""
        gaps = self.n_chunks - 1
        if gaps < 0:
            gaps = 0
        itl = self.itl_s
        if len(itl) < gaps:
            gaps = len(itl)
        if index < 0 or index > gaps:
            index = gaps
        # folded left to right from t0 + ttft: bit for bit the list's entry
        due = _running_sum(itl if index == len(itl) else islice(itl, index), t0 + self.ttft_s)
        fault = self.fault
        if fault is not None and fault.kind == "stall" and index >= min(fault.at_chunk, gaps):
            due += fault.duration_s
        return due

    @property
    def chunks(self) -> tuple[str, ...]:
        """The reply split into its streamed chunks (computed once)."""
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = split_chunks(self.text)  # a cache: the value is unchanged
        return chunks


@dataclass(slots=True, unsafe_hash=True)
class Refusal:
    """A refused request: status, OpenAI error body, headers (retry-after, rate limits on 429)."""

    status: int
    body: dict
    headers: dict[str, str]


@dataclass(slots=True)
class Admission:
    """An admitted request; only ``plan`` changes (set when a GPU slot starts it)."""

    id: int
    kind: str  # chat | embeddings
    model: str
    stream: bool
    include_usage: bool
    headers: dict[str, str]  # rate-limit and billing headers of the 200 reply
    plan: ResponsePlan | None  # None while queued for a GPU slot
    created: int  # unix seconds for the response body
    n: int = 1  # chat: choices, each carrying the same chunks
    n_inputs: int = 0  # embeddings: number of inputs
    dims: int = 0  # embeddings: vector length
    inputs: tuple[str, ...] = field(default=())  # embeddings: input texts (token lists as text)
    encoding_format: str = "float"  # embeddings: float | base64
