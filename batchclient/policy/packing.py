"""Pack items into ``id=ID: text`` lines up to an item count and a token budget.

The reply is ``[{"id":...,"c":"X"},...]``; ``max_tokens`` is sized tightly from the ids
in the batch (see ``tokens.reply_tokens``) plus a small slack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from operator import itemgetter
from typing import Protocol

from batchclient.config import BatchSettings, Task
from batchclient.policy.tokens import (
    PER_MESSAGE_TOKENS,
    PRIMING_TOKENS,
    reply_item_chars,
    text_tokens,
)
from batchclient.policy.wire import Item


class Packable(Protocol):
    """What packing reads of an item: an ``Item``, or the engine's ``ItemState`` (which holds
    the id and text itself, so a batch is packed without an ``Item`` per item)."""

    @property
    def id(self) -> str: ...

    @property
    def text(self) -> str: ...


# the two columns of an item's packing sizes (prompt line, reply object characters)
_LINE, _REPLY = itemgetter(0), itemgetter(1)

# what str.splitlines breaks on besides "\n"
_OTHER_BREAKS = re.compile("[\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


def _breaks_line(body: str) -> bool:
    """Whether ``body`` holds a line break other than "\\n" (what str.splitlines breaks on)."""
    if body.isascii():
        # a substring search per ASCII break: a third of the regular expression's cost
        return ("\r" in body or "\x0b" in body or "\x0c" in body or "\x1c" in body
                or "\x1d" in body or "\x1e" in body)
    return _OTHER_BREAKS.search(body) is not None


def item_line(item: Packable) -> str:
    """The prompt line of one item; newlines become spaces so it stays one line."""
    return f"id={item.id}: " + " ".join(item.text.splitlines())


def code_length(task: Task) -> int:
    """Longest label code of the task, in characters."""
    return max(len(code) for code in task.labels)


#: tokens a JSON-mode reply may add around its array: the object and the key the model
#: picks (``{"results":...}`` is 12 characters, 3 tokens; models pick longer keys too)
JSON_MODE_WRAPPER_TOKENS = 6


def answer_schema(task: Task) -> dict[str, object]:
    """The strict JSON schema of a batch's answers (``batch.json_schema``):
    ``{"results": [{"id": ID, "c": CODE}, ...]}``, each code one of the task's. An id may be
    an integer or a string, so that a model writes an all-digit id as the array does."""
    answer = {"type": "object",
              "properties": {"id": {"type": ["integer", "string"]},
                             "c": {"type": "string", "enum": list(task.labels)}},
              "required": ["id", "c"], "additionalProperties": False}
    return {"type": "object", "properties": {"results": {"type": "array", "items": answer}},
            "required": ["results"], "additionalProperties": False}


def response_format(task: Task, batch: BatchSettings) -> dict[str, object] | None:
    """The ``response_format`` of a job's requests: JSON mode, the answers' schema, or
    None (a plain array)."""
    if batch.json_schema:
        return {"type": "json_schema", "json_schema": {
            "name": "batch_answers", "strict": True, "schema": answer_schema(task)}}
    if batch.json_mode:
        return {"type": "json_object"}
    return None


def definition_tokens(fmt: dict[str, object] | None) -> int:
    """Prompt tokens a ``response_format`` adds: its schema's compact JSON text, as a
    provider bills the text it is sent (JSON mode adds none)."""
    spec = fmt.get("json_schema") if fmt else None
    if not isinstance(spec, dict):
        return 0
    return text_tokens(json.dumps(spec.get("schema", {}), separators=(",", ":"),
                                  ensure_ascii=False))


def batch_packer(task: Task, batch: BatchSettings) -> Packer:
    """The packer of a job's batches: ``max_tokens`` keeps the configured slack and, in
    JSON mode or under the schema, room for the object around the array; the prompt
    counts the schema's text."""
    wrapper = JSON_MODE_WRAPPER_TOKENS if batch.wrapped else 0
    return Packer(task, batch.reply_slack_tokens + wrapper,
                  definition_tokens(response_format(task, batch)))


class Packer:
    """Token arithmetic of one task's batches (prompt and reply sizes in tokens)."""

    __slots__ = ("_code_len", "_fixed", "reply_slack_tokens", "task")

    def __init__(self, task: Task, reply_slack_tokens: int = 4,
                 definition_tokens: int = 0) -> None:
        self.task = task
        self.reply_slack_tokens = reply_slack_tokens
        self._code_len = code_length(task)
        self._fixed = (PRIMING_TOKENS + PER_MESSAGE_TOKENS + text_tokens(task.system_prompt)
                       + PER_MESSAGE_TOKENS + definition_tokens)

    @property
    def fixed_prompt_tokens(self) -> int:
        """Tokens of a batch prompt before its item lines (system, a response schema, then
        the instructions)."""
        return self._fixed

    def user_message(self, items: Sequence[Packable]) -> str:
        """The user message of a batch: instructions then one line per item."""
        instructions = self.task.instructions
        if not items:
            return instructions
        lines = [f"id={item.id}: {item.text}" for item in items]
        body = "\n".join(lines)
        # The common case, checked over the whole message at once: no text breaks a line,
        # so each ``item_line`` is the plain line. Otherwise build every line properly.
        # (No "\n" in a line: one search over the lines joined, a fraction of the cost
        # of counting the message's line breaks a character at a time.)
        if "\n" in "".join(lines) or _breaks_line(body):
            body = "\n".join([item_line(item) for item in items])
        return instructions + "\n" + body if instructions else body

    def messages(self, items: Sequence[Packable]) -> list[dict[str, str]]:
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
        chars = 2 + sum(reply_item_chars(item.id, self._code_len) for item in items)
        return (chars + 3) // 4 + self.reply_slack_tokens

    def request_tokens(self, items: Sequence[Item]) -> int:
        """Prompt plus ``max_tokens``: what one request may cost in the worst case."""
        return self.prompt_tokens(items) + self.max_tokens(items)

    def sizes(self, item: Item) -> tuple[int, int]:
        """(prompt line characters, reply object characters) of one item, computed once."""
        # id=ID: + text with newlines as spaces has the text's length plus the prefix.
        return len(item.id) + 5 + len(item.text), reply_item_chars(item.id, self._code_len)

    def alone_tokens(self, sizes: tuple[int, int]) -> int:
        """Prompt plus ``max_tokens`` of a request carrying only the item of ``sizes``."""
        instructions = len(self.task.instructions)
        chars = instructions + sizes[0] + (1 if instructions else 0)
        return self._fixed + (chars + 3) // 4 + (2 + sizes[1] + 3) // 4 + self.reply_slack_tokens

    def pack_sizes(self, sizes: Sequence[tuple[int, int]], max_items: int,
                   token_budget: int) -> tuple[int, int, int]:
        """Greedy fit from the head of ``sizes``: (count, prompt tokens, max_tokens).

        Grows the batch while the item count stays within ``max_items`` and the prompt
        plus tight ``max_tokens`` within ``token_budget``; at least one item if any.
        """
        instructions = len(self.task.instructions)
        fixed = self.fixed_prompt_tokens
        slack = self.reply_slack_tokens
        head = sizes[:max_items]
        if head:
            # The common batch: the whole head fits. A batch's tokens only grow with its
            # items, so when all of them fit the greedy fit takes all: summed a column at a
            # time rather than grown item by item (lines one break apart, and one after
            # the instructions when there are any).
            chars = instructions + sum(map(_LINE, head)) + len(head) - (0 if instructions else 1)
            reply_chars = 2 + sum(map(_REPLY, head))
            if fixed + (chars + 3) // 4 + (reply_chars + 3) // 4 + slack <= token_budget:
                return len(head), fixed + (chars + 3) // 4, (reply_chars + 3) // 4 + slack
        return self.grow(head, token_budget)

    def grow(self, sizes: Sequence[tuple[int, int]], token_budget: int
             ) -> tuple[int, int, int]:
        """``pack_sizes`` of a head of at most ``max_items`` sizes, item by item."""
        instructions = len(self.task.instructions)
        fixed = self.fixed_prompt_tokens
        slack = self.reply_slack_tokens
        chars = instructions
        reply_chars = 2
        count = 0
        for line, reply in sizes:
            new_chars = chars + line + (1 if chars or count else 0)
            new_reply = reply_chars + reply
            total = fixed + (new_chars + 3) // 4 + (new_reply + 3) // 4 + slack
            if count and total > token_budget:
                break
            chars, reply_chars, count = new_chars, new_reply, count + 1
        return count, fixed + (chars + 3) // 4, (reply_chars + 3) // 4 + slack

    def pack(self, ready: Sequence[Item], max_items: int, token_budget: int) -> int:
        """How many items from the head of ``ready`` fit one request (at least 1 if any)."""
        return self.pack_sizes([self.sizes(i) for i in ready[:max_items]], max_items,
                               token_budget)[0]
