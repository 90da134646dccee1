"""An in-process batch_json provider for fast, exact engine tests (no network).

Answers like the simulator's responder (docs/conventions.md): one ``{"id","c"}`` per
item line, the code a CRC-32 function of the normalised text, POISON items left out.
"""

from __future__ import annotations

import json
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from batchclient.config import ClientConfig, ProviderSettings, Task, parse_client_config
from batchclient.events import Event
from batchclient.policy.engine import Done, Engine, Send, Wait
from batchclient.policy.tokens import chat_prompt_tokens, text_tokens
from batchclient.policy.wire import Call, Item, Response, Usage

CODES = ["A", "B", "C", "D", "E", "F", "G", "H"]
LINE = re.compile(r"^id=([A-Za-z0-9_.-]+): (.*)$")


def code_of(text: str, codes: list[str] = CODES) -> str:
    norm = " ".join(text.split()).lower()
    return codes[zlib.crc32(norm.encode()) % len(codes)]


def task(**overrides: object) -> Task:
    values: dict[str, object] = {
        "name": "classify", "system_prompt": "You classify products. " * 10,
        "labels": {c: f"label {c}" for c in CODES}, "model": "m1",
    }
    values.update(overrides)
    return Task(**values)  # type: ignore[arg-type]


def config(**overrides: object) -> ClientConfig:
    data: dict[str, object] = {
        "providers": [{"name": "p1", "base_url": "http://fake/v1", "api_key": "k"}],
    }
    data.update(overrides)
    return parse_client_config(data, "test")


def items(n: int, prefix: str = "", start: int = 1) -> list[Item]:
    return [Item(f"{prefix}{i}", f"product number {i} with words") for i in range(start, start + n)]


@dataclass
class FakeProvider:
    """Answers calls; ``faults`` maps fault name -> probability; ``script`` forces
    a status for the n-th call (1-based)."""

    seed: int = 0
    faults: dict[str, float] = field(default_factory=dict)
    script: dict[int, int] = field(default_factory=dict)
    status_fn: Callable[[Call], int | None] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    calls: int = 0
    answered: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def __call__(self, call: Call) -> Response:
        self.calls += 1
        status = self.script.get(self.calls)
        if status is None and self.status_fn is not None:
            status = self.status_fn(call)
        if status is not None and status != 200:
            body = json.dumps({"error": {"type": "err", "code": f"s{status}",
                                         "message": f"forced {status}"}})
            hdrs = {"retry-after": "1"} if status == 429 else {}
            return Response(status, hdrs, body, elapsed_s=0.5)
        messages = call.body["messages"]
        assert isinstance(messages, list)
        user = messages[-1]["content"]
        out: list[dict[str, object]] = []
        for line in user.splitlines():
            m = LINE.match(line)
            if not m:
                continue
            item_id, text = m.group(1), m.group(2)
            if "POISON" in text:
                continue
            if self.rng.random() < self.faults.get("drop", 0.0):
                continue
            rid: object = int(item_id) if item_id.isdigit() else item_id
            code = code_of(text)
            out.append({"id": rid, "c": code})
            if self.rng.random() < self.faults.get("repeat", 0.0):
                out.append({"id": rid, "c": self.rng.choice(CODES)})
            if self.rng.random() < self.faults.get("invent", 0.0):
                out.append({"id": 99999999, "c": "A"})
            if self.rng.random() < self.faults.get("bad_code", 0.0):
                out[-1] = {"id": rid, "c": "Z"}
        reply = json.dumps(out, separators=(",", ":"))
        finish = "stop"
        if self.rng.random() < self.faults.get("malformed", 0.0):
            cut = self.rng.randrange(1, max(2, len(reply)))
            reply = reply[:cut] + "}{oops" + reply[cut:]
        max_chars = int(call.body["max_tokens"]) * 4  # type: ignore[call-overload]
        if self.rng.random() < self.faults.get("truncate", 0.0):
            max_chars = min(max_chars, self.rng.randrange(1, max(2, len(reply))))
        if len(reply) > max_chars:
            reply, finish = reply[:max_chars], "length"
        for entry in out:
            self.answered[str(entry["id"])] = self.answered.get(str(entry["id"]), 0) + 1
        usage = Usage(chat_prompt_tokens(messages), text_tokens(reply))
        body = json.dumps({"choices": [{"index": 0, "finish_reason": finish,
                                        "message": {"role": "assistant", "content": reply}}],
                           "usage": {"prompt_tokens": usage.prompt_tokens,
                                     "completion_tokens": usage.completion_tokens}})
        hdrs = {"x-mdb-charged-usd": f"{usage.total * 1e-6:.8f}", **self.headers}
        return Response(200, hdrs, body, elapsed_s=0.5)


def provider(name: str = "p1", **kw: object) -> ProviderSettings:
    return ProviderSettings(name=name, base_url=f"http://{name}/v1", api_key="k", **kw)  # type: ignore[arg-type]


def _drained(engine: Engine, events: list[Event] | None) -> list:
    results, evs = engine.drain()
    if events is not None:
        events.extend(evs)
    return results


def drive(engine: Engine, fake: Callable[[Call], Response],
          limit: int = 100000, events: list[Event] | None = None) -> tuple[Done, float, dict]:
    """Run the engine in virtual time: every call answers after 0.5 s (the engine's
    events are appended to ``events`` when given)."""
    now = 0.0
    inflight: list[tuple[float, object]] = []
    results: dict[str, object] = {}
    for _ in range(limit):
        action = engine.next_action(now)
        if isinstance(action, Send):
            inflight.append((now + 0.5, action.call))
            continue
        if isinstance(action, Done):
            for r in _drained(engine, events):
                assert r.item_id not in results
                results[r.item_id] = r
            return action, now, results
        assert isinstance(action, Wait)
        nxt = min([t for t, _ in inflight], default=None)
        if action.seconds is not None:
            nxt = min(nxt, now + action.seconds) if nxt is not None else now + action.seconds
        assert nxt is not None, "engine waits for nothing"
        now = max(now, nxt)
        due = [(t, c) for t, c in inflight if t <= now]
        inflight = [(t, c) for t, c in inflight if t > now]
        for _, call in due:
            engine.on_response(now, call, fake(call))  # type: ignore[arg-type]
        for r in _drained(engine, events):
            assert r.item_id not in results, f"{r.item_id} finished twice"
            results[r.item_id] = r
    raise AssertionError("engine did not finish")
