"""Seeded, lazy generation of work items and of the system prompt, from a scenario's workload.

Every item is a pure function of ``(seed, index)``: any item can be made on its own, in any
order, by any process (distributed workers split indices without coordination), and a
2,000,000-item job is never held in memory. Sizes follow conventions.md: a text of ``n``
tokens is ``4 * n`` characters on one line.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from loadtests.scenario_model import IdScheme, Size, Workload

CHARS_PER_TOKEN = 4
POISON_MARKER = "POISON"

_WORDS = (
    "acme alpha amber apex atlas basin beacon birch blue bolt brook cargo cedar "
    "cinder cobalt coral crest delta dune ember fable fern field flint fox garnet "
    "glade granite harbor hazel heron indigo iris ivory jade juniper kestrel lagoon "
    "larch linen lotus maple marble meadow mesa mint north oak olive onyx opal "
    "orchid pearl pine plume prairie quartz quill raven reef ridge river robin ruby "
    "sage salt sierra slate spruce stone summit tide timber topaz tundra umber "
    "valley vapor violet willow wren yarrow zephyr street road lane avenue unit "
    "suite floor north south east west market product budget prime city central park "
    "hill lake bay point "
)
_VOCAB = tuple(_WORDS.split())


def text_tokens(text: str) -> int:
    """Tokens of ``text`` by the ratelab rule: ``ceil(len / 4)``, 0 for the empty string."""
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def sample_size(size: Size, rng: random.Random) -> int:
    """Draw one size in tokens from ``size`` (rounded, clipped to its min/max, never negative)."""
    if size.dist == "constant":
        value = float(size.value)
    elif size.dist == "uniform":
        value = float(rng.randint(size.min or 0, size.max if size.max is not None else 0))
    elif size.dist == "normal":
        value = rng.gauss(size.mean, size.sd)
    elif size.dist == "lognormal":
        sigma = math.log(size.p99 / size.median) / 2.3263478740408408
        value = size.median * math.exp(rng.gauss(0.0, sigma))
    else:
        weights = size.weights or None
        value = float(rng.choices(size.values, weights=weights, k=1)[0])
    tokens = round(value)
    if size.min is not None:
        tokens = max(tokens, size.min)
    if size.max is not None:
        tokens = min(tokens, size.max)
    return max(tokens, 0)


def filler_text(tokens: int, rng: random.Random, tag: str = "") -> str:
    """One line of words exactly ``4 * tokens`` characters long, starting with ``tag`` if given."""
    length = tokens * CHARS_PER_TOKEN
    if length == 0:
        return ""
    words = [tag] if tag else []
    total = len(tag)
    while total < length:
        word = rng.choice(_VOCAB)
        words.append(word)
        total += len(word) + 1
    text = " ".join(words)[:length]
    # a trailing space would vanish under the responder's normalisation; keep sizes exact
    return text[:-1] + "x" if text.endswith(" ") else text


def item_id(ids: IdScheme, seed: int, index: int) -> str:
    """The id of item ``index`` (matches ``[A-Za-z0-9_.-]+``, as batch_json needs)."""
    if ids.scheme == "hex":
        return hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=6).hexdigest()
    number = ids.start + index
    return f"{ids.prefix}{number}" if ids.scheme == "prefixed" else str(number)


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One work item: its id and text of ``tokens`` tokens; a duplicate names its original."""

    index: int
    id: str
    text: str
    tokens: int
    duplicate_of: int | None = None
    poison: bool = False


class WorkloadGenerator:
    """Items of a workload as a pure function of ``(seed, index)``; lazy, or by index."""

    def __init__(self, workload: Workload, seed: int, count: int | None = None) -> None:
        self.workload = workload
        self.seed = seed
        self.count = workload.items if count is None else count

    def _rng(self, index: int) -> random.Random:
        # one independent stream per index: items need no state from their neighbours
        return random.Random((self.seed << 40) ^ index)

    def _decide(self, index: int) -> tuple[random.Random, int | None]:
        """The item's RNG (positioned after its own draws) and the earlier index it repeats."""
        rng = self._rng(index)
        dup = rng.random() < self.workload.duplicate_rate
        if dup and index > 0:
            return rng, rng.randrange(index)
        return rng, None

    def item(self, index: int) -> WorkItem:
        """Item ``index`` (0-based); duplicates repeat the exact text of an earlier original."""
        if index < 0:
            raise IndexError(index)
        root = index
        rng, target = self._decide(root)
        while target is not None:
            root = target
            rng, target = self._decide(root)
        poison = rng.random() < self.workload.poison_rate
        tokens = max(1, sample_size(self.workload.item_tokens, rng))
        text = self._text(root, tokens, poison, rng)
        return WorkItem(
            index=index,
            id=item_id(self.workload.ids, self.seed, index),
            text=text,
            tokens=text_tokens(text),
            duplicate_of=root if root != index else None,
            poison=poison,
        )

    @staticmethod
    def _text(root: int, tokens: int, poison: bool, rng: random.Random) -> str:
        # a base-36 tag of the original's index keeps originals distinct from each other
        tag = _base36(root) if tokens >= 2 else ""
        if poison:
            tag = f"{POISON_MARKER} {tag}".strip()
            tokens = max(tokens, text_tokens(tag))
        return filler_text(tokens, rng, tag)

    def __iter__(self) -> Iterator[WorkItem]:
        return self.items()

    def items(self, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[WorkItem]:
        """Items ``start, start+step, ...`` below ``stop`` (default: the count), lazily."""
        end = self.count if stop is None else stop
        for index in range(start, end, step):
            yield self.item(index)


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if number == 0:
            return "w" + out


def system_prompt_min_tokens(workload: Workload) -> int:
    """Tokens the instruction and code list need before any padding."""
    return text_tokens(_instruction(workload))


def _instruction(workload: Workload) -> str:
    codes = "; ".join(f"{code}={name}" for code, name in workload.labels)
    return (
        "Classify each input line into one category. Input lines look like `id=<ID>: <text>`. "
        "Reply ONLY with a compact JSON array, one object per line, in order: "
        '[{"id":<ID>,"c":"<CODE>"}]. '
        f"Codes: {codes}."
    )


def system_prompt(workload: Workload, seed: int = 0) -> str:
    """The system prompt: the instruction and code list, padded to exactly ``system_prompt_tokens``.

    A size too small for the instruction truncates it (``system_prompt_min_tokens`` tells).
    """
    length = workload.system_prompt_tokens * CHARS_PER_TOKEN
    head = _instruction(workload)
    if len(head) >= length:
        return head[:length]
    pad = filler_text(
        math.ceil((length - len(head)) / CHARS_PER_TOKEN), random.Random(seed), "Guidance:"
    )
    return (head + " " + pad)[:length]
