"""The values the model hands to its shells: refusals, admissions and response plans."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of a reply, as OpenAI's ``usage`` object reports it."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


@dataclass(frozen=True, slots=True)
class Fault:
    """What the shell must do to the connection (see provider.py's docstring for each kind)."""

    kind: str  # reset | hold | stall | error
    at_chunk: int = 0
    duration_s: float = 0.0  # virtual seconds (hold, stall)


@dataclass(frozen=True, slots=True)
class ResponsePlan:
    """How to deliver a reply: first-chunk delay, gaps between chunks, the chunks, the fault."""

    ttft_s: float  # virtual seconds before the first byte/chunk
    itl_s: tuple[float, ...]  # virtual gap before each later chunk (len(chunks) - 1)
    chunks: tuple[str, ...]  # 4 characters = 1 token each
    finish_reason: str  # stop | length | error
    usage: Usage
    fault: Fault | None = None


@dataclass(frozen=True, slots=True)
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
