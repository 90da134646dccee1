"""The client against the real simulator on an ephemeral loopback port (compressed time)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from batchclient import (
    EXIT_BALANCE,
    AiohttpTransport,
    Event,
    InputError,
    Item,
    Runner,
    SqliteJobStore,
    Task,
    parse_client_config,
)
from batchclient.config import BatchSettings
from batchclient.policy.packing import definition_tokens, response_format
from simulator.model.config import parse_config
from simulator.model.responder import expected_code
from simulator.server import serve_in_thread

CODES = list("ABCDEFGH")
LABELS = {c: f"label {c}" for c in CODES}
REPO = Path(__file__).resolve().parents[2]


def text_of(i: int) -> str:
    return f"item {i} street name {i * 7919 % 1000} city"


def make_items(n: int) -> list[Item]:
    return [Item(str(1000 + i), text_of(i)) for i in range(n)]


def provider(name: str = "main", *, tpm: int = 2_000_000, rpm: int = 100_000,
             responder: dict | None = None, **extra: object) -> dict:
    p: dict[str, object] = {
        "name": name,
        "models": {"m1": {"input_usd_per_mtok": 0.15, "output_usd_per_mtok": 0.60}},
        "limits": {"tpm": tpm, "rpm": rpm, "counting": "reserve"},
        "keys": {"sk-ratelab": {}},
        "latency": {"ttft_s": 0.4, "itl_s": 0.01},
        "responder": {"kind": "batch_json", **(responder or {})},
    }
    p.update(extra)
    return p


def sim(*providers: dict, time_scale: float = 100.0, seed: int = 7):  # type: ignore[no-untyped-def]
    return parse_config({"time_scale": time_scale, "seed": seed, "providers": list(providers)},
                        "test")


def client(server, names: list[str], time_scale: float = 100.0, **extra: object):  # type: ignore[no-untyped-def]
    data: dict[str, object] = {
        "time_scale": time_scale,
        "providers": [{"name": n, "base_url": server.base_url(n), "api_key": "sk-ratelab"}
                      for n in names],
    }
    data.update(extra)
    return parse_client_config(data, "test")


TASK = Task("classify", "You classify addresses. " * 20, LABELS, "m1")


async def run_job(tmp_path: Path, cfg, items: list[Item], events: list[Event] | None = None,  # type: ignore[no-untyped-def]
                  name: str = "job.sqlite"):
    store = SqliteJobStore(str(tmp_path / name))
    store.import_items(items)
    transport = AiohttpTransport(cfg.providers, cfg.stream)
    try:
        result = await Runner(TASK, cfg, transport, store,
                              on_event=None if events is None else events.append).run()
    finally:
        await transport.close()
    return result, store


def admin(server, provider: str, action: str = "stats", body: dict | None = None) -> dict:  # type: ignore[no-untyped-def]
    req = urllib.request.Request(
        f"{server.url}/admin/{provider}/{action}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": "Bearer ratelab-admin", "Content-Type": "application/json"},
        method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def assert_all_correct(store: SqliteJobStore, items: list[Item]) -> None:
    results = store.results()
    assert len(results) == len(items)
    wrong = [i.id for i in items
             if results[i.id][:2] != ("done", expected_code(i.text, CODES))]
    assert wrong == []


@pytest.mark.parametrize("fault", ["drop_item_rate", "invent_id_rate", "repeat_id_rate",
                                   "malformed_json_rate", "truncate_rate"])
async def test_every_batch_json_fault_yields_zero_misattributed(
        tmp_path: Path, fault: str) -> None:
    rate = 0.1 if fault == "drop_item_rate" else 0.25
    with serve_in_thread(sim(provider(responder={fault: rate}))) as server:
        items = make_items(400)
        result, store = await run_job(tmp_path, client(server, ["main"]), items)
        assert (result.exit_status, result.done, result.dead) == (0, 400, 0)
        assert_all_correct(store, items)
        assert result.requests > 20  # the faults forced re-sends


async def test_json_mode_replies_are_read_whole_and_cost_their_wrapper(tmp_path: Path) -> None:
    # response_format json_object: the simulator wraps the array as {"results": [...]}
    items = make_items(400)
    with serve_in_thread(sim(provider())) as server:
        plain, plain_store = await run_job(tmp_path, client(server, ["main"]), items,
                                           name="plain.sqlite")
        wrapped, store = await run_job(
            tmp_path, client(server, ["main"], batch={"json_mode": True}), items)
        grown, grown_store = await run_job(
            tmp_path, client(server, ["main"], batch={"json_mode": True, "adaptive": True}),
            items, name="adaptive.sqlite")
    for result, kept in ((plain, plain_store), (wrapped, store), (grown, grown_store)):
        assert (result.exit_status, result.done, result.dead) == (0, 400, 0)
        assert_all_correct(kept, items)
    assert plain.requests == wrapped.requests == 20
    # '{"results":' and '}' are 12 characters: 3 tokens more a reply, and nothing resent
    assert wrapped.tokens_out - plain.tokens_out == 3 * 20
    # whole replies keep or grow an adaptive batch (one read as malformed halved it)
    assert grown.requests <= 20


async def test_json_schema_replies_carry_every_code_and_bill_the_schema(
        tmp_path: Path) -> None:
    # response_format json_schema (strict, codes an enum of the taxonomy): the simulator
    # fills the schema's answer objects with the items' codes, and bills the schema's text
    items = make_items(400)
    with serve_in_thread(sim(provider(), provider("faulty", responder={
            "drop_item_rate": 0.1, "repeat_id_rate": 0.25, "invent_id_rate": 0.25}))) as server:
        plain, _ = await run_job(tmp_path, client(server, ["main"]), items,
                                 name="plain.sqlite")
        held, store = await run_job(
            tmp_path, client(server, ["main"], batch={"json_schema": True}), items)
        faulty, faulty_store = await run_job(
            tmp_path, client(server, ["faulty"], batch={"json_schema": True}), items,
            name="faulty.sqlite")
    for result, kept in ((held, store), (faulty, faulty_store)):
        assert (result.exit_status, result.done, result.dead) == (0, 400, 0)
        assert_all_correct(kept, items)
    assert plain.requests == held.requests == 20 and faulty.requests > 20
    schema = definition_tokens(response_format(TASK, BatchSettings(json_schema=True)))
    assert schema > 50
    # each request's prompt is the plain one plus the schema's text, as the client
    # estimated it; each reply the plain array in its object ('{"results":' and '}')
    assert held.tokens_in - plain.tokens_in == schema * 20
    assert held.tokens_out - plain.tokens_out == 3 * 20


async def test_a_bare_client_learns_split_input_and_output_limits_from_headers(
        tmp_path: Path) -> None:
    # an Anthropic-like key (token bucket, input and output limits, anthropic headers) and
    # a client told none of its limits: it learns them from its first replies' headers and
    # keeps 429s under half a percent (it sent 349 429s in 949 requests when it could not)
    scale = 60.0
    split = provider(headers="anthropic", count_refused=False, limits={
        "algorithm": "token_bucket", "rpm": 100_000, "input_tpm": 60_000,
        "output_tpm": 12_000, "counting": "actual"})
    with serve_in_thread(sim(split, time_scale=scale)) as server:
        cfg = client(server, ["main"], time_scale=scale, concurrency={"limit": 8})
        items = make_items(12000)
        result, store = await run_job(tmp_path, cfg, items)
    assert (result.exit_status, result.done) == (0, 12000)
    assert_all_correct(store, items)
    assert result.rate_limited <= 0.005 * result.requests
    # the output limit binds (about 110 reply tokens a request), and the job runs on it
    output_per_min = 60.0 * result.tokens_out / result.elapsed_s
    assert 0.8 * 12_000 < output_per_min <= 12_000 * 1.05


async def test_a_per_request_cost_cap_halves_the_batch_until_it_fits(tmp_path: Path) -> None:
    # 20-item requests would cost more than the cap at worst (prompt + max_tokens), 5-item
    # ones less: the refused batches halve (20, 10, 5) and every item is answered, none
    # dead-lettered for a fault of the batch's size
    items = make_items(400)
    capped = provider(billing={"cost_cap_usd": 0.00006})
    with serve_in_thread(sim(capped)) as server:
        result, store = await run_job(tmp_path, client(server, ["main"]), items)
        statuses = admin(server, "main")["keys"]["sk-ratelab"]["models"]["m1"]["requests"]
        refused = statuses.get("400", 0)
    assert (result.exit_status, result.done, result.dead) == (0, 400, 0)
    assert_all_correct(store, items)
    # answered in 5-item batches (a few fewer where refused items came back to a short queue)
    assert refused > 0 and 400 // 5 <= result.requests - refused <= 90


async def test_poison_items_are_dead_lettered_and_counts_add_up(tmp_path: Path) -> None:
    with serve_in_thread(sim(provider())) as server:
        items = [*make_items(60), Item("poison-1", "POISON do not answer")]
        result, store = await run_job(tmp_path, client(server, ["main"]), items)
        assert (result.exit_status, result.done, result.dead, result.pending) == (0, 60, 1, 0)
        assert store.results()["poison-1"][0] == "dead"


async def test_a_provider_that_never_answers_in_json_is_not_paid_forever(
        tmp_path: Path) -> None:
    # The simulator's default responder writes prose: every reply is paid for and answers
    # no item. Each pass counts a miss, so the items are dead-lettered after max_misses.
    with serve_in_thread(sim(provider(responder={"kind": "lorem"}))) as server:
        items = make_items(3)
        result, store = await run_job(tmp_path, client(server, ["main"]), items)
        assert (result.exit_status, result.done, result.dead, result.pending) == (0, 0, 3, 0)
        assert result.requests == 5  # one batch of 3 per pass, max_misses passes
        billed = admin(server, "main")["keys"]["sk-ratelab"]["models"]["m1"]["requests"]
        assert billed == {"200": 5}
        assert {state for state, _, _ in store.results().values()} == {"dead"}


async def test_a_job_whose_replies_answer_nothing_stops_with_status_5(tmp_path: Path) -> None:
    # 200 items against prose: the 10th reply in a row that answers no item stops dispatch;
    # the requests then in flight finish, every item stays pending, nothing more is paid
    with serve_in_thread(sim(provider(responder={"kind": "lorem"}))) as server:
        cfg = client(server, ["main"], concurrency={"limit": 4})
        result, store = await run_job(tmp_path, cfg, make_items(200))
        assert (result.exit_status, result.done, result.dead, result.pending) == (5, 0, 0, 200)
        assert result.reason.startswith("the last 1") and "replies answered no item" in (
            result.reason)
        assert 10 <= result.requests <= 13
        billed = admin(server, "main")["keys"]["sk-ratelab"]["models"]["m1"]["requests"]
        assert billed == {"200": result.requests}
        assert store.counts().pending == 200


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "loadtests.cli", "job", *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _files(tmp_path: Path, n: int) -> tuple[list[Item], Path, Path]:
    items = make_items(n)
    items_path = tmp_path / "items.jsonl"
    items_path.write_text("".join(json.dumps({"id": i.id, "text": i.text}) + "\n"
                                  for i in items))
    task_path = tmp_path / "task.yaml"
    task_path.write_text(yaml.safe_dump({"name": "classify", "system_prompt": TASK.system_prompt,
                                         "labels": LABELS, "model": "m1"}))
    return items, items_path, task_path


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "SIM_KEY": "sk-ratelab"}


def _done(db: Path) -> int:
    if not db.exists():
        return 0
    store = SqliteJobStore(str(db))
    try:
        return store.counts().done
    finally:
        store.close()


def test_sigkill_at_five_points_then_resume_completes_each_item_once(tmp_path: Path) -> None:
    scale = 20.0
    items, items_path, task_path = _files(tmp_path, 1200)
    db = tmp_path / "job.sqlite"
    rng = random.Random(5)
    slow = provider(latency={"ttft_s": 2.0, "itl_s": 0.0})
    with serve_in_thread(sim(slow, time_scale=scale)) as server:
        args = [str(items_path), "--task", str(task_path), "--db", str(db), "--base-url",
                server.base_url(), "--api-key-env", "SIM_KEY", "--time-scale", str(scale),
                "--concurrency", "4", "--no-progress"]
        kills = 0
        for _ in range(5):
            before = _done(db)
            proc = _cli(args, _env())
            deadline = time.monotonic() + 20
            while _done(db) <= before and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.08))  # a random point of the next batches
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
        assert kills == 5
        done_before = _done(db)
        assert 0 < done_before < len(items)
        final = _cli(args, _env())
        _, err = final.communicate(timeout=60)
        assert final.returncode == 0, err.decode()
        stats = admin(server, "main")["keys"]["sk-ratelab"]["models"]["m1"]
    store = SqliteJobStore(str(db))
    assert_all_correct(store, items)
    billed = stats["requests"]["200"]
    needed = len(items) // 20
    # Only the batches in flight at each kill (at most --concurrency) were paid twice.
    assert needed <= billed <= needed + kills * 4


def test_402_mid_job_stops_with_status_3_then_topup_and_resume(tmp_path: Path) -> None:
    items, items_path, task_path = _files(tmp_path, 600)
    db = tmp_path / "job.sqlite"
    # ~720 tokens a batch of 20 at $0.15/M: 30 batches cost ~ $0.0033; give half of that.
    prof = provider(billing={"balance_usd": 0.0016, "charge_headers": True})
    with serve_in_thread(sim(prof)) as server:
        args = [str(items_path), "--task", str(task_path), "--db", str(db), "--base-url",
                server.base_url(), "--api-key-env", "SIM_KEY", "--time-scale", "100",
                "--no-progress", "--json"]
        first = _cli(args, _env())
        out, err = first.communicate(timeout=60)
        assert first.returncode == EXIT_BALANCE, err.decode()
        summary = json.loads(out.decode().strip().splitlines()[-1])
        assert summary["done"] + summary["pending"] == 600 and 0 < summary["done"] < 600
        assert summary["elapsed_s"] == round(summary["elapsed_s"], 3)
        admin(server, "main", "topup", {"key": "sk-ratelab", "usd": 1.0})
        # with progress, into a pipe (a log file): whole lines, not a line redrawn by "\r"
        second = _cli([a for a in args if a != "--no-progress"], _env())
        out, err = second.communicate(timeout=60)
        assert second.returncode == 0, err.decode()
    progress = err.decode().splitlines()
    assert "\r" not in err.decode() and progress and all(
        line.startswith("[") and " done " in line for line in progress)
    before = summary["done"]  # the first run's, counted apart from the second's rate
    assert progress[-1].startswith(f"[{'#' * 20}] 600/600 done 0 dead ({before:,} before) |")
    assert_all_correct(SqliteJobStore(str(db)), items)


async def test_primary_outage_moves_work_to_fallback_and_back(tmp_path: Path) -> None:
    primary = provider("primary", faults={"outages": [{"start_s": 0, "end_s": 40,
                                                       "status": 503}]})
    fallback = provider("fallback")
    with serve_in_thread(sim(primary, fallback, time_scale=50.0)) as server:
        cfg = client(server, ["primary", "fallback"], time_scale=50.0,
                     breaker={"failures": 3, "cooldown_s": 15},
                     retry={"base_s": 0.5, "cap_s": 2}, concurrency={"limit": 2})
        events: list[Event] = []
        # Items arrive slowly enough for the job to outlive the outage: ~2 per virtual s.
        items = make_items(2400)
        result, store = await run_job(tmp_path, cfg, items, events)
    assert (result.exit_status, result.done) == (0, 2400)
    assert_all_correct(store, items)
    served = [(e.at, e.provider, e.status) for e in events if e.kind == "request"]
    to_fallback = [e for e in served if e[1] == "fallback" and e[2] == 200]
    back_on_primary = [e for e in served if e[1] == "primary" and e[2] == 200]
    assert to_fallback, "work never moved to the fallback"
    assert back_on_primary, "work never came back to the primary"
    assert min(t for t, _, _ in back_on_primary) > min(t for t, _, _ in to_fallback)


async def test_failover_to_a_fallback_that_serves_another_model(tmp_path: Path) -> None:
    # seed 003's "fallback: a different model": the fallback serves only m2, and the
    # client asks it for m2 whatever the task's model; the primary's outage moves the work
    # there and the answers (and their cost, by model) come back from m2
    primary = provider("primary", faults={"outages": [{"start_s": 0, "end_s": 20,
                                                       "status": 503}]})
    fallback = provider("fallback", models={"m2": {"input_usd_per_mtok": 0.05,
                                                   "output_usd_per_mtok": 0.2}})
    with serve_in_thread(sim(primary, fallback, time_scale=50.0)) as server:
        cfg = parse_client_config({
            "time_scale": 50.0, "breaker": {"failures": 3, "cooldown_s": 15},
            "retry": {"base_s": 0.5, "cap_s": 2}, "concurrency": {"limit": 2},
            "providers": [
                {"name": "primary", "base_url": server.base_url("primary"),
                 "api_key": "sk-ratelab"},
                {"name": "fallback", "base_url": server.base_url("fallback"),
                 "api_key": "sk-ratelab", "model": "m2"}]}, "test")
        events: list[Event] = []
        items = make_items(1200)
        result, store = await run_job(tmp_path, cfg, items, events)
    assert (result.exit_status, result.done) == (0, 1200)
    assert_all_correct(store, items)
    answered = {(e.provider, e.model) for e in events if e.kind == "request" and e.status == 200}
    assert answered == {("primary", "m1"), ("fallback", "m2")}
    # a fallback asked for a model it does not serve is refused before any request
    with serve_in_thread(sim(primary, fallback, time_scale=50.0)) as server:
        wrong = parse_client_config({"providers": [
            {"name": "fallback", "base_url": server.base_url("fallback"),
             "api_key": "sk-ratelab", "model": "m3"}]}, "test")
        with pytest.raises(InputError, match=r"providers\.fallback\.model: model 'm3' is not "
                                             r"served by fallback"):
            await run_job(tmp_path, wrong, items, name="wrong.sqlite")


async def test_tpm_bound_job_keeps_429s_under_half_a_percent(tmp_path: Path) -> None:
    scale = 60.0
    with serve_in_thread(sim(provider(tpm=60_000), time_scale=scale)) as server:
        cfg = client(server, ["main"], time_scale=scale, concurrency={"limit": 8})
        items = make_items(3000)
        result, _store = await run_job(tmp_path, cfg, items)
    assert (result.exit_status, result.done) == (0, 3000)
    assert result.rate_limited <= 0.005 * result.requests
    # It ran against the limit, not far below it: >= 80% of 60k TPM over the run.
    tokens_per_min = 60.0 * (result.tokens_in + result.tokens_out) / result.elapsed_s
    assert tokens_per_min > 0.8 * 60_000


async def test_stream_watchdog_cancels_slow_first_tokens_and_loops(tmp_path: Path) -> None:
    faults = {"slow_first_token_rate": 0.2, "slow_first_token_s": 60,
              "repetition_rate": 0.2}
    with serve_in_thread(sim(provider(faults=faults, latency={"ttft_s": 0.5, "itl_s": 0.01}),
                             time_scale=50.0)) as server:
        cfg = client(server, ["main"], time_scale=50.0,
                     stream={"enabled": True, "first_token_s": 3, "loop_repeats": 4},
                     retry={"base_s": 0.2, "cap_s": 1})
        events: list[Event] = []
        items = make_items(300)
        result, store = await run_job(tmp_path, cfg, items, events)
    assert (result.exit_status, result.done) == (0, 300)
    assert_all_correct(store, items)
    errors = {e.error for e in events if e.kind == "request" and e.error}
    assert "watchdog_first_token" in errors and "watchdog_loop" in errors
    # Cancelled long before the 60 s slow first token would have arrived.
    assert result.elapsed_s < 60


async def test_money_style_openai_insufficient_quota_is_fatal(tmp_path: Path) -> None:
    prof = provider(billing={"balance_usd": 0.0005, "money_style": "openai"})
    with serve_in_thread(sim(prof)) as server:
        items = make_items(400)
        result, _ = await run_job(tmp_path, client(server, ["main"]), items)
    assert result.exit_status == EXIT_BALANCE
    assert result.done + result.pending == 400 and result.pending > 0


def test_cli_refuses_bad_input_with_status_2_before_any_request(tmp_path: Path) -> None:
    items, items_path, task_path = _files(tmp_path, 5)
    with items_path.open("a") as handle:
        handle.write(json.dumps({"id": "0001000", "text": "collides with 1000"}) + "\n")
    with serve_in_thread(sim(provider())) as server:
        base = ["--task", str(task_path), "--base-url", server.base_url(), "--api-key-env",
                "SIM_KEY", "--no-progress"]
        collide = _cli([str(items_path), "--db", str(tmp_path / "a.sqlite"), *base], _env())
        _, err = collide.communicate(timeout=30)
        assert collide.returncode == 2 and "'0001000'" in err.decode()
        items_path.write_text("".join(json.dumps({"id": i.id, "text": i.text}) + "\n"
                                      for i in items))
        bad_model = _cli([str(items_path), "--db", str(tmp_path / "b.sqlite"), *base,
                          "--model", "no-such-model"], _env())
        _, err = bad_model.communicate(timeout=30)
        assert bad_model.returncode == 2 and "no-such-model" in err.decode()
        stats = admin(server, "main")["keys"]["sk-ratelab"]["models"]
    assert stats == {} or all(not m["requests"] for m in stats.values())


async def test_the_transport_tells_an_unreachable_provider_from_one_that_answers(
        sim_server) -> None:  # type: ignore[no-untyped-def]
    sim = await sim_server()
    cfg = parse_client_config({"providers": [
        {"name": "live", "base_url": sim.base_url(), "api_key": "sk-ratelab"},
        {"name": "gone", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-ratelab"},
        {"name": "wrong_key", "base_url": sim.base_url(), "api_key": "sk-nobody"}]}, "test")
    transport = AiohttpTransport(cfg.providers, cfg.stream)
    try:
        assert await transport.unreachable("live") is None
        assert await transport.unreachable("wrong_key") is None  # a 401 is an answer
        why = await transport.unreachable("gone")
        assert why is not None and "127.0.0.1" in why
    finally:
        await transport.close()


async def test_a_providers_model_list_is_fetched_once() -> None:
    """The reachability check and the preflight's served models read one GET /models."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    hits: list[str] = []

    async def models(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"object": "list", "data": [{"id": "m1", "object": "model"}]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    cfg = parse_client_config({"providers": [
        {"name": "p", "base_url": f"http://127.0.0.1:{server.port}/v1", "api_key": "k"}]},
        "test")
    transport = AiohttpTransport(cfg.providers, cfg.stream)
    try:
        assert await transport.unreachable("p") is None
        assert await transport.list_models("p") == {"m1"}
        assert hits == ["/v1/models"]
    finally:
        await transport.close()
        await server.close()
