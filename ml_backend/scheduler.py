"""Training jobs: when to train, one run per project at a time, and a worker that runs them.

Trigger rules, checked after every recorded webhook event (a few SQLite reads):

* `START_TRAINING` (the button, or legacy `/train`) always asks for a run;
* annotation events (created, updated, deleted, including the plural actions) ask for a
  run once `train_every` of them have arrived since the events the last run covered.

Per project there is at most one running job and at most one queued job: a request
while a job is queued is already covered by it, and requests during a run coalesce into
that single follow-up. Job state lives in SQLite next to the event log, so a restarted
backend finds its queued jobs, and a job left "running" by a process that died is queued
again (its half-written version never became current: see training/registry.py).

Jobs run in a worker thread of the backend process by default. With a Redis URL set,
they go to an RQ queue instead, and `ls-rlhf worker` processes (on GPU machines, say)
run them; the job state is the same SQLite table on the shared state folder.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ml_backend.events import (
    ANNOTATION_ACTIONS,
    TRAINING_ACTIONS,
    Event,
    EventLog,
    thread_connection,
)

log = logging.getLogger(__name__)

QUEUE_NAME = "ls-rlhf"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL,
    state TEXT NOT NULL,              -- queued | running | done | failed
    reason TEXT NOT NULL,             -- what asked for it
    covers_event_id INTEGER NOT NULL, -- events up to this id are taken into account
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress REAL NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',
    metrics TEXT NOT NULL DEFAULT '{}',
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT
);
CREATE INDEX IF NOT EXISTS jobs_project ON jobs (project_id, state);
"""


@dataclass(frozen=True)
class Job:
    id: int
    project_id: int
    state: str
    reason: str
    covers_event_id: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: float
    message: str
    metrics: dict[str, Any]
    attempts: int

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class JobStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._lock = threading.Lock()  # claims and enqueues are read-modify-write
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        return thread_connection(self._local, self.path)

    def _rows(self, query: str, args: tuple = ()) -> list[Job]:
        rows = (
            self._db()
            .execute(
                "SELECT id, project_id, state, reason, covers_event_id, created_at, started_at, finished_at, "
                f"progress, message, metrics, attempts FROM jobs {query}",
                args,
            )
            .fetchall()
        )
        return [_job(r) for r in rows]

    def get(self, job_id: int) -> Job | None:
        found = self._rows("WHERE id = ?", (job_id,))
        return found[0] if found else None

    def jobs(self, project_id: int | None = None, limit: int = 50) -> list[Job]:
        if project_id is None:
            return self._rows("ORDER BY id DESC LIMIT ?", (limit,))
        return self._rows("WHERE project_id = ? ORDER BY id DESC LIMIT ?", (project_id, limit))

    def last_covered_event(self, project_id: int) -> int:
        row = (
            self._db()
            .execute(
                "SELECT COALESCE(MAX(covers_event_id), 0) FROM jobs WHERE project_id = ? AND state IN ('done', 'running', 'queued')",
                (project_id,),
            )
            .fetchone()
        )
        return row[0]

    def enqueue(self, project_id: int, reason: str, covers_event_id: int) -> Job | None:
        """A queued job for the project, unless one is already queued (then it covers this too)."""
        with self._lock, _transaction(self._db()) as db:
            queued = db.execute(
                "SELECT id FROM jobs WHERE project_id = ? AND state = 'queued'", (project_id,)
            ).fetchone()
            if queued:
                db.execute(
                    "UPDATE jobs SET covers_event_id = MAX(covers_event_id, ?) WHERE id = ?",
                    (covers_event_id, queued[0]),
                )
                return None
            cursor = db.execute(
                "INSERT INTO jobs (project_id, state, reason, covers_event_id, created_at) VALUES (?, 'queued', ?, ?, ?)",
                (project_id, reason, covers_event_id, time.time()),
            )
        assert cursor.lastrowid is not None  # set by every INSERT
        log.info("training job %d queued for project %d (%s)", cursor.lastrowid, project_id, reason)
        return self.get(cursor.lastrowid)

    def claim(self, worker: str, job_id: int | None = None) -> Job | None:
        """Mark the oldest runnable queued job (or `job_id`) running; one per project."""
        with self._lock, _transaction(self._db()) as db:
            query = (
                "SELECT id FROM jobs j WHERE state = 'queued' AND NOT EXISTS "
                "(SELECT 1 FROM jobs r WHERE r.project_id = j.project_id AND r.state = 'running')"
            )
            args: tuple = ()
            if job_id is not None:
                query += " AND id = ?"
                args = (job_id,)
            row = db.execute(query + " ORDER BY id LIMIT 1", args).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1, worker = ?, progress = 0 "
                "WHERE id = ?",
                (time.time(), worker, row[0]),
            )
        return self.get(row[0])

    def update(
        self, job_id: int, progress: float | None = None, message: str | None = None
    ) -> None:
        sets: list[str] = []
        args: list[float | str] = []
        if progress is not None:
            sets.append("progress = ?")
            args.append(round(progress, 4))
        if message is not None:
            sets.append("message = ?")
            args.append(message)
        if sets:
            self._db().execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))

    def finish(
        self, job_id: int, state: str, message: str, metrics: dict[str, Any] | None = None
    ) -> None:
        self._db().execute(
            "UPDATE jobs SET state = ?, message = ?, metrics = ?, finished_at = ?, progress = CASE WHEN ? = 'done' "
            "THEN 1 ELSE progress END WHERE id = ?",
            (state, message, json.dumps(metrics or {}, default=str), time.time(), state, job_id),
        )

    def requeue_abandoned(self) -> int:
        """Queue again the jobs left running by a process that is gone."""
        with self._lock, _transaction(self._db()) as db:
            rows = db.execute("SELECT id, worker FROM jobs WHERE state = 'running'").fetchall()
            dead = [job_id for job_id, worker in rows if not _alive(worker)]
            for job_id in dead:
                db.execute(
                    "UPDATE jobs SET state = 'queued', message = 'queued again: its worker stopped mid-run' WHERE id = ?",
                    (job_id,),
                )
        return len(dead)


class JobScheduler:
    """Decides when to train and runs jobs in a worker thread (or sends them to RQ); the
    training itself is `run_job` (ml_backend/training_job.py)."""

    def __init__(
        self,
        events: EventLog,
        store: JobStore,
        train_every: int,
        run_job: Callable[[Job, Callable[[float, str], None]], dict[str, Any]],
        redis_url: str = "",
        access: Callable[[int], tuple[str, str] | None] = lambda project_id: None,
    ) -> None:
        self.events, self.store, self.train_every = events, store, train_every
        self.run_job, self.redis_url, self.access = run_job, redis_url, access
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.worker_id = f"{os.getpid()}@{os.uname().nodename}"
        # Jobs queued in SQLite but not yet handed to Redis (down, or not tried yet): a
        # dispatcher thread sends them, so /webhook never waits on Redis.
        self._unsent: set[int] = set()
        self._unsent_lock = threading.Lock()
        self._dispatch = threading.Event()
        self._dispatcher: threading.Thread | None = None

    def on_event(self, event: Event) -> Job | None:
        """Called after an event is recorded: queue a run if the rules say so."""
        if event.project_id is None:
            return None
        if event.action in TRAINING_ACTIONS:
            job = self.store.enqueue(event.project_id, "START_TRAINING", event.id)
        elif event.action in ANNOTATION_ACTIONS and self.train_every > 0:
            since = self.store.last_covered_event(event.project_id)
            new = self.events.count(event.project_id, after_id=since, actions=ANNOTATION_ACTIONS)
            if new < self.train_every:
                return None
            job = self.store.enqueue(event.project_id, f"{new} annotation events", event.id)
        else:
            return None
        if job is not None and self.redis_url:
            self._queue_for_redis([job.id])
        self._wake.set()
        return job

    def _queue_for_redis(self, job_ids: list[int]) -> None:
        with self._unsent_lock:
            self._unsent.update(job_ids)
        if self._dispatcher is None or not self._dispatcher.is_alive():
            self._dispatcher = threading.Thread(
                target=self._dispatch_loop, name="redis-dispatcher", daemon=True
            )
            self._dispatcher.start()
        self._dispatch.set()

    def pending_for_redis(self) -> list[int]:
        """Jobs queued here that Redis has not received yet (it was unreachable)."""
        with self._unsent_lock:
            return sorted(self._unsent)

    def _dispatch_loop(self, max_wait: float = 30.0) -> None:
        """Send queued jobs to Redis; while it is unreachable, try again with a doubling wait
        (0.5 s to `max_wait`). The jobs stay queued in SQLite meanwhile, so nothing is lost,
        and a restarted backend sends every queued job again."""
        wait, down_since = 0.5, None
        while not self._stop.is_set():
            self._dispatch.wait(timeout=wait if down_since else None)
            self._dispatch.clear()
            for job_id in self.pending_for_redis():
                job = self.store.get(job_id)
                if job is None or job.state != "queued":
                    with self._unsent_lock:
                        self._unsent.discard(job_id)
                    continue
                try:
                    self._send_to_queue(job)
                except Exception as err:  # noqa: BLE001 - redis raises several kinds; logged
                    if down_since is None:
                        down_since = time.monotonic()
                        log.warning(
                            "Redis at %s is unreachable (%s: %s): job %d stays queued and is "
                            "sent when Redis answers",
                            _redacted(self.redis_url),
                            type(err).__name__,
                            err,
                            job_id,
                        )
                    wait = min(wait * 2, max_wait)
                    break
                with self._unsent_lock:
                    self._unsent.discard(job_id)
                if down_since is not None:
                    log.info(
                        "Redis answers again after %.0f s: job %d sent",
                        time.monotonic() - down_since,
                        job_id,
                    )
                    down_since, wait = None, 0.5

    def _send_to_queue(self, job: Job) -> None:
        from redis import Redis
        from rq import Queue

        # The Label Studio access /setup gave travels with the job, as run_job gets it in
        # process; RQ logs the description, which names the job and not its arguments.
        connection = Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=5)
        Queue(QUEUE_NAME, connection=connection).enqueue(
            "ml_backend.training_job.run_queued_job",
            job.id,
            self.access(job.project_id),
            job_timeout=6 * 3600,
            description=f"training job {job.id} (project {job.project_id})",
        )

    def start(self) -> None:
        """Recover abandoned jobs, then run queued ones in a thread (unless RQ runs them)."""
        recovered = self.store.requeue_abandoned()
        if recovered:
            log.info("queued again %d job(s) left running by a stopped process", recovered)
        if self.redis_url:
            self._queue_for_redis([job.id for job in self.store._rows("WHERE state = 'queued'")])
            return
        threading.Thread(target=self._loop, name="training-worker", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            job = self.store.claim(self.worker_id)
            if job is None:
                self._wake.wait(timeout=2.0)
                self._wake.clear()
                continue
            self.execute(job)

    def execute(self, job: Job) -> None:
        execute_job(self.store, job, self.run_job)


def execute_job(store: JobStore, job: Job, run_job: Callable[..., dict[str, Any]]) -> None:
    """Run one claimed job; its outcome (metrics or the reason it failed) goes to the store."""
    log.info("training job %d for project %d started", job.id, job.project_id)

    def progress(fraction: float, message: str = "") -> None:
        store.update(job.id, progress=fraction, message=message or None)

    try:
        metrics = run_job(job, progress)
    except Exception as err:  # noqa: BLE001 - the reason is the job's state, the served version is untouched
        log.error("training job %d failed: %s\n%s", job.id, err, traceback.format_exc())
        store.finish(job.id, "failed", f"{type(err).__name__}: {err}")
        return
    store.finish(job.id, "done", str(metrics.pop("message", "done")), metrics)
    log.info("training job %d done: %s", job.id, metrics)


def _job(row: tuple[Any, ...]) -> Job:
    """A Job from a row of `JobStore._rows`' columns, in the order of Job's fields."""
    values = dict(zip((f.name for f in fields(Job)), row, strict=True))
    return Job(**{**values, "metrics": json.loads(values["metrics"])})


class _transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, *rest) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")


def _redacted(url: str) -> str:
    """A Redis URL without its password, for the log."""
    head, at, tail = url.rpartition("@")
    return f"{head.split('//', 1)[0]}//***@{tail}" if at else url


def _alive(worker: str | None) -> bool:
    """Whether the process that claimed a job still runs (same machine only)."""
    if not worker:
        return False
    pid, _, host = worker.partition("@")
    if host != os.uname().nodename:
        return True  # another machine's worker: it reports for itself
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # this process is starting: it runs nothing yet
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
