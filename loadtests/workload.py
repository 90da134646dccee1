"""Seeded, lazy generation of work items and of the system prompt, from a scenario's workload.

Every item is a pure function of ``(seed, index)``: any item can be made on its own, in any
order, by any process (distributed workers split indices without coordination), and a
2,000,000-item job is never held in memory. Sizes follow conventions.md: a text of ``n``
tokens is ``4 * n`` characters on one line.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from batchclient.policy.tokens import PER_MESSAGE_TOKENS, PRIMING_TOKENS
from loadtests.scenario_model import IdScheme, Scenario, Size, UserGroup, Workload

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


def chat_sizes(scenario: Scenario, group: UserGroup, rng: random.Random) -> tuple[int, int]:
    """A chat's prompt tokens and max_tokens for ``group`` (its sizes, else the workload's):
    one draw from ``rng``, at least ``MIN_CHAT_PROMPT_TOKENS`` prompt tokens."""
    size = group.prompt_tokens or scenario.workload.prompt_tokens
    return (max(MIN_CHAT_PROMPT_TOKENS, sample_size(size, rng)),
            group.max_tokens or scenario.workload.max_tokens)


#: a chat's prompt holds the priming, one message's overhead and one token of text
MIN_CHAT_PROMPT_TOKENS = PRIMING_TOKENS + PER_MESSAGE_TOKENS + 1


@functools.lru_cache(maxsize=2048)
def chat_text(prompt_tokens: int) -> str:
    """The user message of a one-message chat whose prompt counts ``prompt_tokens`` tokens
    (the priming and the message's overhead taken off; at least one token of text), as
    every interactive driver sends it: the live harness, the gateway's users, the planner.

    One text per size, so the same size is the same request everywhere, and made once:
    drawing a few hundred words per chat was most of the cost of planning chat traffic."""
    return filler_text(max(1, prompt_tokens - PRIMING_TOKENS - PER_MESSAGE_TOKENS),
                       random.Random(prompt_tokens * 7919 + 1))


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


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_INDEX_MUL = 0xD1B54A32D192ED03
# filler variants kept per item size: texts differ by their tag and one of these tails
_FILLERS_PER_SIZE = 64
# items made per numpy pass when iterating
_PAGE = 4096


def _mix64(z: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of ``z``."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _mix64_array(z: np.ndarray) -> np.ndarray:
    """``_mix64`` over a uint64 array (wrapping arithmetic, same values)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class _ItemRng(random.Random):
    """The draws of one item: a counter-based splitmix64 stream from a 64-bit start state.

    Draw ``k`` (1-based) is ``_mix64(state + k * golden)``, so a page of items can draw the
    same numbers in numpy. Seeding ``random.Random`` fills a 624-word state (about 6 us); an
    item needs a handful of draws, and ``gauss``, ``randrange`` and ``choices`` keep working
    on top of ``random()`` and ``getrandbits()``.
    """

    _state: int

    def seed(self, a: object = None, version: int = 2) -> None:
        if not isinstance(a, int):
            raise TypeError("an item stream starts from a 64-bit integer state")
        self._state = a & _MASK64
        self.gauss_next = None

    def _next(self) -> int:
        self._state = (self._state + _GOLDEN) & _MASK64
        return _mix64(self._state)

    def random(self) -> float:
        return (self._next() >> 11) * _UNIT

    def getrandbits(self, k: int, /) -> int:
        out = 0
        bits = 0
        while bits < k:
            out = (out << 64) | self._next()
            bits += 64
        return out >> (bits - k)

    def getstate(self) -> tuple[object, ...]:  # type: ignore[override]
        return (self._state, self.gauss_next)

    def setstate(self, state: tuple[object, ...], /) -> None:
        self._state, self.gauss_next = state  # type: ignore[assignment]


_UNIT = 2.0 ** -53


class WorkloadGenerator:
    """Items of a workload as a pure function of ``(seed, index)``; lazy, or by index.

    Item ``index`` draws from its own counter-based stream: 1 duplicate or not, 2 which
    earlier item it repeats, 3 poison or not, 4 which cached filler tail, 5+ its size.
    """

    def __init__(self, workload: Workload, seed: int, count: int | None = None) -> None:
        self.workload = workload
        self.seed = seed
        self.count = workload.items if count is None else count
        self._key = _mix64((seed * _GOLDEN) & _MASK64)
        self._fillers: dict[int, tuple[str, ...]] = {}

    def _start(self, index: int) -> int:
        return self._key ^ ((index * _INDEX_MUL) & _MASK64)

    def _decide(self, index: int) -> tuple[random.Random, int | None]:
        """The item's RNG (positioned after draws 1-2) and the earlier index it repeats."""
        rng = _ItemRng(self._start(index))
        dup = rng.random() < self.workload.duplicate_rate
        target = int(rng.random() * index)
        return rng, (target if dup and index > 0 else None)

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
        pick = rng.random()
        tokens = max(1, sample_size(self.workload.item_tokens, rng))
        return self._make(index, root, tokens, poison, pick)

    def _make(self, index: int, root: int, tokens: int, poison: bool, pick: float) -> WorkItem:
        text = self._text(root, tokens, poison, pick)
        return WorkItem(
            index=index,
            id=item_id(self.workload.ids, self.seed, index),
            text=text,
            tokens=len(text) // CHARS_PER_TOKEN,  # exact: texts are 4 * tokens characters
            duplicate_of=root if root != index else None,
            poison=poison,
        )

    def _fillers_of(self, tokens: int) -> tuple[str, ...]:
        """The cached filler lines of ``tokens`` tokens (built once per size)."""
        fillers = self._fillers.get(tokens)
        if fillers is None:
            fillers = tuple(filler_text(tokens, random.Random(f"{self.seed}:{tokens}:{i}"))
                            for i in range(_FILLERS_PER_SIZE))
            self._fillers[tokens] = fillers
        return fillers

    def _filler(self, tokens: int, pick: float) -> str:
        """One of the cached filler lines of ``tokens`` tokens."""
        return self._fillers_of(tokens)[int(pick * _FILLERS_PER_SIZE)]

    def _text(self, root: int, tokens: int, poison: bool, pick: float) -> str:
        # a base-36 tag of the original's index keeps originals distinct from each other
        tag = _base36(root) if tokens >= 2 else ""
        if poison:
            tag = f"{POISON_MARKER} {tag}".strip()
            tokens = max(tokens, text_tokens(tag))
        filler = self._filler(tokens, pick)
        if not tag:
            return filler
        text = f"{tag} {filler}"[: tokens * CHARS_PER_TOKEN]
        # a trailing space would vanish under the responder's normalisation; keep sizes exact
        return text[:-1] + "x" if text.endswith(" ") else text

    def __iter__(self) -> Iterator[WorkItem]:
        return self.items()

    def items(self, start: int = 0, stop: int | None = None, step: int = 1) -> Iterator[WorkItem]:
        """Items ``start, start+step, ...`` below ``stop`` (default: the count), lazily."""
        end = self.count if stop is None else stop
        if self.workload.item_tokens.dist != "constant" or step <= 0:
            for index in range(start, end, step):
                yield self.item(index)
            return
        tokens = self._constant_tokens()
        dup_rate = self.workload.duplicate_rate
        poison_rate = self.workload.poison_rate
        for indices, dup, poison, pick in self._draw_pages(start, end, step):
            for i, index in enumerate(indices):
                if dup[i] < dup_rate and index > 0:
                    yield self.item(index)
                else:
                    yield self._make(index, index, tokens, poison[i] < poison_rate, pick[i])

    def pages(self, start: int = 0, stop: int | None = None
              ) -> Iterator[tuple[list[str], list[str]]]:
        """The ids and texts of items ``start..stop-1`` (default: the count), a page at a
        time: what ``items`` yields, without a ``WorkItem`` per item (a driver that only
        hands ids and texts on, such as the planner's feed)."""
        end = self.count if stop is None else stop
        if self.workload.item_tokens.dist != "constant":
            for first in range(start, end, _PAGE):
                page = [self.item(index) for index in range(first, min(end, first + _PAGE))]
                yield [w.id for w in page], [w.text for w in page]
            return
        tokens = self._constant_tokens()
        dup_rate = self.workload.duplicate_rate
        poison_rate = self.workload.poison_rate
        ids = self.workload.ids
        seed = self.seed
        for indices, dup, poison, pick in self._draw_arrays(start, end, 1):
            if ids.scheme == "sequential":
                page_ids = list(map(str, range(ids.start + indices.start,
                                               ids.start + indices.stop)))
            else:
                page_ids = [item_id(ids, seed, index) for index in indices]
            # every text as an original's (a page of tags and cached fillers), then the few
            # duplicates and poison items of the page replaced by their own texts
            fills = (pick * _FILLERS_PER_SIZE).astype(np.intp).tolist()  # int(pick * 64)
            texts = self._original_texts(indices, fills, tokens)
            first = indices.start
            dups = (dup < dup_rate) & (np.arange(first, indices.stop) > 0)
            for i in np.flatnonzero(dups | (poison < poison_rate)).tolist():
                if dups[i]:
                    texts[i] = self.item(first + i).text
                else:
                    texts[i] = self._text(first + i, tokens, True, float(pick[i]))
            yield page_ids, texts

    def _original_texts(self, indices: range, fills: list[int], tokens: int) -> list[str]:
        """``_text(index, tokens, False, pick)`` of each index of a step-1 range, whose
        filler numbers are ``fills``: a tag plus a cached filler tail cut to the size.

        Tags run in blocks of 1,296 (two base-36 digits): within a block every tag is the
        block's prefix plus a digit pair, all of one length, so each filler's tail (a space,
        the filler, cut to the size, a trailing space made "x") is cut once per block."""
        length = tokens * CHARS_PER_TOKEN
        fillers = self._fillers_of(tokens)
        first, stop = indices.start, indices.stop
        texts: list[str] = []
        for block in range(first // 1296, (stop - 1) // 1296 + 1 if stop > first else 0):
            lo, hi = max(first, block * 1296), min(stop, (block + 1) * 1296)
            picks = fills[lo - first:hi - first]
            prefix = _base36(block) if block else ""
            width = len(prefix) + 2
            if not block or tokens < 2 or width >= length:
                texts += [self._text(index, tokens, False, pick / _FILLERS_PER_SIZE)
                          for index, pick in zip(range(lo, hi), picks, strict=True)]
                continue
            tails = [(" " + filler)[:length - width] for filler in fillers]
            tails = [tail[:-1] + "x" if tail[-1] == " " else tail for tail in tails]
            pairs = _PAIRS36[lo - block * 1296:hi - block * 1296]
            # an f-string makes each text in one allocation (two concatenations make two)
            texts += [f"{prefix}{pair}{tails[pick]}"
                      for pair, pick in zip(pairs, picks, strict=True)]
        return texts

    def _constant_tokens(self) -> int:
        return max(1, sample_size(self.workload.item_tokens, random.Random(0)))  # no draw

    def _draw_pages(self, start: int, end: int, step: int
                    ) -> Iterator[tuple[range, list[float], list[float], list[float]]]:
        """Per page of indices: draws 1 (duplicate), 3 (poison) and 4 (filler) of each item,
        made in numpy (the same numbers as ``_ItemRng``)."""
        for indices, dup, poison, pick in self._draw_arrays(start, end, step):
            yield indices, dup.tolist(), poison.tolist(), pick.tolist()

    def _draw_arrays(self, start: int, end: int, step: int
                     ) -> Iterator[tuple[range, np.ndarray, np.ndarray, np.ndarray]]:
        """``_draw_pages`` as float64 arrays."""
        for first in range(start, end, _PAGE * step):
            indices = range(first, min(end, first + _PAGE * step), step)
            start_states = np.uint64(self._key) ^ (
                np.arange(indices.start, indices.stop, step, dtype=np.uint64)
                * np.uint64(_INDEX_MUL))
            dup, poison, pick = (
                (_mix64_array(start_states + np.uint64((k * _GOLDEN) & _MASK64))
                 >> np.uint64(11)).astype(np.float64) * _UNIT for k in (1, 3, 4))
            yield indices, dup, poison, pick


_DIGITS36 = "0123456789abcdefghijklmnopqrstuvwxyz"
# every two-digit base-36 string, so a tag takes one divmod per two digits
_PAIRS36 = tuple(a + b for a in _DIGITS36 for b in _DIGITS36)


def _base36(number: int) -> str:
    out = ""
    while number >= 1296:
        number, rest = divmod(number, 1296)
        out = _PAIRS36[rest] + out
    return "w" + (_DIGITS36[number] if number < 36 else _PAIRS36[number]) + out


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
