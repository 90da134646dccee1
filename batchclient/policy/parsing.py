"""Parse a ``batch_json`` reply keyed by id, never by position.

Each object ``{"id": ID, "c": CODE}`` is matched to the sent item with that id; its code
is resolved locally to a label name. Codes outside the taxonomy, ids not in the batch and
ids that appear more than once are rejected for that item only. A truncated or malformed
reply keeps every complete object before the damage; everything else goes back to the queue.
An array wrapped in an object (JSON mode: ``{"results": [...]}``) reads as the array.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from batchclient.policy.tokens import canonical_id
from batchclient.policy.wire import Usage

_DECODER = json.JSONDecoder()


@dataclass(slots=True)
class ParsedReply:
    """Outcome of one reply: ``codes`` for accepted items (id -> code), ``rejected``
    (id -> reason) and ``missing`` (sent ids the reply did not answer).

    A value all the same (nothing changes one once made), but not frozen: one is made per
    reply, and a frozen dataclass's __init__ sets each field through object.__setattr__."""

    codes: Mapping[str, str]
    rejected: Mapping[str, str] = field(default_factory=dict)
    missing: tuple[str, ...] = ()
    truncated: bool = False
    malformed: bool = False
    unknown_ids: int = 0
    repeated: frozenset[str] = frozenset()

    def why_unanswered(self, item_id: str) -> str:
        """Why the reply did not answer ``item_id``: words for its last error."""
        if self.truncated and item_id in self.missing:
            return "reply cut at max_tokens"
        if self.malformed and not self.codes:
            return "reply held no JSON array of answers"
        return self.rejected.get(item_id, "left out of the reply")


def _objects(text: str) -> tuple[list[object], bool]:
    """Complete top-level elements of a JSON array, and whether the array was damaged.

    The array may come wrapped in an object, as a provider's JSON mode makes a model write
    it (``{"results": [...]}``): an object whose one array holds the answers is whole."""
    start = text.find("[")
    if start < 0:
        return [], True
    if text.lstrip().startswith("{"):
        try:
            wrapper = json.loads(text)
        except json.JSONDecodeError:
            wrapper = None  # damaged: the walk below keeps the array's complete elements
        if isinstance(wrapper, dict):
            arrays = [v for v in wrapper.values() if isinstance(v, list)]
            if len(arrays) == 1:
                return arrays[0], False
    try:
        whole = json.loads(text[start:])
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return whole, False
    # Damaged: walk element by element and keep what decodes completely.
    out: list[object] = []
    pos = start + 1
    n = len(text)
    while pos < n:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            break
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        out.append(value)
        pos = end
        while pos < n and text[pos] in " \t\r\n":
            pos += 1
        if pos < n and text[pos] not in ",]":
            break
    return out, True


def _reply_id(value: object) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if value >= 0 else None
    if isinstance(value, str) and value:
        return canonical_id(value)
    return None


def parse_reply(
    text: str,
    sent_ids: Sequence[str],
    labels: Mapping[str, str],
    finish_reason: str | None = None,
) -> ParsedReply:
    """Match a reply to the ``sent_ids`` of its batch; see the module docstring."""
    found = _exact(text, sent_ids, labels)
    if found is not None:
        return ParsedReply(codes=found, truncated=finish_reason == "length")
    return _by_json(text, sent_ids, labels, finish_reason)


def _by_json(text: str, sent_ids: Sequence[str], labels: Mapping[str, str],
             finish_reason: str | None) -> ParsedReply:
    """``parse_reply`` by decoding the reply's JSON objects (any reply ``_exact`` refused)."""
    elements, damaged = _objects(text)
    if not damaged and len(elements) == len(sent_ids):
        found = _in_order(elements, sent_ids, labels)
        if found is not None:
            return ParsedReply(codes=found, truncated=finish_reason == "length")
    return _match(elements, damaged, sent_ids, labels, finish_reason)


_HEAD = '[{"id":'
_AROUND = ',"c":"\0"},{"id":'
_LAST = ',"c":"\0"}]'
# a code as the compact array writes it: a JSON string without escapes
_CODES = re.compile(r',"c":"([^"\\]*)"')


def _exact(text: str, sent_ids: Sequence[str], labels: Mapping[str, str]
           ) -> dict[str, str] | None:
    """The codes of a reply that is exactly the compact array conventions.md specifies for
    ``sent_ids`` (``[{"id":ID,"c":"CODE"},...]``, every sent id once, in order, as the
    simulator writes it, every code of the taxonomy); None for any other text, which the
    JSON parse then takes (what it would make of this text is exactly these codes).

    Checked as text, without decoding JSON: the codes (taken a fixed step apart, or found
    by a pattern), put back into the text the sent ids give, must make the reply again."""
    n = len(sent_ids)
    if not n or not text.startswith(_HEAD):
        return None
    sent = sent_ids if isinstance(sent_ids, (list, tuple)) else list(sent_ids)
    flat = "".join(sent)
    # An id is written as a JSON integer when it is ASCII digits without a leading zero
    # (json.loads gives back an int whose str() is the id), else as a JSON string that
    # needs no escape; ids that are neither are left to the JSON parse.
    expected = ""
    literals: Sequence[str] = sent
    # the common page: every id a number, each its own literal (bytes.isdigit: a table
    # per character, str.isdigit the Unicode database; the same answer for ASCII)
    if flat.isascii() and flat.encode().isdigit():
        # the expected text around the codes, from the ids (NUL marks a code's place: no
        # literal holds one), must be the reply with its codes put in; equal texts mean
        # the reply is the compact array of these codes
        expected = _HEAD + _AROUND.join(sent) + _LAST
        # an empty id or one with a leading zero is not its own literal: every id
        # follows '"id":' in the expected text (one search each rather than min())
        if '"id":0' in expected or '"id":,' in expected:
            expected = ""
    if not expected:
        least = min(sent)
        if not least or '"' in flat or "\\" in flat or not flat.isprintable():
            return None
        literals = [i if i.isdigit() and i.isascii() and (i[0] != "0" or i == "0")
                    else '"' + i + '"' for i in sent]
        expected = _HEAD + _AROUND.join(literals) + _LAST
    codes: str | list[str]
    start = len(_HEAD) + len(literals[0]) + 6  # the first code's place, after ',"c":"'
    step = len(_AROUND) + len(literals[1]) if n > 1 else 1
    places = slice(start, start + step * (n - 1) + 1, step)
    if (len(expected) == len(text) and expected[places] == "\0" * n and text.isascii()
            and expected.isascii()):
        # one-character codes a fixed step apart (ids of one length: a page of
        # consecutive numbers), every NUL at one of those places: the codes are one
        # slice, put back into the expected text as bytes, without a piece per code
        codes = text[places]
        whole = bytearray(expected, "ascii")
        whole[places] = codes.encode("ascii")
        if whole != text.encode("ascii"):
            return None
    else:
        around = expected.split("\0")
        pieces: list[str] = [""] * (2 * n + 1)
        pieces[::2] = around
        codes = _CODES.findall(text)
        if len(codes) != n:
            return None
        pieces[1::2] = codes
        if "".join(pieces) != text:
            return None
    # a code written as is: in the taxonomy, no quote, escape or control character
    distinct = set(codes)
    written = "".join(distinct)
    if (not labels.keys() >= distinct or '"' in written or "\\" in written
            or not written.isprintable()):
        return None
    return dict(zip(sent, codes, strict=True))


def _in_order(elements: list[object], sent_ids: Sequence[str], labels: Mapping[str, str]
              ) -> dict[str, str] | None:
    """The codes of a whole reply that answers every sent id once, in order, with known
    codes (the common case, matched without the id map); None for any other reply.

    Checked a reply at a time rather than an element at a time: every element an object
    with "id" and "c", each id a non-negative JSON integer (an all-digit id comes back as
    one) or a string, equal to the sent ids in order, every code a string of
    the taxonomy. Anything else takes the id map."""
    try:
        raws = [element["id"] for element in elements]  # type: ignore[index]
        codes = [element["c"] for element in elements]  # type: ignore[index]
    except (TypeError, KeyError, IndexError):
        return None  # an element that is not an object, or lacks "id" or "c"
    if any(type(element) is not dict for element in elements):
        return None
    kinds = set(map(type, raws))
    if kinds == {int}:
        if min(raws) < 0 or list(map(str, raws)) != list(sent_ids):
            return None
    elif kinds == {str}:
        if raws != list(sent_ids):
            return None
    elif kinds == {int, str}:
        if min(r for r in raws if type(r) is int) < 0 or [
                str(r) if type(r) is int else r for r in raws] != list(sent_ids):
            return None
    else:
        return None
    if set(map(type, codes)) != {str} or not labels.keys() >= set(codes):
        return None
    return dict(zip(sent_ids, codes, strict=True))


def _match(elements: list[object], damaged: bool, sent_ids: Sequence[str],
           labels: Mapping[str, str], finish_reason: str | None) -> ParsedReply:
    # An id not starting with "0" is its own canonical form (the common case).
    by_key = {item_id if item_id[:1] != "0" else canonical_id(item_id): item_id
              for item_id in sent_ids}
    found: dict[str, str] = {}
    rejected: dict[str, str] = {}
    counts: dict[str, int] = {}
    unknown = 0
    for element in elements:
        if type(element) is not dict:
            continue
        raw = element.get("id")
        # The common case first: an all-digit id comes back as a JSON integer.
        if type(raw) is int and raw >= 0:
            item_id = by_key.get(str(raw))
        else:
            key = _reply_id(raw)
            item_id = by_key.get(key) if key is not None else None
        if item_id is None:
            unknown += 1
            continue
        if item_id in counts:
            counts[item_id] += 1
            continue
        counts[item_id] = 1
        code = element.get("c")
        if type(code) is str and code in labels:
            found[item_id] = code
        else:
            rejected[item_id] = f"code {code!r} outside the taxonomy"
    repeated = frozenset(i for i, n in counts.items() if n > 1) if len(counts) < len(
        elements) - unknown else frozenset()
    for item_id in repeated:
        found.pop(item_id, None)
        rejected[item_id] = f"id repeated {counts[item_id]} times in the reply"
    missing = () if len(found) + len(rejected) == len(sent_ids) else tuple(
        i for i in sent_ids if i not in found and i not in rejected)
    return ParsedReply(
        codes=found, rejected=rejected, missing=missing,
        truncated=finish_reason == "length", malformed=damaged and finish_reason != "length",
        unknown_ids=unknown, repeated=repeated,
    )


def read_completion(body: str) -> tuple[str | None, str | None, Usage | None]:
    """(content, finish_reason, usage) of an OpenAI chat-completion JSON body; None parts
    when the body does not have them."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None, None, None
    if not isinstance(data, dict):
        return None, None, None
    content: str | None = None
    finish: str | None = None
    usage: Usage | None = None
    choices = data.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        if isinstance(message, dict) and isinstance(message.get("content"), str):
            content = message["content"]
        reason = choices[0].get("finish_reason")
        finish = reason if isinstance(reason, str) else None
    raw = data.get("usage")
    if isinstance(raw, dict):
        try:
            usage = Usage(int(raw.get("prompt_tokens", 0)), int(raw.get("completion_tokens", 0)))
        except (TypeError, ValueError):
            usage = None
    return content, finish, usage
