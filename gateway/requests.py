"""Validation of incoming task bodies into values, with OpenAI-shaped error objects.

Pure: takes the decoded JSON and the header values, returns a ``TaskRequest`` or a
``BadRequest`` (status, code, param, message); no aiohttp here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchclient.policy.tokens import chat_prompt_tokens, text_tokens
from gateway.config import LANES, GatewayConfig

ITEM_ID = re.compile(r"[A-Za-z0-9_.-]+")
USER_HEADER = "X-Ratelab-User"
LANE_HEADER = "X-Ratelab-Lane"
# Reply object of one packed item and its share of the instruction line (tokens).
ITEM_OVERHEAD_TOKENS = 8
# Items one ``POST /v1/tasks`` may carry (``items``): a user's list is one request against
# the tier's RPM, its tokens all counted at once.
MAX_ITEMS_PER_POST = 1000


class BadRequest(Exception):
    """A 4xx answer: HTTP status, OpenAI error ``code``, the offending ``param``, words."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param

    def body(self) -> dict[str, Any]:
        """The OpenAI error object."""
        return error_body(self.message, "invalid_request_error", self.code, self.param)


def error_body(message: str, type_: str, code: str, param: str | None = None,
               **extra: object) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code", ...}}`` as OpenAI sends it."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code,
                      **extra}}


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """A validated task: who, which lane and queue, the body kept, the tokens it may cost."""

    user: str
    lane: str
    queue: str
    body: dict[str, Any]
    tokens: int
    stream: bool


def _bad(code: str, message: str, param: str | None = None) -> BadRequest:
    return BadRequest(400, code, message, param)


def _messages(body: Mapping[str, Any]) -> list[dict[str, str]]:
    """The messages checked as the provider checks them (content a string, an array of
    parts, or null for an assistant turn), reduced to their text for the token estimate."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("invalid_messages", "'messages' must be a non-empty array of "
                   "{role, content} objects.", "messages")
    texts = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise _bad("invalid_messages", f"messages[{i}] must be an object with a string "
                       "'role'.", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if not isinstance(part, dict) or (part.get("type") == "text"
                                                  and not isinstance(part.get("text"), str)):
                    raise _bad("invalid_messages", f"messages[{i}].content[{j}] must be an "
                               "object; a text part's 'text' a string.",
                               f"messages[{i}].content[{j}]")
            text = "".join(p["text"] for p in content if isinstance(p.get("text"), str))
        elif isinstance(content, str) or (content is None and m["role"] == "assistant"):
            text = content or ""
        else:
            raise _bad("invalid_messages", f"messages[{i}].content must be a string or an "
                       "array of content parts.", f"messages[{i}].content")
        texts.append({"content": text})
    return texts


def parse_task(body: object, headers: Mapping[str, str], cfg: GatewayConfig,
               default_lane: str) -> TaskRequest:
    """Validate a ``POST /v1/tasks`` or ``/v1/chat/completions`` body; raises BadRequest."""
    if not isinstance(body, dict):
        raise _bad("invalid_body", "The request body must be a JSON object.")
    if "user" in body and not (isinstance(body["user"], str) and body["user"].strip()):
        raise _bad("invalid_user", "'user' must be a non-empty string.", "user")
    user = body.get("user", headers.get(USER_HEADER))
    if not isinstance(user, str) or not user.strip():
        raise _bad("missing_user", "A user id is required: the 'user' field or the "
                   f"{USER_HEADER} header.", "user")
    lane = body.get("lane", headers.get(LANE_HEADER, default_lane))
    if lane not in LANES:
        raise _bad("invalid_lane", f"Unknown lane {lane!r}; expected one of "
                   + ", ".join(LANES) + ".", "lane")
    model = body.get("model")
    if model is not None and not any(model in up.models for up in cfg.upstreams):
        raise BadRequest(400, "model_not_found", f"The model {model!r} is not served here; "
                         "expected one of " + ", ".join(cfg.models) + ".", "model")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool)
                                   or not isinstance(max_tokens, int) or max_tokens < 1):
        raise _bad("invalid_max_tokens", "'max_tokens' must be an integer >= 1.", "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("invalid_stream", "'stream' must be true or false.", "stream")
    item = body.get("item")
    if item is not None:
        return _item_task(body, item, user, lane, cfg)
    messages = _messages(body)
    tokens = chat_prompt_tokens(messages) + (max_tokens or cfg.default_max_tokens)
    queue = lane if cfg.lanes.enabled else "shared"
    return TaskRequest(user, lane, queue, dict(body), tokens, stream)


def parse_items(body: Mapping[str, Any], headers: Mapping[str, str], cfg: GatewayConfig,
                default_lane: str) -> list[TaskRequest]:
    """A body with ``items`` (a list of ``item`` objects): one packable task per item, as
    ``parse_task`` reads an ``item``, every one checked before any is taken; raises
    BadRequest naming ``items[i]``."""
    items = body["items"]
    if "item" in body or "messages" in body:
        raise _bad("invalid_items", "Send 'items', 'item' or 'messages', not two of them.",
                   "items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS_PER_POST:
        raise _bad("invalid_items", "'items' must be an array of 1 to "
                   f"{MAX_ITEMS_PER_POST:,} item objects.", "items")
    rest = {k: v for k, v in body.items() if k != "items"}
    tasks = []
    for i, item in enumerate(items):
        try:
            tasks.append(parse_task({**rest, "item": item}, headers, cfg, default_lane))
        except BadRequest as exc:
            if exc.param != "item":
                raise
            raise BadRequest(exc.status, exc.code, f"items[{i}]: {exc.message}",
                             f"items[{i}]") from None
    return tasks


def _item_task(body: Mapping[str, Any], item: object, user: str, lane: str,
               cfg: GatewayConfig) -> TaskRequest:
    if not (isinstance(item, dict) and isinstance(item.get("text"), str)
            and isinstance(item.get("id"), str | int) and not isinstance(item.get("id"), bool)
            and ITEM_ID.fullmatch(str(item["id"])) and item["text"].strip()):
        # an empty text has nothing to classify (ratelab job refuses one before it sends)
        raise _bad("invalid_item", "'item' must be {\"id\": [A-Za-z0-9_.-]+, \"text\": a "
                   "non-empty string}.", "item")
    if not cfg.batching.enabled:
        raise _bad("batching_disabled", "This gateway does not pack items; send 'messages'.",
                   "item")
    if lane != "background":
        raise _bad("invalid_lane", "Item tasks are packed in the background lane; "
                   "send lane 'background'.", "lane")
    if body.get("stream"):
        raise _bad("invalid_stream", "Item tasks cannot stream.", "stream")
    tokens = text_tokens(str(item["text"])) + len(str(item["id"])) // 4 + ITEM_OVERHEAD_TOKENS
    kept = {"item": {"id": str(item["id"]), "text": str(item["text"])}}
    if body.get("model"):
        kept["model"] = body["model"]
    return TaskRequest(user, lane, "batch", kept, tokens, False)
