"""Fan-out: one input to N models in parallel, so the call takes the slowest one's time."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

from batchclient.policy.tokens import chat_prompt_tokens
from batchclient.policy.wire import Call, Response
from batchclient.transport import Transport


async def fan_out(
    transport: Transport,
    targets: Sequence[tuple[str, str]],
    messages: Sequence[Mapping[str, str]],
    max_tokens: int,
    timeout_s: float = 60.0,
) -> dict[tuple[str, str], Response]:
    """Send ``messages`` to every (provider, model) in ``targets`` at once; returns the
    responses keyed by target. Elapsed time is the slowest target's, not the sum."""
    prompt = chat_prompt_tokens(messages)
    calls = [
        Call(call_id=-(i + 1), provider=provider, model=model, item_ids=(),
             body={"model": model, "messages": [dict(m) for m in messages],
                   "max_tokens": max_tokens},
             prompt_tokens=prompt, max_tokens=max_tokens, reserved_tokens=prompt + max_tokens,
             attempt=0, timeout_s=timeout_s, lane="interactive")
        for i, (provider, model) in enumerate(targets)
    ]
    responses = await asyncio.gather(*(transport.send(call) for call in calls))
    return {(c.provider, c.model): r for c, r in zip(calls, responses, strict=True)}
