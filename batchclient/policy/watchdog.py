"""Streaming watchdog decisions: a late first token, or text fallen into a loop."""

from __future__ import annotations


def first_token_late(elapsed_s: float, first_token_s: float) -> bool:
    """True when no token came within ``first_token_s`` seconds (virtual)."""
    return elapsed_s > first_token_s


def repetition_loop(text: str, min_period: int = 8, repeats: int = 4,
                    max_period: int = 200) -> bool:
    """True when the text ends in a block of ``min_period``..``max_period`` characters
    repeated ``repeats`` times back to back (a model stuck in a loop)."""
    n = len(text)
    for period in range(min_period, min(max_period, n // repeats) + 1):
        block = text[n - period:]
        if text[n - period * repeats:] == block * repeats:
            return True
    return False
