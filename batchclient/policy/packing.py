"""Pack items into ``id=ID: text`` lines up to an item count and a token budget.

The reply is ``[{"id":...,"c":"X"},...]``; ``max_tokens`` is sized tightly from the ids
in the batch (see ``tokens.reply_tokens``) plus a small slack.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from batchclient.config import Task
from batchclient.policy.tokens import (
    PER_MESSAGE_TOKENS,
    PRIMING_TOKENS,
    reply_item_chars,
    text_tokens,
)
from batchclient.policy.wire import Item


def item_line(item: Item) -> str:
    """The prompt line of one item; newlines become spaces so it stays one line."""
    return f"id={item.id}: " + " ".join(item.text.splitlines())


def code_length(task: Task) -> int:
    """Longest label code of the task, in characters."""
    return max(len(code) for code in task.labels)


@dataclass(frozen=True, slots=True)
class Packer:
    """Token arithmetic of one task's batches (prompt and reply sizes in tokens)."""

    task: Task
    reply_slack_tokens: int = 4

    @property
    def fixed_prompt_tokens(self) -> int:
        """Tokens of a batch prompt before its item lines (system + instructions)."""
        return (PRIMING_TOKENS + PER_MESSAGE_TOKENS + text_tokens(self.task.system_prompt)
                + PER_MESSAGE_TOKENS)

    def user_message(self, items: Sequence[Item]) -> str:
        """The user message of a batch: instructions then one line per item."""
        lines = [self.task.instructions] if self.task.instructions else []
        lines.extend(item_line(item) for item in items)
        return "\n".join(lines)

    def messages(self, items: Sequence[Item]) -> list[dict[str, str]]:
        """Chat messages of a batch request."""
        return [
            {"role": "system", "content": self.task.system_prompt},
            {"role": "user", "content": self.user_message(items)},
        ]

    def prompt_tokens(self, items: Sequence[Item]) -> int:
        """Exact prompt tokens of a batch request under the ratelab tokenizer."""
        return self.fixed_prompt_tokens + text_tokens(self.user_message(items))

    def max_tokens(self, items: Sequence[Item]) -> int:
        """Tight ``max_tokens`` for the reply to ``items``: exact array size plus slack."""
        code_len = code_length(self.task)
        chars = 2 + sum(reply_item_chars(item.id, code_len) for item in items)
        return (chars + 3) // 4 + self.reply_slack_tokens

    def request_tokens(self, items: Sequence[Item]) -> int:
        """Prompt plus ``max_tokens``: what one request may cost in the worst case."""
        return self.prompt_tokens(items) + self.max_tokens(items)

    def pack(self, ready: Sequence[Item], max_items: int, token_budget: int) -> int:
        """How many items from the head of ``ready`` fit one request (at least 1 if any).

        Grows the batch while the item count stays within ``max_items`` and the prompt
        plus tight ``max_tokens`` within ``token_budget``. Incremental: O(batch size).
        """
        if not ready:
            return 0
        code_len = code_length(self.task)
        base_chars = len(self.task.instructions)
        fixed = self.fixed_prompt_tokens
        chars = base_chars
        reply_chars = 2
        count = 0
        for item in ready[:max_items]:
            line = len(item_line(item)) + (1 if chars or count else 0)
            new_chars = chars + line
            new_reply = reply_chars + reply_item_chars(item.id, code_len)
            total = fixed + (new_chars + 3) // 4 + (new_reply + 3) // 4 + self.reply_slack_tokens
            if count and total > token_budget:
                break
            chars, reply_chars, count = new_chars, new_reply, count + 1
        return count
