"""``ratelab serve``: run the simulated provider, or ``--demo`` one real request against it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import signal
import sys

import aiohttp

from simulator.loop import new_event_loop
from simulator.model.config import (
    ConfigError,
    SimulatorConfig,
    apply_overrides,
    default_config,
    load_config,
)
from simulator.model.profile import ResponderSpec
from simulator.server import RunningServer, start_server

HELP = "Start the simulated OpenAI-compatible LLM provider (rate limits, billing, latency, faults)."

DEMO_PROMPT = "Say hello to ratelab in one short sentence."
# Headers the demo shows: the rate-limit and billing ones, whatever the provider's style.
_SHOWN_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "x-mdb-", "retry-after")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``ratelab serve``."""
    parser.description = (
        "Serve one or more simulated providers over OpenAI's HTTP API: POST "
        "/v1/chat/completions, POST /v1/embeddings, GET /v1/models (the first provider), "
        "every provider under /p/NAME/v1/..., the admin API under /admin/NAME/... and "
        "Prometheus metrics at /metrics. Without --config it serves the default paid-tier "
        "provider: API key sk-ratelab, models including gpt-4o-mini. The limit and latency "
        "flags override every key and model of every provider."
    )
    parser.add_argument("--config", metavar="PROVIDERS.yaml",
                        help="provider profiles in YAML (e.g. scenarios/providers/*.yaml); "
                             "default: the built-in paid tier")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1); anything but loopback "
                             "exposes the simulator")
    parser.add_argument("--port", type=int, default=8000,
                        help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument("--rpm", type=int, metavar="N",
                        help="requests per minute per key and model (sliding 60 s window)")
    parser.add_argument("--tpm", type=int, metavar="N",
                        help="tokens per minute per key and model (sliding 60 s window)")
    parser.add_argument("--concurrency", type=int, metavar="N",
                        help="concurrent requests in flight per key and model")
    parser.add_argument("--ttft-ms", type=float, metavar="X",
                        help="constant time to first token, milliseconds (virtual)")
    parser.add_argument("--itl-ms", type=float, metavar="X",
                        help="constant inter-token latency, milliseconds (virtual)")
    parser.add_argument("--balance-usd", type=float, metavar="X",
                        help="prepaid balance of every key, USD (HTTP 402 once spent)")
    parser.add_argument("--time-scale", type=float, metavar="K",
                        help="compress time: one wall second stands for K virtual seconds; "
                             "latencies, windows and retry-after shrink by K")
    parser.add_argument("--item-codes", metavar="A,B,...",
                        help="answer item batches (as ratelab job sends them) with a JSON "
                             "array of these label codes, the batch_json responder; default: "
                             "the config's responder, prose for the built-in paid tier")
    parser.add_argument("--seed", type=int, metavar="N",
                        help="seed of every random draw: latency, responders, faults "
                             "(default 0, or the config's seed)")
    parser.add_argument("--admin-token", metavar="T",
                        help="bearer token of the admin API (default ratelab-admin, or the "
                             "config's admin_token)")
    parser.add_argument("--demo", action="store_true",
                        help="start on a free port, send one real chat request over HTTP, "
                             "print request, status, rate-limit and billing headers and "
                             "reply, then stop")


def _config(args: argparse.Namespace) -> SimulatorConfig:
    cfg = load_config(args.config) if args.config else default_config()
    cfg = apply_overrides(
        cfg, rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency, ttft_ms=args.ttft_ms,
        itl_ms=args.itl_ms, balance_usd=args.balance_usd, time_scale=args.time_scale,
        seed=args.seed, item_codes=_item_codes(args.item_codes),
    )
    if args.admin_token:
        cfg = dataclasses.replace(cfg, admin_token=args.admin_token)
    return cfg


def _item_codes(flag: str | None) -> tuple[str, ...] | None:
    """``--item-codes A,B,C`` as codes (checked by ``_flag_problems`` first)."""
    return None if flag is None else tuple(code.strip() for code in flag.split(","))


def _flag_problems(args: argparse.Namespace) -> list[str]:
    """The override flags out of range, as the configuration file's own checks would
    refuse them (a limit of 0 or a negative latency would serve nonsense, a time_scale of
    0 would divide by zero)."""
    checks = (("--rpm", args.rpm, 1), ("--tpm", args.tpm, 1),
              ("--concurrency", args.concurrency, 1), ("--ttft-ms", args.ttft_ms, 0),
              ("--itl-ms", args.itl_ms, 0), ("--balance-usd", args.balance_usd, 0))
    problems = [f"{flag}: expected a number >= {low}, got {value:g}"
                for flag, value, low in checks
                if value is not None and not (math.isfinite(value) and value >= low)]
    if args.time_scale is not None and not (math.isfinite(args.time_scale)
                                            and args.time_scale > 0):
        problems.append(f"--time-scale: expected a number > 0, got {args.time_scale:g}")
    codes = _item_codes(args.item_codes)
    if codes is not None and (not all(codes) or len(set(codes)) != len(codes)):
        problems.append(f"--item-codes: expected distinct codes separated by commas, got "
                        f"{args.item_codes!r}")
    return problems


def main(args: argparse.Namespace) -> int:
    """Run ``ratelab serve``; returns the exit status (2 on a configuration error)."""
    if not 0 <= args.port <= 65535:
        print(f"ratelab serve: --port: expected 0 to 65535, got {args.port}", file=sys.stderr)
        return 2
    problems = _flag_problems(args)
    if problems:
        for problem in problems:
            print(f"ratelab serve: {problem}", file=sys.stderr)
        return 2
    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"ratelab serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ratelab serve: cannot read {args.config}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"ratelab serve: {args.config}: not UTF-8 text: {exc.reason}", file=sys.stderr)
        return 2
    # the serving loop wakes timers to the microsecond (simulator.loop.new_event_loop)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        if args.demo:
            return runner.run(demo(cfg, host=args.host))
        try:
            return runner.run(_serve(cfg, args.host, args.port))
        except OSError as exc:
            print(f"ratelab serve: cannot listen on {args.host}:{args.port}: "
                  f"{exc.strerror or exc}", file=sys.stderr)
            return 1


def _banner(server: RunningServer, cfg: SimulatorConfig) -> str:
    lines = [f"ratelab simulator listening on {server.url} (time_scale {cfg.time_scale:g})"]
    for i, profile in enumerate(cfg.providers):
        where = f"{server.url}/v1 and " if i == 0 else ""
        lines.append(f"  provider {profile.name!r}: {where}{server.base_url(profile.name)}; "
                     f"replies: {_replies(profile.responder)}")
    lines.append(f"  admin: {server.url}/admin/NAME/stats (Bearer {cfg.admin_token}); "
                 f"metrics: {server.url}/metrics")
    return "\n".join(lines)


def _replies(responder: ResponderSpec) -> str:
    """What a provider answers, as the banner says it: a batch job needs item batches
    answered (batch_json), and prose is the default."""
    if responder.kind == "batch_json":
        return f"batch_json, item codes {','.join(responder.codes)}"
    if responder.kind == "lorem":
        return "prose (lorem; for a batch job, serve with --item-codes)"
    return responder.kind


async def _serve(cfg: SimulatorConfig, host: str, port: int) -> int:
    # this process exists to serve: settle the garbage collector for it (gc_tuning.py)
    server = await start_server(cfg, host=host, port=port, tune_gc=True)
    print(_banner(server, cfg), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()
    print("ratelab simulator stopped", flush=True)
    return 0


def _demo_target(cfg: SimulatorConfig) -> tuple[str, str]:
    """(API key, model) for the demo request: the first provider's first key and chat
    model, ``gpt-4o-mini`` when it is served."""
    profile = cfg.providers[0]
    key = profile.keys[0].key if profile.keys else "sk-ratelab"
    models = [m.name for m in profile.models if m.kind == "chat"]
    model = "gpt-4o-mini" if "gpt-4o-mini" in models or not models else models[0]
    return key, model


async def demo(cfg: SimulatorConfig, *, host: str = "127.0.0.1") -> int:
    """Start the simulator on a free port, send one chat request, print the exchange, stop."""
    server = await start_server(cfg, host=host, port=0)
    try:
        print(_banner(server, cfg), "", sep="\n")
        key, model = _demo_target(cfg)
        url = f"{server.base_url()}/chat/completions"
        payload = {"model": model, "max_tokens": 32,
                   "messages": [{"role": "user", "content": DEMO_PROMPT}]}
        print(f"> POST {url}")
        print(f"> Authorization: Bearer {key}")
        print(f"> {json.dumps(payload)}")
        async with aiohttp.ClientSession() as session, session.post(
            url, json=payload, headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            text = await resp.text()
            print(f"< HTTP {resp.status} {resp.reason}")
            for name, value in resp.headers.items():
                if name.lower().startswith(_SHOWN_PREFIXES):
                    print(f"< {name}: {value}")
            print(f"< {text}")
            if resp.status == 200:
                reply = json.loads(text)["choices"][0]["message"]["content"]
                print(f"\nreply: {reply!r}")
        return 0 if resp.status == 200 else 1
    finally:
        await server.close()
