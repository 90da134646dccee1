"""Locust users of a gateway scenario: callers that enqueue tasks and poll or subscribe for
their results, and the background job.

Imported by ``loadtests/locustfile.py`` when the scenario has a ``gateway:`` section. Each
closed user group becomes a ``FastHttpUser`` class: a visit fires ``tasks_per_visit`` chat
tasks (``POST /v1/tasks``, lane ``interactive``) as user ``u<n>``, then waits for every
accepted one to be final, as the user's result mode says (``results``): ``poll`` reads
``GET /v1/tasks/{id}`` every ``poll_s``; ``subscribe`` opens ``GET /v1/tasks/{id}/events``
(SSE) for each task at once and takes the final ``state`` event (a stream that breaks falls
back to polling). Then it thinks. With several gateways (Redis) a user's requests alternate
between them; a subscription goes to the gateway that accepted the task. The background job
(one greenlet per run, claimed in the slot file) submits the workload's items as item tasks
on the background lane at its rate.

Each task's life is one JSON line in ``gateway-<pid>.jsonl`` (read by ``gateway_figures``);
the users' outcomes are also recorder events (``events-gw-<pid>.jsonl``) so the arm's
figures in summary.json count accepted tasks and refusals. Times are virtual seconds of the
run clock, except ``enqueue_ms`` (wall milliseconds of the HTTP round trip).
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
from locust import User, constant
from locust.contrib.fasthttp import FastHttpSession, FastHttpUser
from locust.env import Environment

from loadtests.recorder import Event
from loadtests.run_setup import arm_model, slot_items
from loadtests.rundir import SLOTS_FILE, EventLog, RunSpec, SlotClaims
from loadtests.scenario_gateway import GATEWAY_FILE, GatewaySection, result_mode_for, tier_for
from loadtests.scenario_model import Scenario, UserGroup
from loadtests.workload import chat_sizes, chat_text

FINAL = frozenset({"done", "failed", "dead_lettered"})
JOB_SLOT = "gateway-job"


def gateway_urls(run_dir: str | Path) -> list[str]:
    """The gateway base URLs the parent wrote into the run folder (``gateway.json``)."""
    data = json.loads((Path(run_dir) / GATEWAY_FILE).read_text(encoding="utf-8"))
    return [str(u) for u in data["urls"]]


class TaskLog:
    """This process's task lines (``gateway-<pid>.jsonl``) and recorder events."""

    def __init__(self, run_dir: str | Path) -> None:
        pid = os.getpid()
        self._fh = (Path(run_dir) / f"gateway-{pid}.jsonl").open("a", encoding="utf-8")
        self.events = EventLog(Path(run_dir) / f"events-gw-{pid}.jsonl")

    def task(self, record: dict[str, Any]) -> None:
        """Append one task's life (refused, or accepted and later final or unfinished)."""
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        """Push both logs to disk."""
        if not self._fh.closed:
            self._fh.flush()
        self.events.flush()

    def close(self) -> None:
        """Flush and close."""
        if not self._fh.closed:
            self._fh.close()
        self.events.close()


class Context:
    """What the users of one Locust process share: scenario, spec, gateways, logs."""

    def __init__(self, scenario: Scenario, spec: RunSpec) -> None:
        if not isinstance(scenario.gateway, GatewaySection):
            raise ValueError(f"{scenario.path}: the scenario has no gateway section")
        self.scenario = scenario
        self.spec = spec
        self.section: GatewaySection = scenario.gateway
        self.urls = gateway_urls(spec.run_dir)
        self.k = scenario.time_scale
        self._log: TaskLog | None = None
        self._pid: int | None = None

    @property
    def log(self) -> TaskLog:
        """This process's task log, opened after Locust forked its workers."""
        if self._log is None or self._pid != os.getpid():
            self._log = TaskLog(self.spec.run_dir)
            self._pid = os.getpid()
        return self._log

    def now(self) -> float:
        """Virtual seconds of the run clock."""
        return self.spec.virtual_now()

    def close(self) -> None:
        """Flush and close this process's logs."""
        if self._log is not None and self._pid == os.getpid():
            self._log.close()


def _enqueue(client: FastHttpSession, url: str, body: dict[str, Any], ctx: Context,
             base: dict[str, Any]) -> dict[str, Any]:
    """POST one task; its record so far (status, id or refusal, times)."""
    t_send = ctx.now()
    wall = time.perf_counter()
    with client.post(f"{url}/v1/tasks", json=body, name="enqueue",
                     catch_response=True) as resp:
        enqueue_ms = (time.perf_counter() - wall) * 1000.0
        rec = {**base, "t_send": round(t_send, 6), "t_recv": round(ctx.now(), 6),
               "enqueue_ms": round(enqueue_ms, 3), "status": resp.status_code, "gw": url}
        try:
            data = resp.json()
        except ValueError:
            data = {}
        if resp.status_code == 202:
            rec["id"] = data.get("id")
            resp.success()
        elif resp.status_code == 429:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            rec["limit"] = err.get("limit")
            rec["tier"] = err.get("tier", base.get("tier"))
            resp.failure(f"429 user limit {rec['limit']} (tier {rec['tier']})")
        else:
            resp.failure(f"HTTP {resp.status_code}")
    return rec


def _poll(client: FastHttpSession, url: str, task_id: str) -> str | None:
    """The task's state (None when the gateway did not answer)."""
    with client.get(f"{url}/v1/tasks/{task_id}", name="poll", catch_response=True) as resp:
        if resp.status_code != 200:
            resp.failure(f"HTTP {resp.status_code}")
            return None
        resp.success()
        return str(resp.json().get("state"))


def _subscribe(client: FastHttpSession, url: str, task_id: str, ctx: Context
               ) -> tuple[str | None, float | None]:
    """Follow the task's SSE stream: its final state and the virtual instant that event
    arrived, or (None, None) when the stream failed before it."""
    with client.get(f"{url}/v1/tasks/{task_id}/events", name="subscribe", stream=True,
                    catch_response=True) as resp:
        if resp.status_code != 200:
            resp.failure(f"HTTP {resp.status_code}")
            return None, None
        kind = ""
        final: tuple[str, float] | None = None
        try:
            # read to the end of the body (``event: end`` follows the final state at once)
            # so the connection goes back to the user's pool
            for line in _lines(resp):
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:") and kind == "state" and final is None:
                    state = str(json.loads(line[5:]).get("state"))
                    if state in FINAL:
                        final = (state, ctx.now())
        except (OSError, ValueError) as exc:
            if final is None:
                resp.failure(f"stream broke: {exc}")
                return None, None
        if final is None:
            resp.failure("stream ended before a final state")
            return None, None
        resp.success()
        return final


def _lines(resp: Any) -> Iterator[str]:
    """The SSE lines as they arrive. ``iter_content(n)`` of a FastResponse waits for ``n``
    bytes or the end of the body, so it would hold every event until the stream closes;
    geventhttpclient's response (``_response``) reads a line as soon as it is complete."""
    raw = getattr(resp, "_response", None)
    if raw is None or not hasattr(raw, "readline"):
        yield from (line for chunk in resp.iter_content(chunk_size=None)
                    for line in str(chunk).splitlines())
        return
    while True:
        line = raw.readline(b"\n")
        if not line:
            return
        yield line.decode("utf-8", "replace").rstrip("\r\n")


def _final(rec: dict[str, Any], state: str, t_final: float, ctx: Context, arm: str) -> None:
    """Log a task that reached its final state."""
    rec["state"] = state
    rec["t_final"] = round(t_final, 6)
    ctx.log.task(rec)
    ctx.log.events.event(Event(
        t=rec["t_final"], kind="request", arm=arm,
        outcome="ok" if state == "done" else "error",
        status=200 if state == "done" else 500,
        latency_s=rec["t_final"] - rec["t_send"]))


def caller_class(group: UserGroup, ctx: Context, counter: itertools.count[int],
                 module: str) -> type[User]:
    """The ``FastHttpUser`` class of a closed user group against the gateway(s)."""
    scenario, section = ctx.scenario, ctx.section
    model = arm_model(scenario, scenario.arm(group.arm))
    peak = max((s.users or 0 for s in group.stages), default=1)

    def on_start(self: Any) -> None:
        n = next(counter)
        index = (os.getpid() * 7919 + n) % group.user_ids if ctx.spec.slots > 1 else (
            n % group.user_ids)
        self.uid = f"u{index}"
        self.tier = tier_for(index, section.user_tiers)
        self.mode = result_mode_for(index, section.results)
        self.rng = random.Random(scenario.seed * 1_000_003 + n)
        self.sent = 0

    def visit(self: Any) -> None:
        log = ctx.log
        pending: list[dict[str, Any]] = []
        streams: list[gevent.Greenlet] = []
        for _ in range(section.tasks_per_visit):
            prompt, max_tokens = chat_sizes(scenario, group, self.rng)
            text = chat_text(prompt)
            body = {"model": model, "messages": [{"role": "user", "content": text}],
                    "max_tokens": max_tokens, "user": self.uid, "lane": "interactive"}
            url = ctx.urls[self.sent % len(ctx.urls)]
            self.sent += 1
            rec = _enqueue(self.client, url, body, ctx,
                           {"user": self.uid, "tier": self.tier, "lane": "interactive",
                            "results": self.mode})
            if rec["status"] == 202 and rec.get("id"):
                pending.append(rec)
                if self.mode == "subscribe":   # follow it at once, while sending the next
                    streams.append(gevent.spawn(_subscribe, self.client, rec["gw"],
                                                rec["id"], ctx))
            else:
                log.task(rec)
                outcome = "http_429" if rec["status"] == 429 else "error"
                log.events.event(Event(t=rec["t_recv"], kind="request", arm=group.arm,
                                       outcome=outcome, status=rec["status"],
                                       latency_s=rec["t_recv"] - rec["t_send"]))
        if streams:
            # one stream per task, all open at once (the user's connection pool holds them)
            gevent.joinall(streams)
            for rec, stream in zip(list(pending), streams, strict=True):
                state, t_final = stream.value if stream.successful() else (None, None)
                if state is not None and t_final is not None:
                    _final(rec, state, t_final, ctx, group.arm)
                    pending.remove(rec)
                else:
                    rec["fallback"] = "poll"
        while pending:
            gevent.sleep(section.poll_s / ctx.k)
            for rec in list(pending):
                state = _poll(self.client, ctx.urls[self.sent % len(ctx.urls)], rec["id"])
                self.sent += 1
                if state in FINAL:
                    _final(rec, state, ctx.now(), ctx, group.arm)
                    pending.remove(rec)

    def on_stop(self: Any) -> None:
        ctx.log.flush()

    return type(f"Gateway_{group.name}", (FastHttpUser,), {
        "weight": max(1, peak),
        "host": ctx.urls[0],
        "wait_time": constant(group.think_s / ctx.k),
        # a subscriber holds one connection per task of its visit, besides its requests
        "concurrency": max(10, section.tasks_per_visit + 2),
        "tasks": [visit],
        "on_start": on_start,
        "on_stop": on_stop,
        "__module__": module,
    })


def run_job(environment: Environment, ctx: Context) -> None:
    """The background job: claim the run's one job slot, then submit every item as an item
    task (lane ``background``) at ``rate_per_s`` virtual; each accepted task is logged."""
    job = ctx.section.background
    if job is None:
        return
    claims = SlotClaims(Path(ctx.spec.run_dir) / SLOTS_FILE)
    try:
        if claims.claim(JOB_SLOT, 1) is None:
            return
        client = FastHttpSession(ctx.urls[0], request_event=environment.events.request,
                                 user=None)
        items = slot_items(ctx.scenario, 0, 1, job.items)
        tier = job.tier or str(ctx.section.config.get("default_tier", ""))
        for i, item in enumerate(items):
            _sleep_until(ctx, i / job.rate_per_s)
            if ctx.now() >= ctx.scenario.duration_s:
                break
            url = ctx.urls[i % len(ctx.urls)]
            body = {"user": job.user, "lane": "background",
                    "item": {"id": item.id, "text": item.text}}
            rec = _enqueue(client, url, body, ctx,
                           {"user": job.user, "tier": tier, "lane": "background",
                            "item": item.id})
            ctx.log.task(rec)
        ctx.log.flush()
        claims.finish(JOB_SLOT, 0)
    finally:
        claims.close()


def _sleep_until(ctx: Context, t: float) -> None:
    wall = (t - ctx.now()) / ctx.k
    if wall > 0:
        gevent.sleep(wall)


def install(scenario: Scenario, spec: RunSpec, module: str,
            on_test_start: Callable[[Callable[..., None]], Any],
            on_quitting: Callable[[Callable[..., None]], Any]) -> dict[str, type[User]]:
    """The user classes of a gateway scenario (bind them in the locustfile's namespace); the
    job starts at test start and the logs close when Locust quits."""
    ctx = Context(scenario, spec)
    counter = itertools.count()
    classes = {}
    for group in scenario.load.users:
        if group.mode != "closed":
            raise ValueError(f"{scenario.path}: load.users.{group.name}: a gateway scenario "
                             "drives closed user groups only")
        cls = caller_class(group, ctx, counter, module)
        classes[cls.__name__] = cls

    def start(environment: Environment, **_kw: Any) -> None:
        from locust.runners import MasterRunner

        if not isinstance(environment.runner, MasterRunner):
            gevent.spawn(run_job, environment, ctx)

    def quit_(environment: Environment, **_kw: Any) -> None:
        ctx.close()

    on_test_start(start)
    on_quitting(quit_)
    return classes
