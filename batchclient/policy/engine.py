"""The job state machine that both the asyncio runner and the SimPy planner drive.

``next_action(now)`` returns ``Send(call)``, ``Wait(seconds)`` or ``Done(status)``;
``on_response(now, call, response)`` feeds back what came back. Items arrive in pages
(``wants_items``/``add_items``/``end_of_items``); finished items and telemetry leave
through ``drain()``. Pure: time is the ``now`` argument (virtual seconds), randomness the
seeded ``random.Random`` given at construction, no I/O. Dispatch decisions live here;
what happens to an answer is ``batchclient.policy.responses``.
"""

from __future__ import annotations

import heapq
import random
import re
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import replace
from itertools import islice, repeat
from operator import attrgetter

from batchclient.config import ClientConfig, ProviderSettings, Task
from batchclient.cost import CostMeter, SpendBudget
from batchclient.events import Event
from batchclient.policy.adaptive import AdaptiveBatchSize
from batchclient.policy.breaker import Breaker
from batchclient.policy.classify import Classified, Verdict
from batchclient.policy.concurrency import Concurrency
from batchclient.policy.interactive_lane import InteractiveLane
from batchclient.policy.job import EXIT_AUTH as EXIT_AUTH
from batchclient.policy.job import EXIT_BALANCE as EXIT_BALANCE
from batchclient.policy.job import EXIT_ERROR as EXIT_ERROR
from batchclient.policy.job import EXIT_INPUT as EXIT_INPUT
from batchclient.policy.job import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from batchclient.policy.job import EXIT_NO_ANSWERS as EXIT_NO_ANSWERS
from batchclient.policy.job import EXIT_OK as EXIT_OK
from batchclient.policy.job import EXIT_SPEND_CAP as EXIT_SPEND_CAP
from batchclient.policy.job import Action as Action
from batchclient.policy.job import Counts as Counts
from batchclient.policy.job import Done as Done
from batchclient.policy.job import InputError as InputError
from batchclient.policy.job import InteractiveRequest as InteractiveRequest
from batchclient.policy.job import ItemResult as ItemResult
from batchclient.policy.job import Send as Send
from batchclient.policy.job import Wait as Wait
from batchclient.policy.job import cache_key as cache_key
from batchclient.policy.job import hash_text as hash_text
from batchclient.policy.job import normalise as normalise
from batchclient.policy.job import normalise_page, page_is_normal
from batchclient.policy.job import task_digest as task_digest
from batchclient.policy.lanes import LanePolicy
from batchclient.policy.packing import batch_packer, response_format
from batchclient.policy.responses import ResponseHandling
from batchclient.policy.routing import Predicate, first_available, route_model
from batchclient.policy.state import Accepted, Drained, ItemState
from batchclient.policy.throttle import Throttle
from batchclient.policy.tokens import canonical_id, reply_item_chars
from batchclient.policy.userlimits import UserLimits
from batchclient.policy.wire import Call, Item, Response

_ID = re.compile(r"[A-Za-z0-9_.-]+")
_IDS = re.compile(r"[A-Za-z0-9_.-]+(?:\n[A-Za-z0-9_.-]+)*")  # ids joined by line breaks
_WAIT = Wait(None)  # a value: the one "wait for a response or items" every decision shares
# what a send reads of its batch's states, a C-level map each
_STATE_ID, _SENDS, _ATTEMPTS = attrgetter("id"), attrgetter("sends"), attrgetter("attempts")
_SIZES = attrgetter("sizes")  # what the packing reads of the queue's head, a C-level map


def _ascii_digits(text: str) -> bool:
    """Whether ``text`` is ASCII digits alone (bytes.isdigit tests a character against a
    table; str.isdigit looks each up in the Unicode database, about five times the cost:
    the same answer for ASCII)."""
    return text.isascii() and text.encode().isdigit()


class Engine(ResponseHandling, InteractiveLane):
    """Pure state machine of one job (see the module docstring)."""

    def __init__(
        self,
        task: Task,
        config: ClientConfig,
        rng: random.Random,
        served_models: Mapping[str, Iterable[str]] | None = None,
        predicates: Iterable[tuple[Predicate, str]] = (),
        user_limits: UserLimits | None = None,
        lanes: LanePolicy | None = None,
        spend: SpendBudget | None = None,
        topups: Iterable[float] = (),
    ) -> None:
        if not config.providers:
            raise InputError("client config: providers: at least one provider is required")
        if not task.labels:
            raise InputError("task: labels: the taxonomy has no codes")
        self.task = task
        self.config = config
        self.rng = rng
        self.strategy = config.strategy
        self.providers: tuple[ProviderSettings, ...] = config.providers
        self._provider = {p.name: p for p in self.providers}
        self._served = None if served_models is None else {
            k: frozenset(v) for k, v in served_models.items()}
        self._predicates = tuple(predicates)
        # every model the job may send items to: the task's, and its routing rules'
        self.job_models = frozenset({task.model, *(r.model for r in config.routing),
                                     *(m for _, m in self._predicates)})
        if config.batch.json_mode and "json" not in (
                task.system_prompt + task.instructions).lower():
            raise InputError("batch.json_mode: the task's system prompt or instructions must "
                             "say JSON (OpenAI refuses JSON mode without the word)")
        self.packer = batch_packer(task, config.batch)
        self._response_format = response_format(task, config.batch)
        self._digest = task_digest(task)
        self._code_len = max(len(c) for c in task.labels)
        batching = self.strategy == "semantic_batch"
        max_items = config.batch.max_items if batching else 1
        self.adaptive = AdaptiveBatchSize(max_items, config.batch.min_items, max_items * 4) \
            if batching and config.batch.adaptive else None
        self._max_items = max_items
        self.concurrency = Concurrency(config.concurrency)
        self.breakers = {p.name: Breaker(config.breaker) for p in self.providers}
        self._throttles: dict[tuple[str, str], Throttle] = {}
        prices = {p.name: p.prices for p in self.providers}
        self.cost = CostMeter(prices, config.low_balance_usd)
        # the spend cap: each request in flight (batch or chat) holds its most possible cost
        # until it is answered; ``spend`` shares one budget with the process's other
        # engines, else ``spend_cap_usd`` is this engine's own
        self._spend = spend if spend is not None else (
            None if config.spend_cap_usd is None else SpendBudget(config.spend_cap_usd))
        self._spend_id = id(self)
        # the largest charge of a request so far (None before any answer): the estimate
        # where no price is known
        self._largest_charge: float | None = None
        self.counts = Counts()
        self._items: dict[str, ItemState] = {}
        self._keys: dict[str, str] = {}  # canonical id -> id, for collision checks
        # queued items by model, as their states (no id lookup per item when packing)
        self._ready: dict[str, deque[ItemState]] = {}
        self._delayed: list[tuple[float, int, ItemState]] = []
        self._followers: dict[str, list[str]] = {}  # dedup key -> waiting duplicate ids
        self._leaders: dict[str, str] = {}  # dedup key -> id being processed
        self._inflight: dict[int, Call] = {}
        self._next_call = 1
        self._seq = 0
        # Bumped whenever the head of a ready queue changes (popleft/appendleft): the packing
        # of the head is reused until then (a throttled dispatch asks again and again).
        self._head_moves = 0
        self._packed: tuple[tuple[str, int, int, int], list[ItemState], int, int] | None = None
        self._exhausted = False
        self._fatal: Done | None = None
        # the virtual times of the top-ups scheduled for this job's providers (a harness
        # gives them from its scenario): a provider out of balance serves again at the next,
        # and a job stopped by its balance goes on
        self.topups = tuple(topups)
        self._empty_replies = 0  # consecutive replies that answered no item (damaged)
        self._out = Drained()
        self._rate_limited_until: dict[str, float] = {}
        self.user_limits = user_limits
        self.lanes = lanes if lanes is not None else LanePolicy(reserved_slots=0,
                                                                background_ceiling=1.0)
        self._interactive: deque[InteractiveRequest] = deque()
        self._interactive_out: dict[int, tuple[Response, Classified]] = {}
        self._interactive_calls: dict[int, InteractiveRequest] = {}
        self._now = 0.0
        self._background_inflight = 0
        # per model: the providers serving it, in failover order (``served_models`` is
        # fixed for the engine's life, so a decision need not ask ``_serves`` again)
        self._candidates: dict[str, tuple[ProviderSettings, ...]] = {}
        # the model a provider is asked for whatever the item's (ProviderSettings.model)
        self._asked = {p.name: p.model for p in config.providers if p.model}
        # providers whose account answered a fatal 402/401, and when a scheduled top-up
        # brings them back (None: none is due); with every provider out, the job stops
        self._out_of_rotation: set[str] = set()
        self._rotation_back_at: float | None = None

    # ----------------------------------------------------------------- items

    def throttle(self, provider: str, model: str) -> Throttle:
        """The rolling-window throttle of (provider, model), created on first use."""
        key = (provider, model)
        throttle = self._throttles.get(key)
        if throttle is None:
            p = self._provider[provider]
            limits = p.limits_for(model)
            settings = self.config.throttle
            if self.strategy == "naive":
                settings = replace(settings, enabled=False, use_headers=False)
            throttle = Throttle(settings, limits.tpm, limits.rpm, p.reserve_max_tokens,
                                share=p.share, input_tpm=limits.input_tpm,
                                output_tpm=limits.output_tpm)
            self._throttles[key] = throttle
        return throttle

    def _blocked_until(self, provider: str) -> float:
        """Virtual time until which ``provider`` is waiting out a 429 (0: it is not)."""
        return self._rate_limited_until.get(provider, 0.0)

    def paused_for(self, now: float) -> float:
        """Virtual seconds the job still waits out 429s: until the first of its providers
        may be sent to again (0 when one may be now). A key out of its daily tokens can
        pause a job for hours; the progress line says so rather than look hung."""
        until = self._rate_limited_until
        if not until:
            return 0.0
        return max(0.0, min(until.get(p.name, 0.0) for p in self.providers) - now)

    def _serves(self, provider: str, model: str) -> bool:
        if provider in self._out_of_rotation:
            return False  # its account answered 402/401: another provider takes the work
        # a provider with a model of its own serves it for any item
        model = self._asked.get(provider, model)
        if self._served is None or provider not in self._served:
            return True
        return model in self._served[provider]

    @property
    def buffered(self) -> int:
        """Items held in memory and not finished (queued, delayed, in flight, duplicates)."""
        return self.counts.fed - self.counts.done - self.counts.dead

    @property
    def wants_items(self) -> int:
        """How many more items the engine would like fed now (0: enough buffered or the
        source is exhausted)."""
        if self._exhausted or self._fatal is not None:
            return 0
        low_water = max(self.config.page_size // 2,
                        4 * self._max_items * self.concurrency.limit)
        if self.buffered >= low_water:
            return 0
        return self.config.page_size

    def check_item(self, item: Item) -> tuple[int, int]:
        """Raise InputError naming the item when it can never be processed; returns its
        packing sizes (prompt line and reply characters)."""
        return self._check_page([item], record=False)[0]

    def _check_page(self, page: list[Item], record: bool) -> list[tuple[int, int]]:
        """Validate ``page`` in order (the first unusable item raises, naming it): id syntax,
        text, id collisions (with items fed before and within the page), the token budget
        alone. Returns each item's (prompt line, reply object) characters; ``record`` keeps
        the canonical ids for later collision checks."""
        sizes = self._check_page_whole([item.id for item in page], [item.text for item in page],
                                       record)
        if sizes is not None:
            return sizes
        return self._check_page_items(page, record)

    def _check_page_whole(self, ids: list[str], texts: list[str], record: bool,
                          normal: bool = False, unique: bool = False
                          ) -> list[tuple[int, int]] | None:
        """``_check_page`` for a page where every check passes, done a page at a time (one
        regular expression over the joined ids, set operations for collisions, the largest
        sizes against the budget): the sizes, or None when any check might fail, for the
        item-by-item pass to name the first unusable item with its message. ``normal``:
        ``page_is_normal(texts)``, when the caller has it; ``unique``: ids are unique by
        construction (``add_page``), so the page is not tested for repeats."""
        if not ids:
            return []
        joined = "\n".join(ids)
        # an id not starting with "0" is its own canonical form; a leading zero (or a line
        # break inside an id) takes the item-by-item pass
        if joined[:1] == "0" or "\n0" in joined or joined.count("\n") != len(ids) - 1:
            return None
        numeric = _ascii_digits(joined.replace("\n", ""))
        if numeric:
            # ASCII digits: the pattern holds unless an id is empty (string tests, not the
            # regular expression over the whole page)
            if joined[0] == "\n" or joined[-1] == "\n" or "\n\n" in joined:
                return None
        elif not _IDS.fullmatch(joined):
            return None
        # a normal page (page_is_normal) whose first text is not empty has no empty text
        # and none of whitespace alone: the dedup keys' check answers these two
        if not (normal and texts and texts[0]) and (
                not all(texts) or any(map(str.isspace, texts))):
            return None
        keys = self._keys
        # ids unique within the page: by a set when nothing is recorded, else by the
        # record itself below (the map grows by one per id exactly when they are)
        if (keys and not keys.keys().isdisjoint(ids)) or (
                not record and not unique and len(set(ids)) != len(ids)):
            return None
        sizes = self._sizes(ids, texts, numeric)
        longest = max(map(len, ids))
        reply = longest + 6 + 6 + self._code_len + 2 + 1 if numeric else max(
            s[1] for s in sizes)
        instructions = len(self.task.instructions)
        head = instructions + (1 if instructions else 0)
        fixed = self.packer.fixed_prompt_tokens + self.packer.reply_slack_tokens
        budget = self.config.batch.token_budget
        # the token count alone grows with both sizes: the largest of each bounds every
        # item; the longest id and the longest text bound the longest line (a C-level
        # max each), the line itself taken only when that bound does not fit
        line = longest + 5 + max(map(len, texts))
        if fixed + (head + line + 3) // 4 + (2 + reply + 3) // 4 > budget:
            line = max(sizes)[0]  # tuples order by their first member first
            if fixed + (head + line + 3) // 4 + (2 + reply + 3) // 4 > budget:
                return None
        if record:
            count = len(keys)
            keys.update(zip(ids, ids, strict=True))
            if len(keys) != count + len(ids):
                # a repeated id within the page: none of its ids was known (checked
                # above), so taking them all out leaves the map as it was
                for item_id in ids:
                    keys.pop(item_id, None)
                return None
        return sizes

    def _sizes(self, ids: list[str], texts: list[str], numeric: bool) -> list[tuple[int, int]]:
        """Each item's (prompt line, reply object) characters. ``numeric``: every id is
        ASCII digits without a leading zero, so every reply object holds it as it is, as a
        JSON integer (no quotes): sizes without a test per id."""
        if numeric:
            code_chars = 6 + 6 + self._code_len + 2 + 1
            return [(n + 5 + len(text), n + code_chars)
                    for n, text in zip(map(len, ids), texts, strict=True)]
        code_len = self._code_len
        return [(len(item_id) + 5 + len(text), reply_item_chars(item_id, code_len))
                for item_id, text in zip(ids, texts, strict=True)]

    def _checked_sizes(self, ids: list[str], texts: list[str]) -> list[tuple[int, int]]:
        """``_sizes`` of items that passed the checks already (``add_page(checked=True)``)."""
        joined = "\n".join(ids)
        numeric = (joined[:1] != "0" and "\n0" not in joined
                   and _ascii_digits(joined.replace("\n", "")))
        return self._sizes(ids, texts, numeric)

    def check_page(self, ids: list[str], texts: list[str]) -> None:
        """``check_item`` of every item ``Item(id, text)`` of the parallel lists, in order,
        a page at a time: raises InputError naming the first unusable item (or an id that
        collides with another of the page). Records nothing: ids are not remembered for
        later pages."""
        if self._check_page_whole(ids, texts, record=False) is None:
            self._check_page_items(list(map(Item, ids, texts)), record=False)

    def _check_page_items(self, page: list[Item], record: bool) -> list[tuple[int, int]]:
        # One pass per item with the sizes (Packer.sizes, alone_tokens) and canonical_id
        # inlined: the feed runs it for every item of a job.
        keys = self._keys
        seen: dict[str, str] = {}
        sizes: list[tuple[int, int]] = []
        fullmatch = _ID.fullmatch
        instructions = len(self.task.instructions)
        head = instructions + (1 if instructions else 0)
        code_chars = 6 + 6 + self._code_len + 2 + 1
        fixed = self.packer.fixed_prompt_tokens + self.packer.reply_slack_tokens
        budget = self.config.batch.token_budget
        for item in page:
            item_id, text = item.id, item.text
            if item_id.isdigit() and item_id.isascii():
                canon = item_id.lstrip("0") or "0"
                reply = len(canon) + code_chars
            else:
                canon = item_id
                reply = len(item_id) + 2 + code_chars
            if not fullmatch(item_id):
                raise InputError(f"item {item_id!r}: id must match [A-Za-z0-9_.-]+")
            if not text or text.isspace():
                raise InputError(f"item {item_id!r}: empty text")
            other = keys.get(canon)
            if other is not None:
                raise InputError(f"item {item_id!r}: id collides with item {other!r} "
                                 "(ids must be unique; all-digit ids compare as numbers)")
            line = len(item_id) + 5 + len(text)
            alone = fixed + (head + line + 3) // 4 + (2 + reply + 3) // 4
            if alone > budget:
                raise InputError(f"item {item_id!r}: needs {alone} tokens alone, over the "
                                 f"batch.token_budget of {budget}")
            if canon in seen:
                raise InputError(f"item {item_id!r}: id collides with item {seen[canon]!r}")
            seen[canon] = item_id
            sizes.append((line, reply))
        if record:
            keys.update(seen)
        return sizes

    def add_items(self, items: Iterable[Item], checked: bool = False) -> None:
        """Feed a page of items (validated first: raises InputError before any is queued).

        ``checked``: every item already passed ``check_item`` and ids are unique by
        construction (the runner's preflight over its store), so only sizes are computed.
        """
        page = list(items)
        if checked:
            self._add_checked(page)
            return
        self._add_checked(page, self._check_page(page, record=True))

    def add_page(self, ids: list[str], texts: list[str], checked: bool = False,
                 unique: bool = False) -> None:
        """``add_items`` of the items ``Item(id, text)`` given as parallel lists (a driver
        that holds ids and texts, not items: the planner's feed, the runner's pages). Same
        checks, same errors; a page that passes them is validated a page at a time.

        ``checked``: as for ``add_items``, every item passed ``check_item`` already and ids
        are unique by construction (the runner's preflight over its store): sizes only, and
        no id is kept for later collision checks (memory that would grow with the job).

        ``unique``: the ids are unique by construction, within the page and against every
        item fed before (a generator's sequential ids), but nothing else was checked: every
        check but the collisions is made, and, as with ``checked``, no id is kept. Kept ids
        would be the largest memory of a long plan (about 90 bytes an item).
        """
        normal = page_is_normal(texts)  # for the page checks and the dedup keys
        record = not unique
        sizes = self._checked_sizes(ids, texts) if checked else \
            self._check_page_whole(ids, texts, record=record, normal=normal, unique=unique)
        if sizes is None:
            sizes = self._check_page_items(list(map(Item, ids, texts)), record=record)
        if self.config.routing or self._predicates:
            self._add_checked(list(map(Item, ids, texts)), sizes, normal)
            return
        # Nothing can reroute: every item goes to the task's model, and no Item is built.
        model = self.task.model
        prefix = self._key_prefix(model)
        items, leaders, followers = self._items, self._leaders, self._followers
        queue = self._ready.get(model)
        if queue is None:
            queue = self._ready[model] = deque()
        # the page's keys and states built by C-level loops, then queued in order
        keys = [prefix + norm for norm in normalise_page(texts, normal)]
        states = list(map(ItemState, ids, texts, repeat(model, len(ids)), keys, sizes))
        items.update(zip(ids, states, strict=True))
        if len(set(keys)) == len(keys) and leaders.keys().isdisjoint(keys):
            # no text repeats another of the page or one waiting: every item leads its
            # key, queued in order (the loop below, by C-level updates)
            leaders.update(zip(keys, ids, strict=True))
            queue.extend(states)
            self.counts.fed += len(ids)
            return
        append, lead = queue.append, leaders.setdefault
        for state, key, item_id in zip(states, keys, ids, strict=True):
            # one lookup: the item leads its key unless an earlier one does (ids are unique)
            if lead(key, item_id) is not item_id:
                followers.setdefault(key, []).append(item_id)
                continue
            append(state)
        self.counts.fed += len(ids)

    def _key_prefix(self, model: str) -> str:
        """What ``cache_key`` puts before an item's normalised text for ``model``."""
        return f"{model}\x1f{self.task.name}\x1f{self._digest}\x1f"

    def _add_checked(self, page: list[Item], sizes: list[tuple[int, int]] | None = None,
                     normal: bool | None = None) -> None:
        # Queue a validated page (per item: sizes unless given, route, cache key).
        # Inlined: Packer.sizes and cache_key (the key's model/task/digest prefix is built
        # once per model, not per item); the route is skipped when nothing can reroute.
        default_model, routing = self.task.model, self.config.routing
        predicates, code_len = self._predicates, self._code_len
        items, leaders, ready, followers = self._items, self._leaders, self._ready, self._followers
        rerouting = bool(routing or predicates)
        prefixes = {default_model: self._key_prefix(default_model)}
        model = default_model
        prefix = prefixes[default_model]
        queue = ready.get(model)
        normalised = normalise_page([item.text for item in page], normal)
        for n, item in enumerate(page):
            item_id, text = item.id, item.text
            if rerouting:
                model = route_model(item, default_model, routing, predicates)
                found = prefixes.get(model)
                prefix = found if found is not None else prefixes.setdefault(
                    model, self._key_prefix(model))
                queue = ready.get(model)
            key = prefix + normalised[n]
            state = ItemState(item_id, text, model, key, sizes[n] if sizes is not None else (
                len(item_id) + 5 + len(text), reply_item_chars(item_id, code_len)),
                tag=item.tag)
            items[item_id] = state
            if key in leaders:
                followers.setdefault(key, []).append(item_id)
                continue
            leaders[key] = item_id
            if queue is None:
                queue = ready[model] = deque()
            queue.append(state)
        self.counts.fed += len(page)

    def end_of_items(self) -> None:
        """The source has no more items."""
        self._exhausted = True

    def complete_from_cache(self, item: Item, code: str, now: float | None = None) -> None:
        """Record an item answered by the result cache (not sent, not paid) at ``now``
        (virtual seconds; default the latest time the engine was told)."""
        if code not in self.task.labels:
            return
        self.counts.fed += 1
        self._keys[canonical_id(item.id)] = item.id
        self.counts.done += 1
        self.counts.cached += 1
        self._out.results.append(ItemResult(item.id, "done", code, self.task.labels[code]))
        self._out.events.append(Event("item", self.task.name, self._now if now is None else now,
                                      "cached", item_id=item.id))

    # ----------------------------------------------------------------- decisions

    def _release_delayed(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            state = heapq.heappop(self._delayed)[2]
            self._ready.setdefault(state.model, deque()).appendleft(state)
            self._head_moves += 1

    def next_action(self, now: float) -> Action:
        """What to do at ``now``: send a call, wait, or finish."""
        self._now = now
        action = self._next(now)
        if not self._interactive or isinstance(action, Send):
            return action
        # An interactive retry waits out its backoff: wake for it, never finish before it.
        due = self._interactive_wait(now)
        if due is None:
            return action
        if isinstance(action, Wait) and action.seconds is not None:
            return Wait(min(action.seconds, due))
        return Wait(due)

    def _next(self, now: float) -> Action:
        back = self._rotation_back_at
        if back is not None and now >= back:
            self._back_in_rotation()  # a top-up is due: the providers out of it may serve
        if self._fatal is not None:
            if self._inflight:
                return _WAIT
            lifts = self._stop_lifts_in(now)
            return self._fatal if lifts is None else Wait(lifts)
        delayed = self._delayed
        if delayed and delayed[0][0] <= now:
            self._release_delayed(now)
        if self._interactive:  # _next_interactive's own first test, without the call
            interactive = self._next_interactive(now)
            if interactive is not None:
                return interactive
        model = None  # the first model with items ready
        for name, queue in self._ready.items():
            if queue:
                model = name
                break
        if model is None:
            if self._inflight:
                return _WAIT
            if delayed:
                return Wait(max(0.0, delayed[0][0] - now))
            if self._exhausted:
                return Done(EXIT_OK)
            return _WAIT
        limit = self.concurrency.limit
        if len(self._inflight) >= limit or self._background_inflight >= \
                self.lanes.background_slots(limit, len(self._interactive)):
            return _WAIT
        candidates = self._candidates.get(model)
        if candidates is None:
            candidates = self._candidates[model] = tuple(
                p for p in self.providers if self._serves(p.name, model))
        provider = first_available(now, candidates, self.breakers, self._blocked_until)
        if provider is None:
            if self._inflight:
                return _WAIT
            waits = [b.reopens_in(now) for b in self.breakers.values()]
            return Wait(min([w for w in waits if w > 0] or [self.config.breaker.cooldown_s]))
        size = self.adaptive.size if self.adaptive else self._max_items
        # Items appended at the tail only matter while fewer than ``size`` are queued.
        head = min(size, len(queue))
        key = (model, size, head, self._head_moves)
        packed = self._packed
        if packed is None or packed[0] != key:
            states = list(islice(queue, head))
            count, prompt_tokens, max_tokens = self.packer.pack_sizes(
                list(map(_SIZES, states)), size, self.config.batch.token_budget)
            packed = self._packed = (key, states[:count], prompt_tokens, max_tokens)
        _, batch, prompt_tokens, max_tokens = packed
        if self._asked:
            model = self._asked.get(provider, model)  # a fallback serving another model
        throttle = self.throttle(provider, model)
        expected = max_tokens - self.config.batch.reply_slack_tokens
        reserve = throttle.estimate(prompt_tokens, max_tokens, expected)
        wait = throttle.delay(now, reserve, limit, ceiling=self.lanes.background_ceiling,
                              prompt=prompt_tokens)
        if wait > 0:
            return Wait(wait)
        held = 0.0
        if self._spend is not None:
            gate = self._spend_gate(provider, model, prompt_tokens, max_tokens)
            if not isinstance(gate, float):
                return gate
            held = gate
        self._background_inflight += 1
        self._head_moves += 1
        if len(batch) == len(queue):
            queue.clear()
        else:
            popleft = queue.popleft
            for _ in batch:
                popleft()  # the head is the batch, in order
        # the batch's ids, whether any item was sent before and its most failed
        # attempts, by C-level maps (no item is written at a send: ``sends`` counts when
        # a reply sends one back)
        item_ids = tuple(map(_STATE_ID, batch))
        resend = any(map(_SENDS, batch))
        attempt = max(map(_ATTEMPTS, batch))
        call_id = self._next_call
        self._next_call += 1
        body: dict[str, object] = {
            "model": model,
            "messages": self.packer.messages(batch),
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if self._response_format is not None:
            body["response_format"] = self._response_format
        stream = self.config.stream.enabled
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        call = Call(
            call_id=call_id, provider=provider, model=model, item_ids=item_ids, body=body,
            prompt_tokens=prompt_tokens, max_tokens=max_tokens, reserved_tokens=reserve,
            attempt=attempt, timeout_s=self.config.timeout_s, stream=stream, sent_at=now,
            resend=resend,
        )
        throttle.reserve(now, call_id, reserve, prompt_tokens)
        if self._spend is not None:
            self._spend.hold((self._spend_id, call_id), held)
        self.breakers[provider].on_dispatch(now)
        self._inflight[call_id] = call
        self.counts.requests += 1
        return Send(call)

    def _back_in_rotation(self) -> None:
        """A scheduled top-up is due: every provider a fatal answer took out of the rotation
        serves again (the top-up may have been any one's), and a stop on the balance is
        lifted (a further 402 stops or waits anew)."""
        self._out_of_rotation.clear()
        self._candidates.clear()
        self._rotation_back_at = None
        if self._fatal is not None and self._fatal.status == EXIT_BALANCE:
            self._fatal = None

    def _stop_lifts_in(self, now: float) -> float | None:
        """Virtual seconds until the job's stop on its balance lifts at a scheduled top-up;
        None when the job is stopped for good."""
        back = self._rotation_back_at
        if back is None or self._fatal is None or self._fatal.status != EXIT_BALANCE:
            return None
        return back - now if back > now else 0.0

    def _spend_gate(self, provider: str, model: str, prompt_tokens: int, max_tokens: int,
                    left: str = "the items left are pending") -> float | Action:
        """What a request may hold against the spend budget (USD), or what to do instead:
        wait for a request in flight (this engine's, or another's on a shared budget) to
        come back, or stop with ``EXIT_SPEND_CAP`` when none is in flight."""
        budget = self._spend
        assert budget is not None
        estimate = self._cost_estimate(provider, model, prompt_tokens, max_tokens)
        if estimate is None and (self._inflight or budget.holding()):
            return self._spend_wait()  # no price, no charge seen yet: one request finds it out
        held = estimate or 0.0
        if budget.fits(held):
            return held
        if self._inflight or budget.holding():
            return self._spend_wait()  # an answer may cost less than it holds
        self._fatal = Done(EXIT_SPEND_CAP, (
            f"spend cap USD {budget.cap_usd:g} reached: USD {budget.spent_usd:.6g} spent, "
            f"and the next request would cost about USD {held:.6g}; {left}"))
        self._fail_interactive_queue((Response(0), Classified(
            Verdict.NEVER_RETRY, self._fatal.reason or "spend cap reached")))
        return self._fatal

    def _spend_wait(self) -> Wait:
        """Wait for an answer: this engine's wakes it; another engine's (a shared budget)
        does not, so poll for it every virtual second."""
        return _WAIT if self._inflight else Wait(1.0)

    def _cost_estimate(self, provider: str, model: str, prompt_tokens: int,
                       max_tokens: int) -> float | None:
        """The most a request can cost (USD): its prompt and ``max_tokens`` at the price
        table's rates; without a price, the largest charge so far (None before any answer)."""
        price = self.cost.prices.get(provider, {}).get(model)
        if price is not None:
            return (prompt_tokens * price.input_per_m + max_tokens * price.output_per_m) / 1e6
        return self._largest_charge

    # ----------------------------------------------------------------- output

    def drain(self) -> tuple[list[ItemResult], list[Event]]:
        """Finished items and events since the last call (the caller persists them)."""
        out = self._out
        self._out = Drained()
        if not out.batches:
            return out.results, out.events  # type: ignore[return-value]  # no Accepted
        labels, name = self.task.labels, self.task.name
        results: list[ItemResult] = []
        for result in out.results:
            if type(result) is Accepted:
                results.extend(result.results(labels))
            else:
                results.append(result)  # type: ignore[arg-type]  # not Accepted
        events: list[Event] = []
        for event in out.events:
            if type(event) is Accepted:
                events.extend(event.events(name))
            else:
                events.append(event)  # type: ignore[arg-type]  # not Accepted
        return results, events

    def drain_compact(self) -> tuple[list[ItemResult | Accepted], list[Event | Accepted]]:
        """``drain`` without expanding the items a reply finished: each ``Accepted`` entry
        (in both lists, at its place) stands for that reply's ``done`` results and item
        events. For drivers that count outcomes rather than keep every item."""
        # the buffer's lists handed over and fresh ones put in (a driver drains after
        # every answer: no Drained built per request)
        out = self._out
        results, events = out.results, out.events
        out.results, out.events, out.batches = [], [], 0
        return results, events

    @property
    def inflight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._inflight)

    @property
    def fatal(self) -> Done | None:
        """The fatal stop, once a 402/401 (or equivalent) was seen."""
        return self._fatal


