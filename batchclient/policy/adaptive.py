"""Adaptive batch size: grow while replies come back whole, shrink on truncation and drops."""

from __future__ import annotations


class AdaptiveBatchSize:
    """Items per batch between ``minimum`` and ``maximum``: +1 after ``grow_after`` whole
    replies in a row, halved on a truncated or malformed reply, -1 on drops."""

    def __init__(self, start: int, minimum: int, maximum: int, grow_after: int = 3) -> None:
        self.minimum = max(1, minimum)
        self.maximum = max(self.minimum, maximum)
        self.size = min(max(start, self.minimum), self.maximum)
        self.grow_after = grow_after
        self._whole = 0

    def on_reply(self, sent: int, answered: int, truncated: bool, malformed: bool) -> None:
        """Record one reply of a batch of ``sent`` items, ``answered`` of them accepted."""
        if truncated or malformed:
            self.size = max(self.minimum, self.size // 2)
            self._whole = 0
        elif answered < sent:
            self.size = max(self.minimum, self.size - 1)
            self._whole = 0
        else:
            self._whole += 1
            if self._whole >= self.grow_after and sent >= self.size:
                self.size = min(self.maximum, self.size + 1)
                self._whole = 0
