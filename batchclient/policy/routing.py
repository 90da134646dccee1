"""Routing: which model an item goes to, and which provider a batch goes to.

Providers are tried in failover order; a provider whose breaker is open is skipped, and
one that just answered 429 is skipped only where ``failover_on_429`` is configured.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from batchclient.config import ProviderSettings, RouteRule
from batchclient.policy.breaker import Breaker
from batchclient.policy.tokens import text_tokens
from batchclient.policy.wire import Item

Predicate = Callable[[Item], bool]


def route_model(
    item: Item,
    default_model: str,
    rules: Sequence[RouteRule],
    predicates: Sequence[tuple[Predicate, str]] = (),
) -> str:
    """The model for ``item``: first matching predicate, then first matching rule
    (tag equal, or text no longer than ``max_item_tokens``), else the task's model."""
    for predicate, model in predicates:
        if predicate(item):
            return model
    for rule in rules:
        if rule.tag is not None and item.tag == rule.tag:
            return rule.model
        if rule.max_item_tokens is not None and text_tokens(item.text) <= rule.max_item_tokens:
            return rule.model
    return default_model


def choose_provider(
    now: float,
    providers: Sequence[ProviderSettings],
    breakers: Mapping[str, Breaker],
    blocked_until: Callable[[str], float],
    model: str,
    serves: Callable[[str, str], bool],
) -> str | None:
    """First provider in order that serves ``model``, whose breaker lets a request through,
    and (for providers with ``failover_on_429``) that is not waiting out a 429 while a
    later provider could take the work. None when every provider is unavailable."""
    return first_available(now, [p for p in providers if serves(p.name, model)], breakers,
                           blocked_until)


def first_available(
    now: float,
    candidates: Sequence[ProviderSettings],
    breakers: Mapping[str, Breaker],
    blocked_until: Callable[[str], float],
) -> str | None:
    """``choose_provider`` among ``candidates``, the providers already known to serve the
    model, in failover order (a dispatch loop keeps them per model instead of asking
    ``serves`` of every provider at every decision)."""
    if len(candidates) == 1:
        # nothing to fail over to: the one provider unless its breaker holds requests
        # (every decision of a single-provider job comes here)
        name = candidates[0].name
        return name if breakers[name].allows(now) else None
    for index, provider in enumerate(candidates):
        if not breakers[provider.name].allows(now):
            continue
        if provider.failover_on_429 and blocked_until(provider.name) > now and any(
            breakers[p.name].allows(now) for p in candidates[index + 1:]
        ):
            continue
        return provider.name
    return None
