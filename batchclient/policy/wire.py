"""Transport-neutral values exchanged between the engine and whoever drives it.

The asyncio runner turns a ``Call`` into an HTTP request and the reply into a ``Response``;
the SimPy planner builds ``Response`` values straight from the provider model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

ErrorKind = Literal["timeout", "reset", "connect", "watchdog_first_token", "watchdog_loop"]


@dataclass(frozen=True, slots=True)
class Item:
    """One work item: an id matching ``[A-Za-z0-9_.-]+``, one text, optional tag and user."""

    id: str
    text: str
    tag: str | None = None


# Usage, Call and Response are made once or twice per request on the hot path of the client
# and of the planner: plain slots dataclasses, since a frozen one's __init__ sets each
# field through object.__setattr__ (Call: about 4x the cost of a plain one). They stay
# values by convention: nothing changes one once made (the engine, the runner, the
# planner and the recorders only read them). ``unsafe_hash`` keeps the hash a frozen
# dataclass had (by fields; a Call or Response holding a dict was never hashable).


@dataclass(slots=True, unsafe_hash=True)
class Usage:
    """Tokens the provider reports for one request."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True, unsafe_hash=True)
class Call:
    """One request the engine wants sent: an OpenAI chat-completions body to a provider.

    ``prompt_tokens`` is the exact ratelab-tokenizer prompt size, ``reserved_tokens`` what
    the throttle reserved for it, ``timeout_s`` the virtual deadline of the whole call.
    ``request_id`` is the interactive request a call is an attempt of (None for batches);
    ``resend`` is True when any of its items was sent before (a 429, an error or a skip).
    """

    call_id: int
    provider: str
    model: str
    item_ids: tuple[str, ...]
    body: Mapping[str, object]
    prompt_tokens: int
    max_tokens: int
    reserved_tokens: int
    attempt: int
    timeout_s: float
    stream: bool = False
    lane: Literal["background", "interactive"] = "background"
    sent_at: float = 0.0
    request_id: int | None = None
    resend: bool = False


@dataclass(slots=True, unsafe_hash=True)
class Response:
    """What came back for a call: status 0 with ``error`` set when no HTTP reply arrived.

    ``content``/``finish_reason``/``usage`` may be given directly (streams, the planner);
    otherwise the engine reads them from ``body`` (OpenAI chat-completion JSON text).
    Durations are virtual seconds.
    """

    status: int
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = ""
    content: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    elapsed_s: float = 0.0
    ttft_s: float | None = None
    error: ErrorKind | None = None
    # the tool calls a streamed reply made, put together from its deltas (OpenAI's
    # ``message.tool_calls`` shape); a non-stream reply keeps them in ``body``
    tool_calls: tuple[Mapping[str, Any], ...] = ()
