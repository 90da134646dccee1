"""Interactive chat through the priority lane of a running job, with per-user limits.

``InteractiveClient(runner)`` forwards ``chat`` to ``Runner.chat``: the request jumps the
background queue, shares the job's throttle and providers, and is refused up front when
the user is over their tier's requests per minute or tokens per day.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from batchclient.policy.classify import Verdict
from batchclient.policy.userlimits import UserDecision
from batchclient.policy.wire import Response
from batchclient.runner import Runner


class UserLimited(RuntimeError):
    """The user is over a per-user limit, or (``stopped``) the lane stopped on a fatal
    answer; ``retry_in_s`` is virtual seconds (0 with ``stopped``: for good)."""

    def __init__(self, reason: str, retry_in_s: float, stopped: bool = False) -> None:
        super().__init__(reason)
        self.retry_in_s = retry_in_s
        self.stopped = stopped


@dataclass(frozen=True, slots=True)
class ChatReply:
    """An interactive reply: text (None on error), the verdict, the raw response."""

    text: str | None
    verdict: Verdict
    response: Response


class InteractiveClient:
    """Chat calls through ``runner``'s interactive lane (the runner must be running)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def chat(
        self,
        user: str,
        messages: Iterable[Mapping[str, str]],
        max_tokens: int = 256,
        model: str | None = None,
        tier: str | None = None,
        stream: bool | None = None,
    ) -> ChatReply:
        """Send one chat (streamed when ``stream``, else as the client's ``stream.enabled``);
        raises UserLimited when the user's bucket refuses it. The reply is final: retries
        and failover to the next provider already happened."""
        outcome = await self.runner.chat(user, messages, max_tokens, model, tier, stream)
        if isinstance(outcome, UserDecision):
            raise UserLimited(outcome.reason, outcome.retry_in_s, outcome.stopped)
        response, classified = outcome
        text = response.content
        if text is None and classified.verdict == Verdict.OK:
            try:
                data = json.loads(response.body)
                text = data["choices"][0]["message"]["content"]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                text = None
        return ChatReply(text, classified.verdict, response)
