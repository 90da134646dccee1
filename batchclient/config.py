"""Client configuration: frozen dataclasses parsed once, with errors naming file and key.

``parse_client_config(data, source)`` is the one entry point for the harness (a scenario's
client arm mapping) and the CLI; ``parse_task(data, source)`` reads a task file. Durations
are virtual seconds, rates per virtual minute, money in USD, prices USD per million tokens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from batchclient.configreader import ConfigError as ConfigError
from batchclient.configreader import Reader

Strategy = Literal["single", "semantic_batch", "naive"]
STRATEGIES: tuple[str, ...] = ("single", "semantic_batch", "naive")


DEFAULT_INSTRUCTIONS = (
    'Classify each line. Reply ONLY with a compact JSON array: [{"id":ID,"c":"CODE"},...]'
)


@dataclass(frozen=True, slots=True)
class Task:
    """What to do with each item: system prompt, label codes -> names, model, reply size.

    ``max_tokens_per_item`` caps the reply of a single-item request (tokens).
    """

    name: str
    system_prompt: str
    labels: Mapping[str, str]
    model: str
    max_tokens_per_item: int = 16
    instructions: str = DEFAULT_INSTRUCTIONS


@dataclass(frozen=True, slots=True)
class Price:
    """Price of a model in USD per million input and output tokens."""

    input_per_m: float
    output_per_m: float


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """Rate limits of one model at one provider (per virtual minute; None = unknown).
    ``input_tpm`` and ``output_tpm``: separate limits of prompt and reply tokens, as an
    Anthropic-like provider sets them (with or without a total ``tpm``)."""

    tpm: int | None = None
    rpm: int | None = None
    input_tpm: int | None = None
    output_tpm: int | None = None


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """One provider endpoint in failover order.

    ``reserve_max_tokens`` tells whether the provider counts ``max_tokens`` against TPM at
    admission (True) or only actual usage; ``time_scale`` is the wire compression factor.
    ``count_refused`` tells whether requests it refuses (429, 402, 400) still count against
    its RPM window, as OpenAI's do (the default). ``share`` is the fraction of the key's
    limits this client may use when other clients (processes) share the key: its own
    usage stays within that part, while the provider's headers, which count every
    client's, are still held against the whole limit. ``model``: the model every request
    to this provider asks for, whatever the item's (a fallback that serves another model:
    a failover to it changes model; None asks for the item's own).
    """

    name: str
    base_url: str
    api_key: str
    time_scale: float = 1.0
    limits: ModelLimits = ModelLimits()
    model_limits: Mapping[str, ModelLimits] = field(default_factory=dict)
    reserve_max_tokens: bool = True
    prices: Mapping[str, Price] = field(default_factory=dict)
    failover_on_429: bool = False
    count_refused: bool = True
    share: float = 1.0
    model: str | None = None

    def limits_for(self, model: str) -> ModelLimits:
        """Limits that apply to ``model`` here (per-model entry, else the provider's)."""
        return self.model_limits.get(model, self.limits)


@dataclass(frozen=True, slots=True)
class BatchSettings:
    """Semantic batching: items per request and the token budget of one request.

    ``token_budget`` bounds prompt tokens plus ``max_tokens`` of one request.
    ``json_mode`` asks the provider for a JSON object (``response_format: json_object``):
    the model then wraps its array, e.g. ``{"results": [...]}``, which ``max_tokens`` makes
    room for. ``json_schema`` asks for that object under a strict JSON schema instead
    (``packing.answer_schema``: each answer an id and a code of the taxonomy), whose text
    the prompt's tokens count.
    """

    max_items: int = 20
    token_budget: int = 16000
    adaptive: bool = False
    min_items: int = 1
    reply_slack_tokens: int = 4
    json_mode: bool = False
    json_schema: bool = False

    @property
    def wrapped(self) -> bool:
        """Whether replies come as an object around the array (JSON mode or schema)."""
        return self.json_mode or self.json_schema


@dataclass(frozen=True, slots=True)
class ConcurrencySettings:
    """In-flight requests: fixed ``limit``, or AIMD between ``min`` and ``max``."""

    mode: Literal["fixed", "aimd"] = "fixed"
    limit: int = 8
    min: int = 1
    max: int = 64
    latency_target_s: float | None = None


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    """Proactive throttle on a rolling window of tokens and requests.

    ``steps`` are (usage fraction, delay seconds) pairs: the article's 85/95/98 %.
    ``ceiling`` is the fraction of a limit the client never plans beyond;
    ``expiry_margin_s`` keeps an entry in the window that much longer than the provider
    does (it admitted the request a little after we sent it: wire and loop latency).
    """

    enabled: bool = True
    window_s: float = 60.0
    ceiling: float = 0.99
    steps: tuple[tuple[float, float], ...] = ((0.85, 0.3), (0.95, 0.8), (0.98, 2.0))
    use_headers: bool = True
    expiry_margin_s: float = 0.25


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """Backoff with full jitter; attempt caps per item before it is dead-lettered.

    ``max_attempts`` counts failed requests carrying the item (429, 5xx, timeouts);
    ``max_misses`` counts replies that left it out or answered it wrongly.
    ``max_empty_replies`` consecutive replies that answered no item at all (prose, garbled,
    cut before their first answer, or every answer refused) stop the job (exit 5, the items
    left pending): the provider or the prompt is at fault, and every further request would
    be paid for nothing. 0 never stops.
    ``naive_sleep`` is the naive strategy's reaction to a 429: ``article`` sleeps
    ``2**n + random()`` seconds, ``immediate`` retries at once.
    """

    base_s: float = 1.0
    cap_s: float = 60.0
    max_attempts: int = 8
    max_misses: int = 5
    max_empty_replies: int = 10
    naive_sleep: Literal["article", "immediate"] = "article"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """Circuit breaker per provider: opens after ``failures`` consecutive 5xx/timeouts."""

    failures: int = 5
    cooldown_s: float = 30.0


@dataclass(frozen=True, slots=True)
class RouteRule:
    """Send items matching the rule to ``model``: by ``max_item_tokens`` or by ``tag``."""

    model: str
    max_item_tokens: int | None = None
    tag: str | None = None


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """Streaming with a watchdog: cancel when the first token is later than
    ``first_token_s`` or the text falls into a loop (a ``loop_period``-char block
    repeated ``loop_repeats`` times)."""

    enabled: bool = False
    first_token_s: float = 5.0
    loop_min_period: int = 8
    loop_repeats: int = 4


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Everything a job needs besides its items and task."""

    strategy: Strategy = "semantic_batch"
    providers: tuple[ProviderSettings, ...] = ()
    batch: BatchSettings = BatchSettings()
    concurrency: ConcurrencySettings = ConcurrencySettings()
    throttle: ThrottleSettings = ThrottleSettings()
    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    routing: tuple[RouteRule, ...] = ()
    stream: StreamSettings = StreamSettings()
    timeout_s: float = 60.0
    time_scale: float = 1.0
    cache_path: str | None = None
    store_path: str | None = None
    page_size: int = 1000
    low_balance_usd: float | None = None
    # a budget for the run's batches (USD): no request is sent whose most possible cost
    # would take the spend past it; then the job stops with status 6, its items pending
    spend_cap_usd: float | None = None
    seed: int = 0


def _spend_cap(r: Reader) -> float | None:
    cap = r.opt_float("spend_cap_usd")
    if cap is not None and cap <= 0:
        raise r.fail("spend_cap_usd", "an amount of USD > 0")
    return cap


def _read_limits(r: Reader) -> ModelLimits:
    return ModelLimits(tpm=r.opt_int("tpm"), rpm=r.opt_int("rpm"),
                       input_tpm=r.opt_int("input_tpm"), output_tpm=r.opt_int("output_tpm"))


def _limits(r: Reader) -> ModelLimits:
    limits = _read_limits(r)
    r.finish()
    return limits


def read_prices(r: Reader) -> dict[str, Price]:
    """``prices`` of a provider: per model, ``input`` and ``output`` USD per million
    tokens (for a provider that sends no charge header)."""
    prices: dict[str, Price] = {}
    pr = r.child("prices")
    for model in list(pr.data):
        p = pr.child(str(model))
        prices[str(model)] = Price(p.float_("input", 0.0), p.float_("output", 0.0))
        p.finish()
    pr.finish()
    return prices


def _provider(r: Reader, default_scale: float) -> ProviderSettings:
    name = r.str_("name")
    base_url = r.str_("base_url")
    if not base_url.startswith(("http://", "https://")):
        raise r.fail("base_url", "an http(s) URL")
    api_key = r.raw("api_key")
    env = r.raw("api_key_env")
    if env is not None:
        if not isinstance(env, str) or not env:
            raise r.fail("api_key_env", "an environment variable name")
        if env not in os.environ:
            raise ConfigError(f"{r.source}: {r.key('api_key_env')}: ${env} is not set")
        api_key = os.environ[env]
    if not isinstance(api_key, str) or not api_key:
        raise r.fail("api_key", "a non-empty string (or api_key_env)")
    time_scale = r.float_("time_scale", default_scale, 1e-9)
    limits = _read_limits(r)
    model_limits: dict[str, ModelLimits] = {}
    ml = r.child("model_limits")
    for model in list(ml.data):
        model_limits[str(model)] = _limits(ml.child(str(model)))
    ml.finish()
    prices = read_prices(r)
    counting = r.choice("tpm_counting", "reserve_max_tokens", ("reserve_max_tokens", "actual"))
    settings = ProviderSettings(
        name=name, base_url=base_url.rstrip("/"), api_key=api_key, time_scale=time_scale,
        limits=limits, model_limits=model_limits,
        reserve_max_tokens=counting == "reserve_max_tokens", prices=prices,
        failover_on_429=r.bool_("failover_on_429", False),
        count_refused=r.bool_("count_refused", True),
        share=r.float_("share", 1.0, 1e-6), model=r.opt_str("model"),
    )
    if settings.share > 1.0:
        raise r.fail("share", "a fraction of the key's limits, at most 1")
    r.finish()
    return settings


def _steps(r: Reader, default: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
    value = r.raw("steps")
    if value is None:
        return default
    steps: list[tuple[float, float]] = []
    if not isinstance(value, list):
        raise r.fail("steps", "a list of [usage_fraction, delay_s] pairs")
    for pair in value:
        ok = (isinstance(pair, list | tuple) and len(pair) == 2
              and all(isinstance(x, int | float) and not isinstance(x, bool) for x in pair))
        if not ok or not 0 < pair[0] <= 1.5 or pair[1] < 0:
            raise r.fail("steps", "a list of [usage_fraction in (0,1.5], delay_s >= 0] pairs")
        steps.append((float(pair[0]), float(pair[1])))
    return tuple(sorted(steps))


def parse_client_config(data: object, source: str) -> ClientConfig:
    """Parse a client mapping (a scenario arm's ``client:`` or a CLI config file).

    Raises ConfigError naming ``source`` and the key path on any bad or unknown key.
    """
    r = Reader({} if data is None else data, source, "")
    strategy = r.choice("strategy", "semantic_batch", STRATEGIES)
    time_scale = r.float_("time_scale", 1.0, 1e-9)
    if time_scale <= 0:
        raise r.fail("time_scale", "a number > 0")
    providers_raw = r.raw("providers")
    providers: list[ProviderSettings] = []
    if providers_raw is not None:
        if not isinstance(providers_raw, list):
            raise r.fail("providers", "a list of provider mappings")
        for i, entry in enumerate(providers_raw):
            providers.append(_provider(Reader(entry, source, f"providers[{i}]"), time_scale))
    names = [p.name for p in providers]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{source}: providers[{i}].name: duplicate provider {name!r}")

    b = r.child("batch")
    batch = BatchSettings(
        max_items=b.int_("max_items", 20, 1), token_budget=b.int_("token_budget", 16000, 1),
        adaptive=b.bool_("adaptive", False), min_items=b.int_("min_items", 1, 1),
        reply_slack_tokens=b.int_("reply_slack_tokens", 4, 0),
        json_mode=b.bool_("json_mode", False), json_schema=b.bool_("json_schema", False),
    )
    if batch.json_mode and batch.json_schema:
        raise ConfigError(f"{source}: batch.json_schema: json_mode and json_schema are two "
                          "ways to ask for the answers' object; set one of them")
    b.finish()
    c = r.child("concurrency")
    concurrency = ConcurrencySettings(
        mode="aimd" if c.choice("mode", "fixed", ("fixed", "aimd")) == "aimd" else "fixed",
        limit=c.int_("limit", 8, 1), min=c.int_("min", 1, 1), max=c.int_("max", 64, 1),
        latency_target_s=c.opt_float("latency_target_s"),
    )
    c.finish()
    t = r.child("throttle")
    defaults = ThrottleSettings()
    throttle = ThrottleSettings(
        enabled=t.bool_("enabled", strategy != "naive"), window_s=t.float_("window_s", 60.0, 1e-6),
        ceiling=t.float_("ceiling", 0.99, 0.01), steps=_steps(t, defaults.steps),
        use_headers=t.bool_("use_headers", True),
        expiry_margin_s=t.float_("expiry_margin_s", 0.25),
    )
    t.finish()
    rt = r.child("retry")
    retry = RetrySettings(
        base_s=rt.float_("base_s", 1.0), cap_s=rt.float_("cap_s", 60.0),
        max_attempts=rt.int_("max_attempts", 8, 1), max_misses=rt.int_("max_misses", 5, 1),
        max_empty_replies=rt.int_("max_empty_replies", 10, 0),
        naive_sleep="immediate"
        if rt.choice("naive_sleep", "article", ("article", "immediate")) == "immediate"
        else "article",
    )
    rt.finish()
    br = r.child("breaker")
    breaker = BreakerSettings(br.int_("failures", 5, 1), br.float_("cooldown_s", 30.0))
    br.finish()
    routing: list[RouteRule] = []
    routes_raw = r.raw("routing")
    if routes_raw is not None:
        if not isinstance(routes_raw, list):
            raise r.fail("routing", "a list of {model, max_item_tokens | tag}")
        for i, entry in enumerate(routes_raw):
            rr = Reader(entry, source, f"routing[{i}]")
            tag = rr.raw("tag")
            if tag is not None and not isinstance(tag, str):
                raise rr.fail("tag", "a string")
            rule = RouteRule(rr.str_("model"), rr.opt_int("max_item_tokens"), tag)
            if rule.max_item_tokens is None and rule.tag is None:
                raise ConfigError(f"{source}: routing[{i}]: expected max_item_tokens or tag")
            rr.finish()
            routing.append(rule)
    s = r.child("stream")
    stream = StreamSettings(
        enabled=s.bool_("enabled", False), first_token_s=s.float_("first_token_s", 5.0),
        loop_min_period=s.int_("loop_min_period", 8, 1), loop_repeats=s.int_("loop_repeats", 4, 2),
    )
    s.finish()
    cache_path = r.raw("cache_path")
    store_path = r.raw("store_path")
    for key, value in (("cache_path", cache_path), ("store_path", store_path)):
        if value is not None and not isinstance(value, str):
            raise r.fail(key, "a file path")
    config = ClientConfig(
        strategy="single" if strategy == "single" else "naive" if strategy == "naive"
        else "semantic_batch",
        providers=tuple(providers), batch=batch, concurrency=concurrency, throttle=throttle,
        retry=retry, breaker=breaker, routing=tuple(routing), stream=stream,
        timeout_s=r.float_("timeout_s", 60.0, 1e-6), time_scale=time_scale,
        cache_path=cache_path if isinstance(cache_path, str) else None,
        store_path=store_path if isinstance(store_path, str) else None,
        page_size=r.int_("page_size", 1000, 1), low_balance_usd=r.opt_float("low_balance_usd"),
        spend_cap_usd=_spend_cap(r),
        seed=r.int_("seed", 0, 0),
    )
    r.finish()
    return config


def parse_task(data: object, source: str) -> Task:
    """Parse a task mapping: name, system_prompt, labels {code: name}, model, max tokens."""
    r = Reader(data, source, "")
    labels_raw = r.raw("labels")
    if not isinstance(labels_raw, Mapping) or not labels_raw:
        raise ConfigError(f"{source}: labels: expected a non-empty mapping of code -> name "
                          "(the taxonomy has no codes)")
    labels: dict[str, str] = {}
    for code, name in labels_raw.items():
        if not isinstance(code, str) or not code or not isinstance(name, str):
            raise ConfigError(f"{source}: labels.{code}: expected a string code -> string name")
        labels[code] = name
    task = Task(
        name=r.str_("name", "task"), system_prompt=r.str_("system_prompt"), labels=labels,
        model=r.str_("model"), max_tokens_per_item=r.int_("max_tokens_per_item", 16, 1),
        instructions=r.str_("instructions", DEFAULT_INSTRUCTIONS),
    )
    r.finish()
    return task
