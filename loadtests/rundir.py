"""The run folder of ``ratelab run``: its name, the run spec, event logs and batch-slot claims.

Every Locust process appends neutral recorder events (``loadtests.recorder.Event``) as JSON
lines to its own ``events-<pid>.jsonl``; the parent reads them all back after Locust exits.
Batch-job users claim a *slot* of an arm atomically in ``slots.sqlite`` so that, however
Locust spreads users over worker processes, slot ``s`` of ``n`` processes items
``s, s+n, s+2n, ...`` and no item is processed twice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from loadtests.recorder import Event

SPEC_FILE = "run.json"
SLOTS_FILE = "slots.sqlite"
EVENTS_GLOB = "events-*.jsonl"
SPEC_ENV = "RATELAB_RUN_SPEC"
# Web UI runs: the master notes in the claims file that the swarm stopped, with 1.0 when the
# scenario's load was over (the shape ended) and 0.0 when the UI's Stop ended it early.
SWARM_END = "swarm_end"
_EVENT_FIELDS = tuple(f.name for f in dataclasses.fields(Event))


def default_run_dir(scenario: str, root: str | Path = "runs", now: datetime | None = None) -> Path:
    """``runs/<scenario>-<YYYYmmdd-HHMMSS>``, with a ``-2``, ``-3`` suffix if it exists."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d-%H%M%S")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", scenario) or "run"
    base = Path(root) / f"{safe}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class RunDirError(ValueError):
    """An ``--out`` folder a run cannot write to; the message names it and the way out."""


def prepare_run_dir(path: Path, overwrite: bool = False) -> None:
    """Make ``path`` the empty folder a run writes to (created with its parents).

    A folder that already holds files is refused: a run reads back every event log and
    store in its folder, so a new run there would report the old one's figures as its own
    (and a gate would pass them). With ``overwrite`` a run folder (one with a summary or a
    run spec) is emptied first; any other folder is never removed."""
    try:
        entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    except OSError as exc:
        raise RunDirError(f"--out {path}: cannot read the folder: {exc.strerror or exc}"
                          ) from exc
    if entries:
        markers = [name for name in ("summary.json", SPEC_FILE) if name in entries]
        is_run = bool(markers)
        if not overwrite:
            shown = (markers or entries)[:1]
            more = len(entries) - len(shown)
            listed = shown[0] + (f" and {more} other file{'s' * (more > 1)}" if more else "")
            raise RunDirError(
                f"--out {path}: the folder already holds {'a run' if is_run else 'files'} "
                f"({listed}); choose another folder"
                + (", or pass --overwrite to replace that run" if is_run else ""))
        if not is_run:
            raise RunDirError(f"--out {path}: --overwrite replaces only a run folder (one "
                              "with summary.json or run.json); this one is not: choose "
                              "another folder")
        try:
            shutil.rmtree(path)
        except OSError as exc:
            raise RunDirError(f"--out {path}: cannot remove the run there: "
                              f"{exc.strerror or exc}") from exc
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"--out {path}: cannot make the run folder: "
                          f"{exc.strerror or exc}") from exc


@dataclass(frozen=True, slots=True)
class RunSpec:
    """What every Locust process needs to know about the run, written once as ``run.json``.

    ``origin_monotonic`` is the shared zero of virtual time (``time.monotonic()`` is one clock
    for every process of this machine); ``provider_urls`` maps provider name to OpenAI
    ``base_url``. API keys are never stored: an external target's key is read from the
    environment variable ``target_key_env`` by each process.
    """

    scenario_path: str
    run_dir: str
    origin_monotonic: float
    time_scale: float
    provider_urls: Mapping[str, str]
    slots: int = 1
    duration_s: float | None = None
    items: int | None = None
    admin_url: str | None = None
    target_key_env: str | None = None
    headless: bool = True
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def write(self, path: str | Path) -> None:
        """Write the spec as JSON to ``path``."""
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @staticmethod
    def read(path: str | Path) -> RunSpec:
        """Read a spec written by ``write``."""
        data = json.loads(Path(path).read_text())
        return RunSpec(**data)

    def virtual_now(self) -> float:
        """Virtual seconds since the run's origin."""
        return (time.monotonic() - self.origin_monotonic) * self.time_scale


def started(spec: RunSpec, claims: SlotClaims) -> RunSpec:
    """``spec`` with virtual time starting when Locust first loaded the run (shared by every
    process through ``claims``), so Locust's start-up does not eat the first stage.

    With the web UI (``headless`` false) virtual time starts when the swarm starts
    (:func:`swarm_started`), which may be long after loading: until then the spec keeps the
    origin already claimed, if any.
    """
    if not spec.headless:
        origin = claims.get("origin")
        return spec if origin is None else dataclasses.replace(spec, origin_monotonic=origin)
    origin = claims.set_once("origin", time.monotonic())
    return dataclasses.replace(spec, origin_monotonic=origin)


def swarm_started(spec: RunSpec, claims: SlotClaims) -> RunSpec:
    """``spec`` with virtual time starting now, unless a process of the run has started it
    already (the web UI's Start: the master first, then each worker)."""
    origin = claims.set_once("origin", time.monotonic())
    return dataclasses.replace(spec, origin_monotonic=origin)


def os_lock() -> Any:
    """A lock between OS threads, also in a process gevent has monkey-patched (Locust's).

    There ``threading.Lock`` is gevent's, which cannot be shared by the hub's thread and the
    client's asyncio thread: a greenlet waiting on it while the asyncio thread held it was
    never woken, so the statistics stopped reaching Locust mid-run.
    """
    if "gevent.monkey" in sys.modules:
        from gevent.monkey import get_original

        return get_original("_thread", "allocate_lock")()
    return threading.Lock()


class EventLog:
    """Append-only JSONL of recorder events and job records; safe to call from any thread."""

    def __init__(self, path: str | Path, flush_every: int = 200) -> None:
        self.path = Path(path)
        self._fh: TextIO = self.path.open("a", encoding="utf-8")
        self._lock = os_lock()
        self._since_flush = 0
        self._flush_every = flush_every

    def event(self, event: Event) -> None:
        """Append one recorder event."""
        self._write({"type": "event", **dataclasses.asdict(event)})

    def record(self, kind: str, data: Mapping[str, Any]) -> None:
        """Append a non-event record (``job`` results, ``stop`` notes); always flushed."""
        self._write({"type": kind, **data}, flush=True)

    def _write(self, obj: Mapping[str, Any], flush: bool = False) -> None:
        line = json.dumps(obj, separators=(",", ":")) + "\n"
        with self._lock:
            if self._fh.closed:
                return
            self._fh.write(line)
            self._since_flush += 1
            if flush or self._since_flush >= self._flush_every:
                self._fh.flush()
                self._since_flush = 0

    def flush(self) -> None:
        """Push buffered lines to the file (readers tail it for the progress line)."""
        with self._lock:
            if not self._fh.closed:
                self._fh.flush()
                self._since_flush = 0

    def close(self) -> None:
        """Flush and close (idempotent)."""
        with self._lock:
            if not self._fh.closed:
                self._fh.close()


def event_from_json(obj: Mapping[str, Any]) -> Event:
    """The recorder Event of one ``type: event`` record (unknown keys ignored)."""
    return Event(**{k: obj[k] for k in _EVENT_FIELDS if k in obj})


def iter_records(run_dir: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every complete record of every event log, file by file in write order: (file, record).

    A last line cut short by a killed process is skipped, not fatal.
    """
    for path in sorted(Path(run_dir).glob(EVENTS_GLOB)):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.endswith("\n"):
                    break
                try:
                    yield path.name, json.loads(line)
                except json.JSONDecodeError:
                    continue


def attach_items_ok(records: list[dict[str, Any]]) -> list[Event]:
    """Recorder events of one file's records, each ok request given ``items_ok``.

    The client reports a request and then, in the same drain, the items its reply resolved
    (``done``); counting those ``done`` items up to the next request of the same arm gives
    the items that survived a cut or damaged reply.
    """
    events: list[Event] = []
    open_request: dict[str, int] = {}
    counts: dict[int, int] = {}
    for rec in records:
        if rec.get("type") != "event":
            continue
        ev = event_from_json(rec)
        if ev.kind == "request":
            if ev.outcome == "ok" and ev.items > 0:
                open_request[ev.arm] = len(events)
                counts[len(events)] = 0
            else:
                open_request.pop(ev.arm, None)
        elif ev.kind == "item" and ev.outcome == "done" and ev.arm in open_request:
            counts[open_request[ev.arm]] += ev.items
        events.append(ev)
    for index, n in counts.items():
        events[index] = dataclasses.replace(events[index], items_ok=min(n, events[index].items))
    return events


def read_run(run_dir: str | Path) -> tuple[list[Event], list[dict[str, Any]]]:
    """All recorder events and all other records (jobs, stops) of a run folder."""
    by_file: dict[str, list[dict[str, Any]]] = {}
    others: list[dict[str, Any]] = []
    for name, rec in iter_records(run_dir):
        if rec.get("type") == "event":
            by_file.setdefault(name, []).append(rec)
        else:
            others.append(rec)
    events: list[Event] = []
    for records in by_file.values():
        events.extend(attach_items_ok(records))
    return events, others


class SlotClaims:
    """Atomic claims of slots (per name: ``batch``, a user group) and shared run facts, in a
    SQLite file every Locust process of the run opens."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS slots (name TEXT NOT NULL, slot INTEGER NOT NULL,"
            " pid INTEGER, finished INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (name, slot))"
        )
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value REAL)")

    def claim(self, name: str, slots: int) -> int | None:
        """The lowest free slot of ``name`` below ``slots``, now owned by this process; None if
        all are taken."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            taken = {
                row[0] for row in self._db.execute("SELECT slot FROM slots WHERE name = ?", (name,))
            }
            free = next((s for s in range(slots) if s not in taken), None)
            if free is not None:
                self._db.execute(
                    "INSERT INTO slots (name, slot, pid) VALUES (?, ?, ?)",
                    (name, free, os.getpid()),
                )
            self._db.execute("COMMIT")
        except sqlite3.Error:
            self._db.execute("ROLLBACK")
            raise
        return free

    def finish(self, name: str, slot: int) -> None:
        """Mark ``slot`` of ``name`` finished."""
        self._db.execute("UPDATE slots SET finished = 1 WHERE name = ? AND slot = ?", (name, slot))

    def finished(self, name: str) -> int:
        """How many slots of ``name`` have finished."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM slots WHERE name = ? AND finished = 1", (name,)
        ).fetchone()
        return int(row[0])

    def set_once(self, key: str, value: float) -> float:
        """Store ``value`` under ``key`` unless one is there; return the stored value."""
        self._db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, value))
        got = self.get(key)
        return value if got is None else got

    def get(self, key: str) -> float | None:
        """The value stored under ``key`` (None if unset)."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else float(row[0])

    def close(self) -> None:
        """Close the connection."""
        self._db.close()
