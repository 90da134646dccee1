"""Shared builders for the pure model tests: a provider from a YAML snippet, chat bodies."""

from __future__ import annotations

import yaml

from simulator.model.config import parse_provider
from simulator.model.provider import Admission, Provider, Refusal


def provider(text: str, *, seed: int = 0, time_scale: float = 1.0) -> Provider:
    """A Provider from a YAML provider mapping (models default to one free chat model)."""
    data = yaml.safe_load(text)
    data.setdefault("models", {"m": {}})
    data.setdefault("keys", {"k": {}})
    return Provider(parse_provider(data, "test.yaml"), seed=seed, time_scale=time_scale)


def chat(content: str = "hello", *, model: str = "m", max_tokens: int | None = None,
         **extra: object) -> dict:
    """A chat completion body with one user message."""
    body: dict = {"model": model, "messages": [{"role": "user", "content": content}]}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


def admitted(result: Admission | Refusal) -> Admission:
    """``result`` checked to be an Admission."""
    assert isinstance(result, Admission), result
    return result


def refused(result: Admission | Refusal) -> Refusal:
    """``result`` checked to be a Refusal."""
    assert isinstance(result, Refusal), result
    return result
