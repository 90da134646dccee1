"""Provider profiles: frozen dataclasses parsed once from YAML, with errors naming file and key.

A configuration file is either a full simulator configuration (top-level ``providers:``
list plus ``admin_token``, ``time_scale``, ``seed``, ``max_body_bytes``) or one provider
mapping (the files under ``scenarios/providers/``). ``scenarios/providers/README.md``
documents every key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import yaml

from simulator.model._reader import ConfigError, Section, fail
from simulator.model.profile import (
    ALGORITHMS,
    COUNTING,
    DEFAULT_CODES,
    DIST_KINDS,
    HEADER_STYLES,
    MONEY_STYLES,
    RESPONDERS,
    BillingSpec,
    Dist,
    FaultSpec,
    GpuSpec,
    KeyProfile,
    LatencySpec,
    LimitSpec,
    ModelProfile,
    Outage,
    ProviderProfile,
    ResponderSpec,
    SimulatorConfig,
)

__all__ = [
    "BillingSpec",
    "ConfigError",
    "Dist",
    "FaultSpec",
    "GpuSpec",
    "KeyProfile",
    "LatencySpec",
    "LimitSpec",
    "ModelProfile",
    "Outage",
    "ProviderProfile",
    "ResponderSpec",
    "SimulatorConfig",
    "apply_overrides",
    "default_config",
    "load_config",
    "parse_config",
    "parse_provider",
]


# --------------------------------------------------------------------------- parsing

_LIMIT_KEYS = (
    "algorithm", "window_s", "request_window_s", "rpm", "tpm", "input_tpm", "output_tpm",
    "concurrency", "tokens_per_day", "counting", "default_max_tokens",
)
_PROVIDER_KEYS = (
    "name", "headers", "organization", "count_refused", "count_5xx", "accept_any_key",
    "models", "limits", "keys", "billing", "latency", "gpu", "responder", "faults",
)


def _parse_dist(sec: Section, name: str, default: Dist, base_dir: Path | None) -> Dist:
    raw = sec.raw(name)
    if raw is None:
        return default
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        if raw < 0 or not math.isfinite(raw):
            raise sec.error(name, "a number >= 0 or a distribution mapping", raw)
        return Dist.constant(float(raw))
    d = sec.sub(name, ("dist", "value", "mean", "std", "median", "p99", "low", "high",
                       "values", "file"))
    kind = d.string("dist", choices=DIST_KINDS)
    if kind == "constant":
        return Dist.constant(d.number("value", minimum=0.0))
    if kind == "normal":
        return Dist("normal", mean=d.number("mean", minimum=0.0), std=d.number("std", minimum=0.0))
    if kind == "lognormal":
        median = d.number("median", positive=True)
        p99 = d.number("p99", positive=True)
        if p99 < median:
            raise d.error("p99", f"a number >= median ({median:g})", p99)
        return Dist.lognormal(median, p99)
    if kind == "uniform":
        low = d.number("low", minimum=0.0)
        high = d.number("high", minimum=low)
        return Dist("uniform", low=low, high=high)
    values: list[float] = []
    if d.has("file"):
        path = Path(d.string("file"))
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise d.error("file", "a readable file of numbers, one per line", str(exc)) from exc
        for number, line in enumerate(lines, 1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            try:
                values.append(float(text))
            except ValueError as exc:
                raise d.error("file", f"a number on line {number} of {path}", text) from exc
    else:
        for i, v in enumerate(d.seq("values")):
            if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
                raise d.error(f"values[{i}]", "a number >= 0", v)
            values.append(float(v))
    if not values or any(v < 0 or not math.isfinite(v) for v in values):
        raise d.error("values", "at least one finite number >= 0 (values: or file:)")
    return Dist("empirical", values=tuple(values))


def _parse_limit_fields(sec: Section) -> dict[str, object]:
    """The limit keys present in ``sec``, validated (a partial LimitSpec)."""
    out: dict[str, object] = {}
    if sec.has("algorithm"):
        out["algorithm"] = sec.string("algorithm", choices=ALGORITHMS)
    if sec.has("counting"):
        out["counting"] = sec.string("counting", choices=COUNTING)
    if sec.has("window_s"):
        out["window_s"] = sec.number("window_s", positive=True)
    if sec.has("request_window_s"):
        out["request_window_s"] = sec.number("request_window_s", positive=True)
    for name in ("rpm", "tpm", "input_tpm", "output_tpm", "concurrency", "tokens_per_day"):
        if name in sec.data:
            # an explicit null removes a limit inherited from the tier
            out[name] = sec.opt_integer(name, minimum=1)
    if sec.has("default_max_tokens"):
        out["default_max_tokens"] = sec.integer("default_max_tokens", minimum=0)
    return out


def _parse_limit_levels(
    sec: Section, models: tuple[str, ...]
) -> tuple[dict[str, object], dict[str, dict[str, object]]]:
    """A limits mapping: its own fields, and per-model overrides under ``per_model``."""
    base = _parse_limit_fields(sec)
    per_model: dict[str, dict[str, object]] = {}
    pm = sec.sub("per_model")
    for model in pm.data:
        if model not in models:
            raise pm.error(model, "a model declared under models: " + ", ".join(models))
        per_model[model] = _parse_limit_fields(pm.sub(model, _LIMIT_KEYS))
    return base, per_model


def _resolve_limits(
    models: tuple[str, ...], levels: list[tuple[dict[str, object], dict[str, dict[str, object]]]]
) -> Mapping[str, LimitSpec]:
    out: dict[str, LimitSpec] = {}
    for model in models:
        merged: dict[str, object] = {}
        for base, per_model in levels:
            merged.update(base)
            merged.update(per_model.get(model, {}))
        out[model] = LimitSpec(**merged)  # type: ignore[arg-type]
    return MappingProxyType(out)


def _parse_models(sec: Section) -> tuple[ModelProfile, ...]:
    models = []
    for name in sec.data:
        m = sec.sub(name, ("kind", "context_window", "max_output_tokens", "input_usd_per_mtok",
                           "output_usd_per_mtok", "dims", "owned_by"))
        models.append(ModelProfile(
            name=name,
            kind=m.string("kind", "chat", choices=("chat", "embeddings")),
            context_window=m.integer("context_window", 128_000, minimum=1),
            max_output_tokens=m.integer("max_output_tokens", 16_384, minimum=1),
            input_usd_per_mtok=m.number("input_usd_per_mtok", 0.0, minimum=0.0),
            output_usd_per_mtok=m.number("output_usd_per_mtok", 0.0, minimum=0.0),
            dims=m.integer("dims", 1536, minimum=1),
            owned_by=m.string("owned_by", "ratelab"),
        ))
    if not models:
        raise sec.error("", "at least one model (a mapping of model name to its settings)")
    return tuple(models)


def _balance(sec: Section, name: str, default: float | None) -> float | None:
    raw = sec.raw(name, "absent")
    if raw == "absent":
        return default
    if raw is None or raw == "unlimited":
        return None
    return sec.number(name, minimum=0.0)


def _parse_outages(sec: Section) -> tuple[Outage, ...]:
    out = []
    for i, item in enumerate(sec.seq("outages")):
        o = Section(item, sec.source, sec.key(f"outages[{i}]"), ("start_s", "end_s", "status"))
        start = o.number("start_s", minimum=0.0)
        end = o.number("end_s", minimum=start)
        status = o.integer("status", 503, minimum=400)
        if status > 599:
            raise o.error("status", "an HTTP status 400-599", status)
        out.append(Outage(start, end, status))
    return tuple(out)


def parse_provider(data: object, source: str, *, path: str = "",
                   base_dir: Path | None = None) -> ProviderProfile:
    """Parse one provider mapping; ``source`` (a file name) and ``path`` prefix error messages."""
    sec = Section(data, source, path, _PROVIDER_KEYS)
    if base_dir is None and source and Path(source).suffix in (".yaml", ".yml"):
        base_dir = Path(source).parent
    name = sec.string("name", "default")
    if "/" in name or not name.strip():
        raise sec.error("name", "a provider name without '/'", name)
    header_style = sec.string("headers", "openai", choices=HEADER_STYLES)
    models = _parse_models(sec.sub("models"))
    model_names = tuple(m.name for m in models)
    tier = _parse_limit_levels(sec.sub("limits", (*_LIMIT_KEYS, "per_model")), model_names)
    default_limits = _resolve_limits(model_names, [tier])

    b = sec.sub("billing", ("balance_usd", "charge_headers", "cost_cap_usd", "money_style",
                            "refund_undelivered"))
    cap = b.opt_number("cost_cap_usd")
    billing = BillingSpec(
        balance_usd=_balance(b, "balance_usd", None),
        charge_headers=b.boolean("charge_headers", True),
        cost_cap_usd=cap,
        money_style=str(b.raw("money_style", "402")),
        refund_undelivered=b.boolean("refund_undelivered", True),
    )
    if billing.money_style not in MONEY_STYLES:
        raise b.error("money_style", "one of " + ", ".join(MONEY_STYLES), billing.money_style)

    organization = sec.string("organization", "org-ratelab")
    keys_sec = sec.sub("keys")
    keys = []
    for key in keys_sec.data:
        k = keys_sec.sub(key, ("balance_usd", "organization", "limits"))
        levels = [tier, _parse_limit_levels(k.sub("limits", (*_LIMIT_KEYS, "per_model")),
                                            model_names)]
        keys.append(KeyProfile(
            key=key,
            organization=k.string("organization", organization),
            balance_usd=_balance(k, "balance_usd", billing.balance_usd),
            limits=_resolve_limits(model_names, levels),
        ))
    accept_any = sec.boolean("accept_any_key", False)
    if not keys and not accept_any:
        raise sec.error("keys", "at least one API key (or accept_any_key: true)")

    lat = sec.sub("latency", ("ttft_s", "itl_s", "prefill_s_per_token", "embeddings_s"))
    zero = Dist.constant(0.0)
    latency = LatencySpec(
        ttft_s=_parse_dist(lat, "ttft_s", zero, base_dir),
        itl_s=_parse_dist(lat, "itl_s", zero, base_dir),
        prefill_s_per_token=lat.number("prefill_s_per_token", 0.0, minimum=0.0),
        embeddings_s=_parse_dist(lat, "embeddings_s", zero, base_dir),
    )
    gpu = None
    if sec.has("gpu"):
        g = sec.sub("gpu", ("max_seqs", "knee_seqs", "itl_growth_per_seq", "max_queue"))
        max_seqs = g.integer("max_seqs", 48, minimum=1)
        gpu = GpuSpec(
            max_seqs=max_seqs,
            knee_seqs=g.integer("knee_seqs", min(32, max_seqs), minimum=1),
            itl_growth_per_seq=g.number("itl_growth_per_seq", 0.04, minimum=0.0),
            max_queue=g.opt_integer("max_queue", minimum=0),
        )

    r = sec.sub("responder", ("kind", "output_tokens", "codes", "drop_item_rate",
                              "invent_id_rate", "repeat_id_rate", "malformed_json_rate",
                              "truncate_rate"))
    codes = r.seq("codes") or list(DEFAULT_CODES)
    for i, c in enumerate(codes):
        if not isinstance(c, str) or not c:
            raise r.error(f"codes[{i}]", "a non-empty string", c)
    responder = ResponderSpec(
        kind=r.string("kind", "lorem", choices=RESPONDERS),
        output_tokens=_parse_dist(r, "output_tokens", Dist.lognormal(60.0, 400.0), base_dir),
        codes=tuple(str(c) for c in codes),
        drop_item_rate=r.rate("drop_item_rate"),
        invent_id_rate=r.rate("invent_id_rate"),
        repeat_id_rate=r.rate("repeat_id_rate"),
        malformed_json_rate=r.rate("malformed_json_rate"),
        truncate_rate=r.rate("truncate_rate"),
    )

    f = sec.sub("faults", [fl.name for fl in dataclasses.fields(FaultSpec)])
    faults = FaultSpec(
        error_500_rate=f.rate("error_500_rate"),
        error_503_rate=f.rate("error_503_rate"),
        reset_rate=f.rate("reset_rate"),
        hold_rate=f.rate("hold_rate"),
        hold_s=f.number("hold_s", 600.0, minimum=0.0),
        slow_first_token_rate=f.rate("slow_first_token_rate"),
        slow_first_token_s=f.number("slow_first_token_s", 30.0, minimum=0.0),
        stall_rate=f.rate("stall_rate"),
        stall_s=f.number("stall_s", 30.0, minimum=0.0),
        repetition_rate=f.rate("repetition_rate"),
        mid_stream_error_rate=f.rate("mid_stream_error_rate"),
        outages=_parse_outages(f),
    )
    return ProviderProfile(
        name=name,
        models=models,
        keys=tuple(keys),
        default_limits=default_limits,
        header_style=header_style,
        organization=organization,
        count_refused=sec.boolean("count_refused", header_style == "openai"),
        count_5xx=sec.boolean("count_5xx", True),
        accept_any_key=accept_any,
        billing=billing,
        latency=latency,
        gpu=gpu,
        responder=responder,
        faults=faults,
    )


def parse_config(data: object, source: str) -> SimulatorConfig:
    """Parse a whole configuration (``providers:`` list) or a single provider mapping."""
    if isinstance(data, dict) and "providers" in data:
        sec = Section(data, source, "", ("providers", "admin_token", "time_scale", "seed",
                                         "max_body_bytes"))
        items = sec.seq("providers")
        if not items:
            raise sec.error("providers", "a non-empty list of provider mappings")
        providers = tuple(parse_provider(p, source, path=f"providers[{i}]")
                          for i, p in enumerate(items))
        names = [p.name for p in providers]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise fail(source, f"providers[{i}].name", "a name unique among providers", n)
        return SimulatorConfig(
            providers=providers,
            admin_token=sec.string("admin_token", "ratelab-admin"),
            time_scale=sec.number("time_scale", 1.0, positive=True),
            seed=sec.integer("seed", 0),
            max_body_bytes=sec.integer("max_body_bytes", 4 * 1024 * 1024, minimum=1),
        )
    return SimulatorConfig(providers=(parse_provider(data, source),))


def load_config(path: str | Path) -> SimulatorConfig:
    """Read a YAML configuration file (``yaml.safe_load``) and parse it."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        # the line and the problem alone: PyYAML's own text quotes the source as
        # "<unicode string>" over several lines
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}{where}: not valid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    return parse_config(data, source)


DEFAULT_PROVIDER_YAML = """
name: default
headers: openai
organization: org-ratelab
models:
  gpt-4o-mini: {input_usd_per_mtok: 0.15, output_usd_per_mtok: 0.60, context_window: 128000,
                max_output_tokens: 16384, owned_by: openai}
  gpt-4o: {input_usd_per_mtok: 2.50, output_usd_per_mtok: 10.00, context_window: 128000,
           max_output_tokens: 16384, owned_by: openai}
  gpt-4.1-mini: {input_usd_per_mtok: 0.40, output_usd_per_mtok: 1.60, context_window: 1047576,
                 max_output_tokens: 32768, owned_by: openai}
  text-embedding-3-small: {kind: embeddings, dims: 1536, input_usd_per_mtok: 0.02,
                           context_window: 8191, owned_by: openai}
limits:            # a usage-tier-2-like paid account
  algorithm: sliding
  window_s: 60
  rpm: 5000
  tpm: 2000000
  counting: reserve
  per_model:
    gpt-4o: {tpm: 450000}
keys:
  sk-ratelab: {}
billing: {balance_usd: unlimited, charge_headers: true}
latency:
  ttft_s: {dist: lognormal, median: 0.35, p99: 1.5}
  itl_s: {dist: normal, mean: 0.012, std: 0.003}
  embeddings_s: {dist: lognormal, median: 0.08, p99: 0.4}
responder:
  kind: lorem
  output_tokens: {dist: lognormal, median: 60, p99: 400}
"""


def default_config() -> SimulatorConfig:
    """The documented default: provider ``default``, key ``sk-ratelab``, paid tier, gpt-4o-mini."""
    return SimulatorConfig(providers=(parse_provider(yaml.safe_load(DEFAULT_PROVIDER_YAML),
                                                     "<default provider>"),))


def _override_limits(spec: LimitSpec, changes: dict[str, object], sliding: bool) -> LimitSpec:
    if sliding:
        changes = {**changes, "algorithm": "sliding", "window_s": 60.0, "request_window_s": None}
    return dataclasses.replace(spec, **changes)  # type: ignore[arg-type]


def apply_overrides(cfg: SimulatorConfig, *, rpm: int | None = None, tpm: int | None = None,
                    concurrency: int | None = None, ttft_ms: float | None = None,
                    itl_ms: float | None = None, balance_usd: float | None = None,
                    time_scale: float | None = None, seed: int | None = None,
                    item_codes: tuple[str, ...] | None = None) -> SimulatorConfig:
    """Apply the ``ratelab serve`` flags to every key and model of every provider.

    Limits given this way use a sliding 60-second window; ``ttft_ms``/``itl_ms`` become
    constant latencies (milliseconds); ``balance_usd`` is every key's prepaid balance;
    ``item_codes`` makes every provider answer item batches (the ``batch_json`` responder,
    its faults kept) with these label codes.
    """
    changes: dict[str, object] = {}
    if rpm is not None:
        changes["rpm"] = rpm
    if tpm is not None:
        changes["tpm"] = tpm
    if concurrency is not None:
        changes["concurrency"] = concurrency
    sliding = rpm is not None or tpm is not None

    def limits(m: Mapping[str, LimitSpec]) -> Mapping[str, LimitSpec]:
        if not changes:
            return m
        return MappingProxyType({k: _override_limits(v, changes, sliding) for k, v in m.items()})

    providers = []
    for p in cfg.providers:
        keys = tuple(dataclasses.replace(
            k, limits=limits(k.limits),
            balance_usd=balance_usd if balance_usd is not None else k.balance_usd,
        ) for k in p.keys)
        latency = p.latency
        if ttft_ms is not None:
            latency = dataclasses.replace(latency, ttft_s=Dist.constant(ttft_ms / 1000.0))
        if itl_ms is not None:
            latency = dataclasses.replace(latency, itl_s=Dist.constant(itl_ms / 1000.0))
        billing = p.billing
        if balance_usd is not None:
            billing = dataclasses.replace(billing, balance_usd=balance_usd)
        responder = p.responder
        if item_codes is not None:
            responder = dataclasses.replace(responder, kind="batch_json", codes=item_codes)
        providers.append(dataclasses.replace(
            p, keys=keys, default_limits=limits(p.default_limits), latency=latency,
            billing=billing, responder=responder,
        ))
    return dataclasses.replace(
        cfg,
        providers=tuple(providers),
        time_scale=time_scale if time_scale is not None else cfg.time_scale,
        seed=seed if seed is not None else cfg.seed,
    )
