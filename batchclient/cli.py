"""``ratelab job``: run (or resume) a batch job from a JSONL file into a SQLite job store.

Every item of the file is checked before any is imported (``batchclient.itemsfile``), so a
refused file leaves the store as it was (and creates none). Re-running the same command
resumes: items already in the store are not imported again, done ones are skipped; an
import that was interrupted is finished by giving the file again, and a resume without it
is refused until then. Exit statuses follow docs/conventions.md (0, 1, 2, 3, 4, 5, 130).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
from collections.abc import Iterator
from typing import Any

from batchclient import gc_tuning
from batchclient.cache import SqliteResultCache
from batchclient.config import (
    ClientConfig,
    ConfigError,
    ProviderSettings,
    Task,
    parse_client_config,
    parse_task,
)
from batchclient.configreader import load_yaml
from batchclient.itemsfile import check_items, read_items
from batchclient.policy.engine import EXIT_ERROR, EXIT_INPUT, EXIT_INTERRUPTED, Engine, InputError
from batchclient.progress import ProgressSnapshot, render
from batchclient.runner import JobResult, Runner
from batchclient.store import SqliteJobStore, StoreBusyError
from batchclient.transport import AiohttpTransport

HELP = "Run or resume a batch job: classify ITEMS.jsonl through a rate-limited LLM API."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``job`` options on ``parser``."""
    parser.add_argument("items", nargs="?", help="JSONL file of {id, text[, tag]} (omit to "
                        "resume a job already imported into --db)")
    parser.add_argument("--task", required=True, help="task YAML: name, system_prompt, "
                        "labels {code: name}, model, max_tokens_per_item")
    parser.add_argument("--db", required=True, help="SQLite job store (created if missing)")
    parser.add_argument("--config", help="client settings YAML (strategy, batch, throttle...)")
    parser.add_argument("--base-url", help="provider base URL, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY",
                        help="environment variable holding the API key")
    parser.add_argument("--strategy", choices=["single", "semantic_batch", "naive"])
    parser.add_argument("--model", help="override the task's model")
    parser.add_argument("--time-scale", type=float, help="simulator time compression factor")
    parser.add_argument("--concurrency", type=int, help="requests in flight")
    parser.add_argument("--batch-size", type=int, help="items per request (semantic_batch)")
    parser.add_argument("--token-budget", type=int, help="prompt + max_tokens per request")
    parser.add_argument("--tpm", type=int, help="tokens per minute the provider allows")
    parser.add_argument("--rpm", type=int, help="requests per minute the provider allows")
    parser.add_argument("--tpm-counting", choices=["reserve_max_tokens", "actual"])
    parser.add_argument("--share", type=float, help="the part of the key's limits this job may "
                        "use when other jobs share the key, e.g. 0.5 for one of two")
    parser.add_argument("--cache", help="result cache SQLite file shared across jobs")
    parser.add_argument("--low-balance", type=float, help="warn when the balance (USD) "
                        "falls below this")
    parser.add_argument("--spend-cap", type=float, help="this run's budget (USD): no request "
                        "is sent that could take the spend past it (exit 6, items pending)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--task-changed", action="store_true", help="continue a job whose "
                        "task (name, system prompt, instructions, labels or model) changed "
                        "since it started: its done items keep the earlier task's answers")
    parser.add_argument("--retry-dead", action="store_true", help="put the job's "
                        "dead-lettered items back in the queue before the run (once their "
                        "cause is fixed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def _client_mapping(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if args.config:
        loaded = load_yaml(args.config)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: expected a mapping")
        data = dict(loaded or {})
    for key, value in (("strategy", args.strategy), ("time_scale", args.time_scale),
                       ("seed", args.seed), ("low_balance_usd", args.low_balance),
                       ("spend_cap_usd", args.spend_cap)):
        if value is not None:
            data[key] = value
    if args.concurrency is not None:
        data["concurrency"] = {**data.get("concurrency", {}), "limit": args.concurrency}
    batch = dict(data.get("batch", {}))
    if args.batch_size is not None:
        batch["max_items"] = args.batch_size
    if args.token_budget is not None:
        batch["token_budget"] = args.token_budget
    if batch:
        data["batch"] = batch
    if args.base_url:
        provider: dict[str, Any] = {"name": "default", "base_url": args.base_url,
                                    "api_key_env": args.api_key_env}
        data["providers"] = [provider]
    if args.tpm is not None or args.rpm is not None or args.tpm_counting:
        providers = list(data.get("providers") or [])
        if providers:
            first = dict(providers[0])
            for key, value in (("tpm", args.tpm), ("rpm", args.rpm),
                               ("tpm_counting", args.tpm_counting)):
                if value is not None:
                    first[key] = value
            providers[0] = first
            data["providers"] = providers
    if args.share is not None:
        # every provider's key: each is shared alike
        data["providers"] = [{**p, "share": args.share} if isinstance(p, dict) else p
                             for p in data.get("providers") or []]
    if args.cache:
        data["cache_path"] = args.cache
    return data


async def _run(runner: Runner, transport: AiohttpTransport) -> JobResult:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, runner.stop)
    try:
        # a wrong base URL is the commonest mistake, and its requests would be retried with
        # backoff for minutes before every item is dead-lettered: say so before the run
        for name, provider in transport.providers.items():
            why = await transport.unreachable(name)
            if why is not None:
                print(f"ratelab job: warning: provider {name!r} at {provider.base_url} cannot "
                      f"be reached ({why}); its requests are retried with backoff and each "
                      "item is dead-lettered after retry.max_attempts (Ctrl-C stops and "
                      "saves the job)", file=sys.stderr)
        return await runner.run()
    finally:
        await transport.close()


def main(args: argparse.Namespace) -> int:
    """Run the job; return the exit status."""
    try:
        task = parse_task(load_yaml(args.task), args.task)
        if args.model:
            from dataclasses import replace

            task = replace(task, model=args.model)
        source = args.config or "command line"
        config = parse_client_config(_client_mapping(args), source)
        if not config.providers:
            raise ConfigError(f"{source}: providers: give --base-url or a providers list")
    except (ConfigError, InputError) as exc:
        print(f"ratelab job: {exc}", file=sys.stderr)
        return EXIT_INPUT
    if not args.items and not os.path.exists(args.db):
        # a resume of a store that is not there: say so, and leave no empty store behind
        print(f"ratelab job: --db {args.db}: no such job store; give ITEMS.jsonl to start "
              "a job", file=sys.stderr)
        return EXIT_INPUT
    # SIGTERM is Ctrl-C's until the run's own handlers take over: a check stops writing
    # nothing, an import says it is unfinished (the store records it either way)
    with _term_as_interrupt():
        return _checked_run(args, task, config)


@contextlib.contextmanager
def _term_as_interrupt() -> Iterator[None]:
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (an embedding caller): signals are its own
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _checked_run(args: argparse.Namespace, task: Task, config: ClientConfig) -> int:
    """Check the items file, import it, run the job; the exit status."""
    store: SqliteJobStore | None = None
    try:
        # a store that exists is held before the file is checked against it; a new one is
        # created only once the file passed, so a refused file leaves no store behind
        if os.path.exists(args.db):
            store = _open_store(args.db)
            if not args.items and not store.import_complete():
                raise InputError(f"--db {args.db}: the import of the job's items did not "
                                 "finish (it was interrupted): give ITEMS.jsonl again to "
                                 "finish it (the items stored are kept, none is imported "
                                 "twice)")
        if args.items:
            # the engine's checks, with this task and settings, of every item of the file
            count = check_items(args.items, Engine(task, config, random.Random(0)), store)
            if count == 0 and (store is None or store.counts().total == 0):
                raise InputError(f"{args.items}: no items")
        if store is None:
            store = _open_store(args.db)
    except (InputError, OSError, sqlite3.Error, KeyboardInterrupt) as exc:
        if store is not None:
            store.close()
        return _refused(exc, args.db)
    try:
        cache = SqliteResultCache(config.cache_path) if config.cache_path else None
    except sqlite3.Error as exc:
        store.close()
        print(f"ratelab job: cache {config.cache_path}: cannot open the result cache: {exc}",
              file=sys.stderr)
        return EXIT_INPUT
    transport = AiohttpTransport(config.providers, config.stream)

    # On a terminal the progress line is redrawn in place twice a second; into a log file
    # (CI, nohup) a carriage return would pile every redraw onto one line: a line of its
    # own every 30 s instead.
    live = not args.no_progress and sys.stderr.isatty()

    def show(snapshot: ProgressSnapshot) -> None:
        if live:
            print("\r" + render(snapshot), end="", file=sys.stderr, flush=True)
        else:
            print(render(snapshot), file=sys.stderr, flush=True)

    # a message while the progress line is drawn starts a line of its own
    brk = "\n" if live else ""

    def low_balance(balance: float) -> None:
        print(f"{brk}ratelab job: low balance: ${balance:.4f}", file=sys.stderr)

    try:
        if args.items:
            try:
                store.import_items(read_items(args.items))
            except KeyboardInterrupt:
                # the chunks committed stay, and the store says the import is unfinished
                print(f"ratelab job: interrupted during the import of {args.items}: the "
                      f"import is incomplete ({store.counts().total} items stored); re-run "
                      "with the items file to finish it (a resume without it is refused)",
                      file=sys.stderr)
                return EXIT_INTERRUPTED
        if args.retry_dead:
            requeued = store.requeue_dead()
            print(f"ratelab job: {requeued} dead-lettered item"
                  f"{'' if requeued == 1 else 's'} back in the queue", file=sys.stderr)
        runner = Runner(task, config, transport, store, cache=cache,
                        on_progress=None if args.no_progress else show,
                        progress_every_s=0.5 if live else 30.0,
                        on_low_balance=low_balance, rebind_task=args.task_changed)
        # this process exists to run the job: settle the garbage collector for it
        gc_tuning.tune_for_job()
        result = asyncio.run(_run(runner, transport))
        dead_errors = store.dead_errors() if result.dead else []
    except (ConfigError, InputError) as exc:
        print(f"{brk}ratelab job: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:
        print(f"{brk}ratelab job: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except sqlite3.Error as exc:
        # past its retries (a full disk, a store locked for too long): every batch answered
        # before it is committed, so re-running resumes from there
        print(f"{brk}ratelab job: --db {args.db}: the job store failed: {exc}; the results "
              "saved before it are kept, re-run to resume", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # between the import and the run's own signal handlers
        print(f"{brk}ratelab job: interrupted before the run: everything is saved; re-run "
              "to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        store.close()
        if cache is not None:
            cache.close()
    if live:
        print(file=sys.stderr)
    _report(result, args.json, _provider_names(config.providers))
    if dead_errors:
        # exit 0 says every item was settled; the dead letters and why go to stderr
        commonest = "; ".join(f"{error or 'no error recorded'} ({n})"
                              for error, n in dead_errors)
        print(f"ratelab job: {result.dead} item{'' if result.dead == 1 else 's'} "
              f"dead-lettered, by last error: {commonest}. Once the cause is fixed, re-run "
              "with --retry-dead to send them again.", file=sys.stderr)
    return result.exit_status


def _refused(exc: BaseException, db: str) -> int:
    """Say why the job stopped before its import (nothing was imported); the exit status."""
    if isinstance(exc, KeyboardInterrupt):
        print("ratelab job: interrupted before the import: nothing was imported",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(exc, sqlite3.Error):
        print(f"ratelab job: --db {db}: the job store failed: {exc}; nothing was imported",
              file=sys.stderr)
        return EXIT_ERROR
    print(f"ratelab job: {exc}", file=sys.stderr)
    return EXIT_INPUT if isinstance(exc, InputError) else EXIT_ERROR


def _open_store(db: str) -> SqliteJobStore:
    """The job store at ``db`` (created if missing), held for this run; InputError naming
    it when it cannot be opened or another process holds it."""
    try:
        store = SqliteJobStore(db)
    except sqlite3.Error as exc:
        raise InputError(f"--db {db}: cannot open the job store: {exc}") from exc
    try:
        store.claim()  # one run per store: a second would pay again for the same items
    except StoreBusyError as exc:
        store.close()
        raise InputError(f"--db {exc}") from None
    return store


def _provider_names(providers: tuple[ProviderSettings, ...]) -> str:
    return ",".join(p.name for p in providers)


def _report(result: JobResult, as_json: bool, providers: str) -> None:
    if as_json:
        from dataclasses import asdict

        figures = asdict(result)
        # sums of floats: 0.00085695000000001 USD and 2.899904655001592 s say no more
        figures["cost_usd"] = round(result.cost_usd, 9)
        figures["elapsed_s"] = round(result.elapsed_s, 3)
        print(json.dumps({**figures, "providers": providers}))
        return
    print(f"exit {result.exit_status}: {result.done} done, {result.dead} dead, "
          f"{result.pending} pending of {result.total}; {result.requests} requests, "
          f"{result.rate_limited} 429s, ${result.cost_usd:.6f}"
          + (f" ({result.reason})" if result.reason else ""))
