"""Token estimates that mirror the ratelab tokenizer of docs/conventions.md.

``text_tokens(s) = ceil(len(s) / 4)``; a chat prompt costs 3 tokens of reply priming
plus ``3 + text_tokens(content)`` per message. The simulator counts usage and limits with
the same rule, so these estimates are exact for the prompt side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

PRIMING_TOKENS = 3
PER_MESSAGE_TOKENS = 3


def text_tokens(text: str) -> int:
    """Tokens of a piece of text: ceil(len / 4), 0 for the empty string."""
    return (len(text) + 3) // 4


def chat_prompt_tokens(messages: Iterable[Mapping[str, str]]) -> int:
    """Prompt tokens of a chat request: 3 + sum over messages of (3 + text tokens)."""
    total = PRIMING_TOKENS
    for message in messages:
        total += PER_MESSAGE_TOKENS + text_tokens(str(message.get("content", "")))
    return total


def is_numeric_id(item_id: str) -> bool:
    """True when an id is all ASCII digits, so the batch_json reply carries it as an integer."""
    return item_id.isascii() and item_id.isdigit()


def canonical_id(item_id: str) -> str:
    """The id as it comes back in a reply: all-digit ids lose leading zeros (JSON integers)."""
    if item_id.isdigit() and item_id.isascii():
        return item_id.lstrip("0") or "0"
    return item_id


def reply_item_chars(item_id: str, code_len: int) -> int:
    """Characters of one compact reply object ``{"id":ID,"c":"X"}`` plus its comma."""
    if item_id.isdigit() and item_id.isascii():
        id_chars = len(item_id.lstrip("0")) or 1
    else:
        id_chars = len(item_id) + 2
    # {"id": (6) + id + ,"c":" (6) + code + "} (2) + separator (1)
    return 6 + id_chars + 6 + code_len + 2 + 1


def reply_tokens(item_ids: Iterable[str], code_len: int) -> int:
    """Completion tokens of a whole compact batch reply ``[{...},{...}]`` (exact, no slack)."""
    chars = 2 + sum(reply_item_chars(item_id, code_len) for item_id in item_ids)
    return (chars + 3) // 4
