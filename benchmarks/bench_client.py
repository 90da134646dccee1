"""Benchmark of the batching client (ratelab issue 3).

1. The three strategies over the same items on one TPM-bound simulated provider, each
   for the same virtual duration: items/min, tokens/min, 429s, cost per item, and for
   semantic_batch the efficiency against the DESIGN.md bound in steady state.
2. The client's own CPU per request at ~1,000 requests/s (in-process transport).
3. The first article's ratio: tokens per item, single vs 20-item batches
   (700-token system prompt, 15-token items).

Run from the repository root: ``.venv/bin/python benchmarks/bench_client.py``
(``--quick`` for a shorter run). Figures are virtual minutes under ``time_scale``.

Client CPU side by side: ``--cpu-only --against DIR`` measures this checkout and the one in
DIR (e.g. ``git worktree add /tmp/client-before REV``) with this very harness, in alternating
rounds of fresh processes, and prints every round, the medians and their ratio.
``--instructions`` counts instructions instead (``valgrind --tool=callgrind``, which the
noise of a shared machine cannot disturb): per request of the steady loop, the difference
of two run lengths, each minus its own start (items, store import, preflight).
The job runs as ``ratelab job`` runs it, with no event hook; ``--event-hook`` adds one that
takes every event (one per request and one per item), as the Locust harness's does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# RATELAB_BENCH_TREE: import batchclient (and the simulator) from another checkout, so that
# one harness measures two trees (``--against``).
sys.path.insert(0, os.environ.get("RATELAB_BENCH_TREE") or str(Path(__file__).parents[1]))

from batchclient import (
    AiohttpTransport,
    Event,
    FunctionTransport,
    Item,
    Response,
    Runner,
    SqliteJobStore,
    Task,
    parse_client_config,
)
from batchclient.policy.packing import Packer
from batchclient.policy.tokens import chat_prompt_tokens, text_tokens

HERE = Path(__file__).resolve()
TREE = Path(os.environ.get("RATELAB_BENCH_TREE") or HERE.parents[1]).resolve()
CODES = list("ABCDEFGH")
SYSTEM = ("You sort postal addresses into customer segments. " * 60)[:2800]  # 700 tokens
TASK = Task("segment", SYSTEM, {c: f"segment {c}" for c in CODES}, "gpt-4o-mini")
TPM = 200_000


def make_items(n: int, seed: int = 1) -> list[Item]:
    """n items of 60 characters (15 tokens) each, ids 100000.."""
    rng = random.Random(seed)
    words = ["main", "street", "road", "avenue", "north", "park", "hill", "lane", "court"]
    out = []
    for i in range(n):
        text = f"{rng.randrange(1, 999)} " + " ".join(rng.choice(words) for _ in range(12))
        out.append(Item(str(100000 + i), (text + " " * 60)[:60].rstrip().ljust(60, ".")))
    return out


def provider_profile() -> dict:
    return {
        "name": "tpm-bound",
        "models": {"gpt-4o-mini": {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}},
        "limits": {"tpm": TPM, "rpm": 10_000, "counting": "reserve", "algorithm": "sliding",
                   "window_s": 60},
        "keys": {"sk-ratelab": {}},
        "latency": {"ttft_s": {"dist": "lognormal", "median": 0.5, "p99": 1.5},
                    "itl_s": 0.01},
        "responder": {"kind": "batch_json"},
    }


ARMS = {
    "naive": {"strategy": "naive", "concurrency": {"limit": 20}},
    "single": {"strategy": "single", "concurrency": {"limit": 8}},
    "semantic_batch": {"strategy": "semantic_batch", "concurrency": {"limit": 8},
                       "batch": {"max_items": 20}},
}


async def run_arm(name: str, items: list[Item], duration_s: float, scale: float,
                  workdir: Path) -> dict:
    """One arm on a fresh simulator for ``duration_s`` virtual seconds."""
    # Imported here: the CPU probes (``--against``, ``--instructions``) start faster.
    from simulator.model.config import parse_config
    from simulator.server import serve_in_thread

    sim = parse_config({"time_scale": scale, "seed": 3, "providers": [provider_profile()]},
                       "bench")
    with serve_in_thread(sim) as server:
        cfg = parse_client_config({
            **ARMS[name], "time_scale": scale,
            "providers": [{"name": "tpm-bound", "base_url": server.base_url(),
                           "api_key": "sk-ratelab", "tpm": TPM}],
        }, f"arm {name}")
        store = SqliteJobStore(str(workdir / f"{name}.sqlite"))
        store.import_items(items)
        events: list[Event] = []
        transport = AiohttpTransport(cfg.providers)
        runner = Runner(TASK, cfg, transport, store, on_event=events.append)
        loop = asyncio.get_running_loop()
        loop.call_later(duration_s / scale, runner.stop)
        try:
            result = await runner.run()
        finally:
            await transport.close()
    requests = [e for e in events if e.kind == "request"]
    ok = [e for e in requests if e.status == 200]
    # Steady state: whole windows after the first minute, by dispatch time (a sliding
    # window allows TPM in any 60 s, so partial windows would over- or under-count).
    windows = max(1, int((result.elapsed_s - 60.0) // 60.0))
    end = 60.0 + 60.0 * windows

    def sent_at(e: Event) -> float:
        return e.at - e.response_time_ms / 1000.0

    steady = [e for e in ok if 60.0 <= sent_at(e) < end]
    span_min = float(windows)
    t0 = requests[0].at if requests else 0.0
    steady_items = sum(e.items for e in steady)  # items sent in 200-answered requests
    steady_tokens = sum(e.tokens_in + e.tokens_out for e in steady)
    tokens_per_req = steady_tokens / len(steady) if steady else 0.0
    items_per_req = steady_items / len(steady) if steady else 0.0
    bound_items = TPM * items_per_req / tokens_per_req if tokens_per_req else 0.0
    return {
        "arm": name,
        "elapsed_min": result.elapsed_s / 60.0,
        "done": result.done,
        "requests": result.requests,
        "429s": result.rate_limited,
        "429_rate": result.rate_limited / max(1, result.requests),
        "items_per_min": result.done / (result.elapsed_s / 60.0),
        "tokens_per_min": (result.tokens_in + result.tokens_out) / (result.elapsed_s / 60.0),
        "steady_items_per_min": steady_items / span_min,
        "steady_tokens_per_min": steady_tokens / span_min,
        "bound_items_per_min": bound_items,
        "efficiency": (steady_items / span_min) / bound_items if bound_items else 0.0,
        "cost_per_item_usd": result.cost_usd / max(1, result.done),
        "tokens_per_item": (result.tokens_in + result.tokens_out) / max(1, result.done),
        "first_request_at": t0,
    }


def _tune_gc_as_ratelab_job() -> None:
    # Process-wide, as in ``ratelab job``; a tree from before batchclient.gc_tuning ran
    # its jobs with the interpreter's defaults.
    try:
        from batchclient import gc_tuning
    except ImportError:
        return
    gc_tuning.tune_for_job()


def cpu_per_request(requests: int, rate_per_s: float, strategy: str,
                    preflight_only: bool = False, paced: bool = True,
                    tune_gc: bool = True, event_hook: bool = False) -> dict:
    """Client CPU per request (process time) with an in-process provider paced to
    ``rate_per_s`` (every call answers after a fixed wall delay, 50 ms, with as many calls
    in flight as that rate needs). ``paced=False`` answers at the next turn of the event
    loop instead: the same calls in flight, but how answers group into the runner's wakes
    no longer depends on the machine's speed (``--instructions``). ``preflight_only``
    stops before the first request (the start that ``--instructions`` subtracts).
    ``tune_gc``: the job runs as ``ratelab job`` runs it, with the garbage-collector
    settings of ``batchclient.gc_tuning`` (when the measured tree has them).
    ``event_hook``: an event hook that takes every event (one per request and one per item,
    as the Locust harness's does; it does nothing with them); without it the job runs as
    ``ratelab job`` runs it, with no hook, so no item event is built."""
    delay_s = 0.05 if paced else 0.0
    per_request = 20 if strategy == "semantic_batch" else 1
    items = make_items(requests * per_request, seed=2)
    # The provider's work is not the client's: every item's reply object (codes spread over
    # the taxonomy, as the simulator's batch_json answers) is rendered before the run, and
    # a call only joins them into an OpenAI body (a few us; json.dumps of the objects per
    # call cost ~20 us, all of it counted as client CPU).
    fragments = {item.id: f'{{"id":{int(item.id)},"c":"{CODES[int(item.id) % len(CODES)]}"}}'
                 for item in items}
    headers = {"x-mdb-charged-usd": "0.0001"}
    marks: list[tuple[float, float]] = []

    async def answer(call):  # type: ignore[no-untyped-def]
        # CPU from the first request on: the steady dispatch loop, without the one-off
        # validation pass over every item (reported separately).
        if not marks:
            marks.append((time.perf_counter(), time.process_time()))
        content = "[" + ",".join([fragments[i] for i in call.item_ids]) + "]"
        body = (f'{{"choices":[{{"message":{{"content":{json.dumps(content)}}},'
                f'"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{call.prompt_tokens},'
                f'"completion_tokens":{text_tokens(content)}}}}}')
        await asyncio.sleep(delay_s)
        return Response(200, headers, body, elapsed_s=0.05)

    concurrency = max(1, int(rate_per_s * 0.05))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_client_config({
            "strategy": strategy, "concurrency": {"limit": concurrency},
            "throttle": {"enabled": False}, "page_size": 5000,
            "providers": [{"name": "p", "base_url": "http://in-process/v1", "api_key": "k"}],
        }, "cpu")
        store = SqliteJobStore(str(Path(tmp) / "cpu.sqlite"))
        store.import_items(items)
        events: list[int] = [0]

        def hook(event: Event) -> None:
            events[0] += 1

        runner = Runner(TASK, cfg, FunctionTransport(answer), store,
                        on_event=hook if event_hook else None)
        if tune_gc:
            _tune_gc_as_ratelab_job()
        if preflight_only:
            asyncio.run(runner.preflight())
            return {"strategy": strategy, "items": len(items)}
        wall0, cpu0 = time.perf_counter(), time.process_time()
        result = asyncio.run(runner.run())
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    # Figures of a run that did not do the whole job would flatter the client.
    assert result.done == len(items) and result.requests == requests, result
    assert not event_hook or events[0] == requests + len(items), events
    steady_wall = time.perf_counter() - marks[0][0] - (time.perf_counter() - wall0 - wall)
    steady_cpu = cpu0 + cpu - marks[0][1]
    preflight_cpu = marks[0][1] - cpu0
    return {"strategy": strategy, "event_hook": event_hook, "requests": result.requests,
            "requests_per_s": result.requests / steady_wall,
            "cpu_us_per_request": 1e6 * steady_cpu / result.requests,
            "preflight_us_per_item": 1e6 * preflight_cpu / len(items)}


STRATEGIES = ("semantic_batch", "single")
CPU_KEYS = ["strategy", "event_hook", "requests", "requests_per_s", "cpu_us_per_request",
            "preflight_us_per_item"]


def cpu_table(requests: int = 3000, rate: float = 1000.0,
              strategies: tuple[str, ...] = STRATEGIES, tune_gc: bool = True,
              hooks: tuple[bool, ...] = (False, True)) -> str:
    """CPU per request of 20-item batches and of single-item requests at ~1,000/s, as
    ``ratelab job`` runs (no event hook) and with a hook that takes every event."""
    return table([cpu_per_request(requests, rate, s, tune_gc=tune_gc, event_hook=h)
                  for h in hooks for s in strategies], CPU_KEYS)


def _probe(tree: Path, args: list[str], valgrind: bool = False) -> str:
    """Run this script on ``tree``'s batchclient in a fresh process; its stdout, or with
    ``valgrind`` the instructions callgrind collected."""
    cmd = [sys.executable, str(HERE), *args]
    if valgrind:
        cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd]
    # a fixed hash seed: the same dict layouts, hence the same instructions, every run
    env = {**os.environ, "RATELAB_BENCH_TREE": str(tree),
           **({"PYTHONHASHSEED": "0"} if valgrind else {})}
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    if not valgrind:
        return done.stdout
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count from callgrind: {done.stderr[-500:]}")
    return found.group(1)


def compare_cpu(trees: dict[str, Path], rounds: int, requests: int, rate: float,
                strategies: tuple[str, ...], extra: list[str]) -> None:
    """Rounds of fresh processes, alternating the trees' order; every round, medians and
    the ratio of each tree to the last (the last ``--against`` one)."""
    cpu: dict[tuple[str, str], list[float]] = {(t, s): [] for t in trees for s in strategies}
    print("| round | tree | " + " | ".join(f"{s} us/request" for s in strategies) + " |")
    print("|---|---|" + "---|" * len(strategies))
    for r in range(rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for name in order:
            cells = []
            for strategy in strategies:
                out = _probe(trees[name], ["--cpu-only", "--json", "--strategy", strategy,
                                           "--requests", str(requests), "--rate", str(rate),
                                           *extra])
                value = json.loads(out)[0]["cpu_us_per_request"]
                cpu[name, strategy].append(value)
                cells.append(f"{value:,.0f}")
            print(f"| {r + 1} | {name} | " + " | ".join(cells) + " |", flush=True)
    first = list(trees)[-1]
    for name in trees:
        meds = [statistics.median(cpu[name, s]) for s in strategies]
        ratios = [m / statistics.median(cpu[first, s]) for m, s in zip(meds, strategies,
                                                                        strict=True)]
        print(f"| median | {name} | " + " | ".join(
            f"**{m:,.0f}** ({q:.2f}x)" for m, q in zip(meds, ratios, strict=True)) + " |")


def instructions(trees: dict[str, Path], requests: tuple[int, int], rate: float,
                 strategies: tuple[str, ...], extra: list[str]) -> None:
    """Instructions per request of the steady loop under callgrind (unpaced: the calls in
    flight of ``rate`` answer at once): for two run lengths, the whole run minus its start
    (items, import, preflight), differenced. Ratios are to the last tree (``--against``)."""
    print("| tree | " + " | ".join(f"{s} instructions/request" for s in strategies) + " |")
    print("|---|" + "---|" * len(strategies))
    probes = {}
    for name, tree in trees.items():
        for strategy in strategies:
            for n in requests:
                base = ["--cpu-only", "--json", "--unpaced", "--strategy", strategy,
                        "--requests", str(n), "--rate", str(rate), *extra]
                probes[name, strategy, n, "whole"] = (tree, base)
                probes[name, strategy, n, "start"] = (tree, [*base, "--preflight-only"])
    # Instruction counts do not depend on what else runs: two probes at a time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        counts = dict(zip(probes, pool.map(
            lambda probe: int(_probe(probe[0], probe[1], valgrind=True)), probes.values()),
            strict=True))
    per_tree: dict[str, list[float]] = {}
    for name in trees:
        per_tree[name] = []
        for strategy in strategies:
            steady = [counts[name, strategy, n, "whole"] - counts[name, strategy, n, "start"]
                      for n in requests]
            per_tree[name].append((steady[1] - steady[0]) / (requests[1] - requests[0]))
    last = per_tree[list(trees)[-1]]
    for name, values in per_tree.items():
        print(f"| {name} | " + " | ".join(f"{v:,.0f} ({v / r:.2f}x)" for v, r in zip(
            values, last, strict=True)) + " |")


def article_ratio() -> dict:
    """Tokens per item of a single-item call vs a 20-item batch on the article's shapes."""
    items = make_items(20, seed=3)
    packer = Packer(TASK, reply_slack_tokens=0)
    reply_per_item = text_tokens('{"id":100000,"c":"A"},')
    single = chat_prompt_tokens(packer.messages(items[:1])) + reply_per_item + 1
    batch = chat_prompt_tokens(packer.messages(items)) + 1 + 20 * reply_per_item
    return {"system_tokens": text_tokens(SYSTEM), "item_tokens": text_tokens(items[0].text),
            "single_tokens_per_item": single, "batch_tokens_per_item": batch / 20,
            "ratio": single / (batch / 20)}


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for k in keys:
            v = row[k]
            if k.endswith("_usd"):
                cells.append(f"{v:.3e}")
                continue
            cells.append(f"{v:,.4f}" if isinstance(v, float) and abs(v) < 10 else
                         f"{v:,.0f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter run (~20 s)")
    parser.add_argument("--minutes", type=float, default=4.2, help="virtual minutes per arm")
    parser.add_argument("--time-scale", type=float, default=12.0)
    parser.add_argument("--cpu-only", action="store_true",
                        help="only the client CPU per request (~10 s)")
    parser.add_argument("--strategy", choices=STRATEGIES, action="append",
                        help="CPU: this strategy only (repeatable; default both)")
    parser.add_argument("--requests", type=int, default=3000, help="CPU: requests per run")
    parser.add_argument("--rate", type=float, default=1000.0,
                        help="CPU: requests per second the in-process provider is paced to")
    parser.add_argument("--unpaced", action="store_true",
                        help="CPU: answer at once (same calls in flight; see --instructions)")
    parser.add_argument("--default-gc", action="store_true",
                        help="CPU: the interpreter's GC settings, not ratelab job's")
    parser.add_argument("--event-hook", action="store_true",
                        help="CPU: with an event hook taking every event (as under Locust)")
    parser.add_argument("--json", action="store_true", help="CPU: print JSON rows")
    parser.add_argument("--preflight-only", action="store_true",
                        help="CPU: stop before the first request (see --instructions)")
    parser.add_argument("--against", type=Path, metavar="DIR", nargs="+",
                        help="CPU: also measure the checkouts in DIR..., side by side "
                        "(ratios to the last)")
    parser.add_argument("--rounds", type=int, default=5, help="CPU: rounds with --against")
    parser.add_argument("--instructions", action="store_true",
                        help="CPU: instructions per request under callgrind (slow: minutes)")
    parser.add_argument("--lengths", type=int, nargs=2, default=(200, 600),
                        metavar=("N1", "N2"), help="CPU: the two run lengths (requests) "
                        "that --instructions differences")
    args = parser.parse_args()
    strategies = tuple(args.strategy or STRATEGIES)
    tune_gc = not args.default_gc
    extra = ([] if tune_gc else ["--default-gc"]) + (["--event-hook"] if args.event_hook else [])
    if args.cpu_only:
        trees = {f"this ({TREE.name})": TREE}
        for other in args.against or []:
            trees[f"{other.resolve().name}"] = other.resolve()
        if args.instructions or args.against is not None:
            print(f"# client CPU: {', '.join(f'{k} = {v}' for k, v in trees.items())}")
        if args.instructions:
            instructions(trees, (args.lengths[0], args.lengths[1]), args.rate, strategies,
                         extra)
        elif args.against is not None:
            compare_cpu(trees, args.rounds, args.requests, args.rate, strategies, extra)
        elif args.preflight_only:
            for strategy in strategies:
                cpu_per_request(args.requests, args.rate, strategy, preflight_only=True,
                                paced=not args.unpaced, tune_gc=tune_gc,
                                event_hook=args.event_hook)
        elif args.json:
            print(json.dumps([cpu_per_request(args.requests, args.rate, s,
                                              paced=not args.unpaced, tune_gc=tune_gc,
                                              event_hook=args.event_hook)
                              for s in strategies]))
        else:
            print(cpu_table(args.requests, args.rate, strategies, tune_gc,
                            (True,) if args.event_hook else (False, True)))
        return
    minutes = 2.2 if args.quick else args.minutes
    items = make_items(int(4000 * minutes) + 2000)
    print(f"# bench_client: TPM {TPM:,}, {minutes:g} virtual min per arm, "
          f"time_scale {args.time_scale:g}, {len(items):,} items of 15 tokens, "
          f"700-token system prompt\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in ARMS:
            rows.append(asyncio.run(run_arm(arm, items, minutes * 60.0, args.time_scale,
                                            Path(tmp))))
    print(table(rows, ["arm", "done", "requests", "429s", "items_per_min", "tokens_per_min",
                       "steady_items_per_min", "bound_items_per_min", "efficiency",
                       "cost_per_item_usd", "tokens_per_item"]))
    batch = next(r for r in rows if r["arm"] == "semantic_batch")
    print(f"\nsemantic_batch steady state (after the first virtual minute): "
          f"{100 * batch['efficiency']:.1f}% of the TPM bound, "
          f"{100 * batch['429_rate']:.2f}% 429s (targets >= 97%, < 0.5%)")
    print("\n" + cpu_table())
    ratio = article_ratio()
    print(f"\narticle shapes: {ratio['single_tokens_per_item']} tokens/item single vs "
          f"{ratio['batch_tokens_per_item']:.1f} batched: {ratio['ratio']:.1f}x fewer "
          f"(measured in the runs: single {rows[1]['tokens_per_item']:.0f}, "
          f"semantic_batch {batch['tokens_per_item']:.1f})")


if __name__ == "__main__":
    main()
