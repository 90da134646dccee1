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


class LoopWatch:
    """Watches a streamed reply's text as it grows: ``feed`` says when it ends in a loop.

    Checked each time ``CHECK_EVERY`` more characters came (a check per token would cost
    a scan of the tail per token), over the last ``TAIL`` characters (no loop the checks
    look for is longer).
    """

    CHECK_EVERY = 32
    TAIL = 2000

    __slots__ = ("_pieces", "_since", "min_period", "repeats")

    def __init__(self, min_period: int = 8, repeats: int = 4) -> None:
        self.min_period = min_period
        self.repeats = repeats
        self._pieces: list[str] = []
        self._since = 0   # characters fed since the last check

    def feed(self, piece: str) -> bool:
        """Add ``piece`` to the text; True when the text has fallen into a loop."""
        self._pieces.append(piece)
        self._since += len(piece)
        if self._since < self.CHECK_EVERY:
            return False
        self._since = 0
        tail = "".join(self._pieces)[-self.TAIL:]
        self._pieces = [tail]   # joined once per check, not per token
        return repetition_loop(tail, self.min_period, self.repeats)
