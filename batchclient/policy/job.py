"""Values of a job: the engine's actions, item results, counts, exit statuses, cache keys.

Exit statuses follow docs/conventions.md.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from batchclient.config import Task
from batchclient.policy.wire import Call

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INPUT = 2
EXIT_BALANCE = 3
EXIT_AUTH = 4
# the provider's replies answer no item (prose, garbled, cut, or every answer refused)
EXIT_NO_ANSWERS = 5
# the run's own budget (spend_cap_usd) reached: no request sent that could pass it
EXIT_SPEND_CAP = 6
EXIT_INTERRUPTED = 130

# A job stopped by its balance with top-ups scheduled (a harness's ``load.topups``) tries
# again at the next one; within TOPUP_GRACE_S after one it tries every TOPUP_PROBE_S, since
# a top-up made by another process (a live run's parent polls its clock) may land late.
TOPUP_GRACE_S = 60.0
TOPUP_PROBE_S = 5.0


def resume_after_balance(topups: Sequence[float], now: float) -> float | None:
    """When a job whose balance ran out at ``now`` (virtual s) sends again, given the times
    of the top-ups scheduled for its providers: the next top-up, or shortly when the last
    one may not have landed yet; None when none is due (the job stops, exit 3)."""
    later = [t for t in topups if t > now]
    if later:
        return min(later)
    if any(now - TOPUP_GRACE_S <= t <= now for t in topups):
        return now + TOPUP_PROBE_S
    return None

class InputError(ValueError):
    """Unusable input (exit status 2): the message names the item or setting."""


# Send and Wait: one or two per dispatch decision (about three a request). Plain slots
# dataclasses, since a frozen one's __init__ sets its field through object.__setattr__;
# values by convention (the engine shares one ``Wait(None)``: nothing changes one once
# made), and ``unsafe_hash`` keeps the hash a frozen one had.
@dataclass(slots=True, unsafe_hash=True)
class Send:
    """Send this call now."""

    call: Call


@dataclass(slots=True, unsafe_hash=True)
class Wait:
    """Nothing to send: wait ``seconds`` (virtual), or until a response or new items
    arrive when ``seconds`` is None."""

    seconds: float | None


@dataclass(frozen=True, slots=True)
class Done:
    """The job is over with this exit status (docs/conventions.md)."""

    status: int
    reason: str = ""


Action = Send | Wait | Done


# Not frozen: one per item on the hot path (see batchclient.events). Read-only by use.
@dataclass(slots=True)
class ItemResult:
    """Final state of one item: ``done`` with its code and label, or ``dead`` with the
    last error. ``cost_usd`` is its share of the batch's charge."""

    item_id: str
    state: Literal["done", "dead"]
    code: str | None = None
    label: str | None = None
    model: str | None = None
    provider: str | None = None
    error: str | None = None
    cost_usd: float = 0.0
    attempts: int = 0
    cache_key: str | None = None


@dataclass(frozen=True, slots=True)
class InteractiveRequest:
    """A chat request of the interactive lane (a user is waiting for it).

    ``attempt`` counts failed sends, ``not_before`` (virtual s) holds a retry for its
    backoff, ``avoid`` names providers that just failed it (failover).
    """

    request_id: int
    user: str
    messages: tuple[Mapping[str, str], ...]
    max_tokens: int
    model: str
    submitted_at: float
    stream: bool = False
    attempt: int = 0
    not_before: float = 0.0
    avoid: tuple[str, ...] = ()


@dataclass(slots=True)
class Counts:
    """Item counts of the job so far; ``fed = done + dead + pending``."""

    fed: int = 0
    done: int = 0
    dead: int = 0
    cached: int = 0
    requests: int = 0
    rate_limited: int = 0
    errors: int = 0
    tokens_in: int = 0
    tokens_out: int = 0

    @property
    def pending(self) -> int:
        """Items fed but neither done nor dead (skipped for the next pass when stopped)."""
        return self.fed - self.done - self.dead


def normalise(text: str) -> str:
    """Whitespace-collapsed, lower-cased text: the cache and de-duplication key of an item."""
    return " ".join(text.split()).lower()


# ASCII whitespace other than the space (what str.split() also splits on)
_CONTROLS = ("\t", "\n", "\x0b", "\x0c", "\r", "\x1c", "\x1d", "\x1e", "\x1f")


def page_is_normal(texts: list[str]) -> bool:
    """Whether every text is ASCII with single spaces between words, none at either end
    and no other whitespace: ``normalise`` only lower-cases it. A page that is, and
    whose joined texts are not empty, has no empty text and none of whitespace alone."""
    # The texts joined by single spaces have no double space (none inside a text, none
    # at a text's ends, no empty text), no space at either end and no other whitespace:
    # checked by substring searches, a quarter of the cost of splitting every word out and
    # joining them back.
    spaced = " ".join(texts)
    return (spaced.isascii() and "  " not in spaced and spaced[:1] != " "
            and spaced[-1:] != " " and not any(c in spaced for c in _CONTROLS))


def normalise_page(texts: list[str], normal: bool | None = None) -> list[str]:
    """``normalise`` of each text, a page at a time when it can: an ASCII page whose
    texts already have single spaces between words and none at either end is only
    lower-cased (ASCII lower-cases a character at a time, whatever surrounds it).
    ``normal``: ``page_is_normal(texts)`` when the caller has it already."""
    if normal is None:
        normal = page_is_normal(texts)
    if normal:
        # str.lower by map rather than over the texts joined and split again: no scan for
        # the separator, no join
        return list(map(str.lower, texts))
    return [" ".join(text.split()).lower() for text in texts]


def task_digest(task: Task) -> str:
    """Digest of what makes a task's answers: system prompt, instructions and taxonomy."""
    labels = json.dumps(sorted(task.labels.items()))
    return hash_text(task.system_prompt + "\x1f" + task.instructions + "\x1f" + labels)


def cache_key(text: str, task: Task, model: str, digest: str | None = None) -> str:
    """Key of a result in the cache: normalised input, task (prompt and taxonomy), model."""
    digest = digest if digest is not None else task_digest(task)
    return f"{model}\x1f{task.name}\x1f{digest}\x1f" + normalise(text)


def hash_text(text: str) -> str:
    """Short stable digest of a text (sha256, 16 hex digits)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
