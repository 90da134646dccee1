"""Two lanes: interactive requests first, the background job fills the gaps.

The background lane may not take the last ``reserved_slots`` in-flight slots nor plan
beyond ``background_ceiling`` of the token window, so a running job cannot starve a user
who is waiting; interactive requests may use everything.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LanePolicy:
    """How much headroom the background lane leaves to the interactive one."""

    reserved_slots: int = 1
    background_ceiling: float = 0.9

    def background_slots(self, limit: int, interactive_waiting: int) -> int:
        """Slots the background lane may fill: all of them while nobody is waiting."""
        if interactive_waiting:
            return max(0, limit - max(self.reserved_slots, interactive_waiting))
        return max(1, limit - self.reserved_slots) if limit > self.reserved_slots else limit
