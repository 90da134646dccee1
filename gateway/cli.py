"""``ratelab gateway``: run the queue-fronted service until SIGINT (Ctrl-C) or SIGTERM.

Both stop it the same way: workers stop (tasks they held stay leased and run again later),
the site and the state close; the exit status is 128 + the signal's number (130, 143).
The handlers are the event loop's own, so they hold even when the process was started
with SIGINT ignored (a background job of a non-interactive shell).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sqlite3
import sys
from dataclasses import replace
from urllib.parse import urlsplit

from batchclient.configreader import ConfigError
from gateway.config import GatewayConfig, default_config, load_config
from gateway.server import start_gateway

REDIS_SCHEMES = ("redis", "rediss", "unix")  # what redis-py's from_url accepts

HELP = ("Run the queue-fronted gateway: enqueue, poll or subscribe, per-user limits by tier, "
        "interactive and background lanes, shared through Redis with --redis.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the gateway's flags."""
    parser.add_argument("--config", metavar="FILE",
                        help="gateway YAML (upstreams, tiers, users, lanes, batching); "
                             "default: one upstream at --upstream with the default tiers")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port (0 picks a free one)")
    parser.add_argument("--redis", metavar="URL",
                        help="share tasks, users' buckets and the provider window through "
                             "this Redis (redis://HOST:PORT/DB)")
    parser.add_argument("--workers", type=int, help="worker count (overrides the config)")
    parser.add_argument("--db", metavar="PATH", help="SQLite task store without --redis")
    parser.add_argument("--upstream", default="http://127.0.0.1:8000/v1",
                        help="provider base URL when no --config is given "
                             "(default: `ratelab serve --port 8000`)")


def _config(args: argparse.Namespace) -> GatewayConfig:
    if not args.config and not args.upstream.startswith(("http://", "https://")):
        raise ConfigError(f"--upstream: expected an http(s) URL, got {args.upstream!r}")
    cfg = load_config(args.config) if args.config else default_config(args.upstream)
    if args.workers is not None:
        if args.workers < 1 or args.workers <= cfg.lanes.reserved_workers:
            raise ConfigError(f"--workers: expected more than lanes.reserved_workers "
                              f"({cfg.lanes.reserved_workers}), got {args.workers}")
        cfg = replace(cfg, workers=args.workers)
    if args.redis is not None and urlsplit(args.redis).scheme not in REDIS_SCHEMES:
        raise ConfigError(f"--redis: expected a {', '.join(s + '://' for s in REDIS_SCHEMES)} "
                          f"URL, got {args.redis!r}")
    return cfg


async def _serve(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    gw = await start_gateway(cfg, host=args.host, port=args.port, redis_url=args.redis,
                             db_path=args.db)
    backend = f"Redis {args.redis}" if args.redis else f"SQLite {args.db or cfg.db_path}"
    print(f"ratelab gateway on {gw.url} -> {', '.join(u.base_url for u in cfg.upstreams)} "
          f"({cfg.workers} workers, state in {backend})", flush=True)
    stop = asyncio.Event()
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
    finally:
        await gw.close()
    return 128 + received[0]


def main(args: argparse.Namespace) -> int:
    """Run until SIGINT or SIGTERM (130, 143); 2 on a bad configuration."""
    if not 0 <= args.port <= 65535:
        print(f"ratelab gateway: --port: expected 0 to 65535, got {args.port}", file=sys.stderr)
        return 2
    try:
        cfg = _config(args)
    except ConfigError as exc:
        print(f"ratelab gateway: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(cfg, args))
    except KeyboardInterrupt:  # where the loop cannot handle signals itself
        return 130
    except sqlite3.Error as exc:
        print(f"ratelab gateway: --db {args.db or cfg.db_path}: cannot open the task store: "
              f"{exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ratelab gateway: {exc}", file=sys.stderr)
        return 1
