"""Reply synthesis: ``batch_json`` (docs/conventions.md), ``lorem`` and ``echo``.

``batch_json`` faults are drawn from the responder's own seeded RNG: ``drop_item_rate``
per item, the other rates per reply (each independently).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from zlib import crc32

from simulator.model.config import ResponderSpec
from simulator.model.latency import sample

ITEM_RE = re.compile(r"^id=([A-Za-z0-9_.-]+): (.*)$", re.MULTILINE)
# ITEM_RE's matches, found in "\n" + prompt: the same lines (a match takes its line's
# newline and stops before the next), but the search skips to each "\nid=" by its literal
# prefix instead of trying a line start at every character
_ITEM_LINE_RE = re.compile(r"\nid=([A-Za-z0-9_.-]+): (.*)")
POISON_MARKER = "POISON"

_LOREM_WORDS = (
    "lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "
    "ut labore et dolore magna aliqua ut enim ad minim veniam quis nostrud exercitation "
    "ullamco laboris nisi ut aliquip ex ea commodo consequat duis aute irure dolor in "
    "reprehenderit in voluptate velit esse cillum dolore eu fugiat nulla pariatur excepteur "
    "sint occaecat cupidatat non proident sunt in culpa qui officia deserunt mollit anim id "
    "est laborum "
)
_LOREM = _LOREM_WORDS * 200  # ~89k characters, enough for 22k tokens


@dataclass(slots=True)
class Reply:
    """A synthesised completion and why it ended (``stop`` or ``length``).

    A value all the same (nothing changes one once made), but not frozen: one is made per
    reply, and a frozen dataclass's __init__ sets each field through object.__setattr__."""

    text: str
    finish_reason: str
    tool: str | None = None  # the function a tool-call reply calls (text: its arguments)


def expected_code(text: str, codes: tuple[str, ...] | list[str]) -> str:
    """The batch_json code of an item: CRC-32 of the normalised text, modulo the codes."""
    norm = " ".join(text.split()).lower()
    return codes[crc32(norm.encode()) % len(codes)]


# JSON string of each code of a taxonomy, built once per code tuple (a reply quotes one per item)
_QUOTED: dict[tuple[str, ...], tuple[str, ...]] = {}


def _quoted(codes: tuple[str, ...]) -> tuple[str, ...]:
    quoted = _QUOTED.get(codes)
    if quoted is None:
        quoted = _QUOTED[codes] = tuple(json.dumps(c) for c in codes)
    return quoted


def parse_items(prompt: str) -> list[tuple[str, str]]:
    """The ``(id, text)`` item lines of a packed prompt, in order."""
    return _ITEM_LINE_RE.findall("\n" + prompt)


def lorem_text(tokens: int, offset: int) -> str:
    """Filler text of exactly ``tokens`` tokens (4 characters each)."""
    chars = tokens * 4
    start = offset % len(_LOREM_WORDS)
    text = _LOREM[start : start + chars]
    while len(text) < chars:
        text += _LOREM[: chars - len(text)]
    return text


def cut(text: str, max_tokens: int | None) -> Reply:
    """``text`` cut at ``max_tokens`` (finish ``length``) or whole (finish ``stop``)."""
    if max_tokens is not None and len(text) > max_tokens * 4:
        return Reply(text[: max_tokens * 4], "length")
    return Reply(text, "stop")


def _id_json(item_id: str) -> str:
    # ids match [A-Za-z0-9_.-]+: all-digit ones are JSON integers, others need no escaping
    if item_id.isdigit():
        return item_id if item_id[0] != "0" else str(int(item_id))
    return '"' + item_id + '"'


# ASCII whitespace ``str.split()`` takes besides the space and the newline that joins the
# texts (which no item line holds): each made a NUL, and the newline a space, so that one
# search finds any of them and another any space next to a space or a text's end
_SPACES = bytes.maketrans(b"\t\x0b\x0c\r\x1c\x1d\x1e\x1f\x00\n", b"\x00" * 9 + b" ")


def _crcs(texts: tuple[str, ...]) -> list[int]:
    """``crc32`` of each text's normalised form (expected_code's), in order.

    The common prompt (ASCII, words one space apart, no space at either end of a text) is
    its own normal form once lower-cased: lower-cased, encoded and checked once for all its
    items rather than split, joined, lower-cased and encoded item by item."""
    joined = "\n".join(texts)
    if texts and joined.isascii():
        data = joined.lower().encode()
        flat = data.translate(_SPACES)
        if (b"\x00" not in flat and b"  " not in flat and flat[:1] != b" "
                and flat[-1:] != b" "):
            return list(map(crc32, data.split(b"\n")))
    return [crc32(" ".join(text.split()).lower().encode()) for text in texts]


_HEAD = '[{"id":'
_NEXT = '},{"id":'


def batch_json(spec: ResponderSpec, rng: random.Random, prompt: str,
               max_tokens: int | None) -> Reply:
    """The JSON array answering the prompt's items, with the configured faults injected."""
    codes = spec.codes
    quoted = _quoted(codes if isinstance(codes, tuple) else tuple(codes))
    n = len(codes)
    drop = spec.drop_item_rate
    found = parse_items(prompt)
    ids, texts = zip(*found, strict=True) if found else ((), ())
    # expected_code of every item, whether answered or not (no RNG draw involved)
    crcs = _crcs(texts)
    if (not drop and not spec.repeat_id_rate and not spec.invent_id_rate
            and POISON_MARKER not in prompt):
        # the common reply: every item answered in order, no entry moved or added;
        # all-digit ids without a leading zero are their own JSON literals: no call per
        # item. Ids match [A-Za-z0-9_.-]+ (ASCII, not empty): bytes.isdigit's table per
        # character rather than str.isdigit's Unicode lookup, and a leading zero is an
        # "id=0" at a line's start (a search, not min(); a false alarm from the
        # instructions only takes the call per item, with the same literals)
        literals = ids if (ids and "".join(ids).encode().isdigit()
                           and not prompt.startswith("id=0") and "\nid=0" not in prompt) else [
            _id_json(item_id) for item_id in ids]
        return _finish_batch(spec, rng, _array(zip(
            literals, [quoted[crc % n] for crc in crcs], strict=True)), max_tokens)
    return _finish_batch(spec, rng, _array(_entries(spec, rng, found, crcs)), max_tokens)


def _entries(spec: ResponderSpec, rng: random.Random, found: list[tuple[str, str]],
             crcs: list[int]) -> list[tuple[str, str]]:
    """The (id literal, quoted code) entries answering the ``found`` items, with the
    per-item faults (poisoned items, drops) and the per-reply ones (a repeated id, an
    invented id) drawn in that order."""
    quoted = _quoted(tuple(spec.codes))
    n = len(quoted)
    drop = spec.drop_item_rate
    entries: list[tuple[str, str]] = []
    for (item_id, text), crc in zip(found, crcs, strict=True):
        if POISON_MARKER in text:
            continue
        if drop and rng.random() < drop:
            continue
        entries.append((_id_json(item_id), quoted[crc % n]))
    if spec.repeat_id_rate and rng.random() < spec.repeat_id_rate and entries:
        i = rng.randrange(len(entries))
        # the repeat carries another code: a client must not trust either blindly
        entries.insert(i + 1, (entries[i][0], json.dumps(rng.choice(spec.codes))))
    if spec.invent_id_rate and rng.random() < spec.invent_id_rate:
        invented = str(rng.randrange(10**9, 10**10))
        entries.insert(rng.randrange(len(entries) + 1),
                       (invented, json.dumps(rng.choice(spec.codes))))
    return entries


def batch_answers(spec: ResponderSpec, rng: random.Random,
                  prompt: str) -> list[tuple[int | str, str]]:
    """The (id, code) answers of a ``batch_json`` reply to ``prompt`` as values (an
    all-digit id as an int), its per-item and per-reply id faults drawn as ``batch_json``
    draws them; none of its text faults (malformed JSON, a verbose reply): a reply held
    to a JSON schema is JSON in that shape."""
    found = parse_items(prompt)
    crcs = _crcs(tuple(text for _, text in found))
    return [(json.loads(literal), json.loads(code))
            for literal, code in _entries(spec, rng, found, crcs)]


def _array(entries: Iterable[tuple[str, str]]) -> str:
    """The compact reply array of (id literal, quoted code) entries:
    ``[{"id":1,"c":"A"},...]``, one join for the whole reply."""
    body = _NEXT.join([f'{literal},"c":{code}' for literal, code in entries])
    return _HEAD + body + "}]" if body else "[]"


def _finish_batch(spec: ResponderSpec, rng: random.Random, text: str,
                  max_tokens: int | None) -> Reply:
    """The reply-wide faults of a batch_json answer (malformed JSON, a verbose truncated
    reply), drawn in that order, then the cut at ``max_tokens``."""
    if spec.malformed_json_rate and rng.random() < spec.malformed_json_rate:
        variant = rng.randrange(3)
        if variant == 0:
            text = text[:-2] if len(text) > 2 else "["  # cut before the closing brackets
        elif variant == 1:
            text = text[:-1] + ",]"  # trailing comma
        else:
            text = text.replace('"', "'")  # single quotes
    if spec.truncate_rate and rng.random() < spec.truncate_rate:
        # a verbose reply that runs into max_tokens (half the reply when none is set)
        limit = max_tokens if max_tokens is not None else max(1, (len(text) + 3) // 8)
        verbose = "Here are the results:\n" + text + "\n" + lorem_text(limit, rng.randrange(97))
        return Reply(verbose[: limit * 4], "length")
    return cut(text, max_tokens)


def respond(spec: ResponderSpec, rng: random.Random, last_user_text: str,
            max_tokens: int | None) -> Reply:
    """The reply of ``spec.kind`` to a chat whose last user message is ``last_user_text``."""
    if spec.kind == "batch_json":
        return batch_json(spec, rng, last_user_text, max_tokens)
    if spec.kind == "echo":
        return cut(last_user_text, max_tokens)
    drawn = round(sample(spec.output_tokens, rng))
    tokens = drawn if drawn > 1 else 1  # max(1, drawn) without the builtin's call
    if max_tokens is not None and tokens > max_tokens:
        return Reply(lorem_text(max_tokens, rng.randrange(97)), "length")
    return Reply(lorem_text(tokens, rng.randrange(97)), "stop")


def repetition_loop(max_tokens: int) -> Reply:
    """A degenerate reply repeating one phrase until ``max_tokens`` (finish ``length``)."""
    phrase = "and so on, "
    text = phrase * (max_tokens * 4 // len(phrase) + 1)
    return Reply(text[: max_tokens * 4], "length")


def embedding_vector(text: str, dims: int) -> list[float]:
    """A deterministic unit-free pseudo-embedding of ``text`` (the shell may use it)."""
    seed = int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)
    rng = random.Random(seed)
    return [rng.uniform(-1.0, 1.0) for _ in range(dims)]
