"""The ratelab tokenizer (docs/conventions.md): 4 characters = 1 token, no vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

#: tokens added once per chat prompt for reply priming
PROMPT_PRIMING_TOKENS = 3
#: tokens added per chat message for its framing
PER_MESSAGE_TOKENS = 3
#: characters per token, and per streamed chunk
CHARS_PER_TOKEN = 4


def text_tokens(text: str) -> int:
    """Tokens of ``text``: ceil(len(text) / 4), 0 for the empty string."""
    return (len(text) + 3) // 4


def message_text(content: object) -> str:
    """The text of a chat message's ``content``: a string, or the joined text parts of a list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def chat_prompt_tokens(contents: Sequence[str]) -> int:
    """Prompt tokens of a chat request whose messages carry the texts ``contents``."""
    total = PROMPT_PRIMING_TOKENS
    for text in contents:
        total += PER_MESSAGE_TOKENS + (len(text) + 3) // 4
    return total


def split_chunks(text: str) -> tuple[str, ...]:
    """Split a reply into streamed chunks of 4 characters, one token each (last may be shorter)."""
    return tuple(text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN))
