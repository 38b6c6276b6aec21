"""The durable log of Label Studio events the backend received.

Label Studio gives a webhook 1 s and never retries, so `/webhook` only appends a row
here and answers. Only what training needs as a trigger is kept (action, project, task
and annotation ids): the payload itself is not stored, because it carries the project's
share token and because training data is pulled from Label Studio's export API, never
taken from a webhook.

SQLite in WAL mode: appends from many threads and several processes are safe, a crash
loses nothing that was acknowledged, and a restarted backend finds its events again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ANNOTATION_ACTIONS = frozenset(
    {
        "ANNOTATION_CREATED",
        "ANNOTATION_UPDATED",
        "ANNOTATIONS_CREATED",
        "ANNOTATIONS_DELETED",
        "ANNOTATION_DELETED",
    }
)
TRAINING_ACTIONS = frozenset({"START_TRAINING"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    received_at REAL NOT NULL,
    action TEXT NOT NULL,
    project_id INTEGER,
    task_id INTEGER,
    annotation_ids TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS events_project ON events (project_id, id);
"""


class EventError(ValueError):
    """A webhook body that is not a Label Studio event; the message says why."""


@dataclass(frozen=True)
class Event:
    id: int
    received_at: float
    action: str
    project_id: int | None
    task_id: int | None
    annotation_ids: tuple[int, ...]

    @property
    def is_annotation_change(self) -> bool:
        return self.action in ANNOTATION_ACTIONS


def project_id_of(value: Any) -> int | None:
    """Label Studio sends a project as an object with "id", an int, or "<id>.<timestamp>"."""
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.split(".", 1)[0].isdigit():
        return int(value.split(".", 1)[0])
    return None


def summarize(payload: Any) -> tuple[str, int | None, int | None, tuple[int, ...]]:
    """(action, project id, task id, annotation ids) of a webhook body."""
    if not isinstance(payload, dict) or not isinstance(payload.get("action"), str):
        raise EventError(
            'a webhook body must be a JSON object with an "action", e.g. {"action": "START_TRAINING"}'
        )
    action = payload["action"]
    task = payload.get("task")
    task_id = task.get("id") if isinstance(task, dict) and isinstance(task.get("id"), int) else None
    raw = payload.get("annotation") or payload.get("annotations") or []
    items = raw if isinstance(raw, list) else [raw]
    annotation_ids = tuple(
        a["id"] for a in items if isinstance(a, dict) and isinstance(a.get("id"), int)
    )
    project_id = project_id_of(payload.get("project"))
    if project_id is None and isinstance(task, dict):
        project_id = project_id_of(task.get("project"))
    return action, project_id, task_id, annotation_ids


class EventLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._connect() as db:
            db.executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        yield self._db()

    def record(self, payload: Any) -> Event:
        action, project_id, task_id, annotation_ids = summarize(payload)
        now = time.time()
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO events (received_at, action, project_id, task_id, annotation_ids) VALUES (?, ?, ?, ?, ?)",
                (now, action, project_id, task_id, json.dumps(list(annotation_ids))),
            )
        assert cursor.lastrowid is not None  # set by every INSERT
        return Event(cursor.lastrowid, now, action, project_id, task_id, annotation_ids)

    def events(
        self, project_id: int | None = None, after_id: int = 0, limit: int | None = None
    ) -> list[Event]:
        query = "SELECT id, received_at, action, project_id, task_id, annotation_ids FROM events WHERE id > ?"
        args: list[Any] = [after_id]
        if project_id is not None:
            query += " AND project_id = ?"
            args.append(project_id)
        query += " ORDER BY id"
        if limit:
            query += f" LIMIT {int(limit)}"
        with self._connect() as db:
            rows = db.execute(query, args).fetchall()
        return [Event(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5]))) for r in rows]

    def count(
        self,
        project_id: int | None = None,
        after_id: int = 0,
        actions: frozenset[str] | None = None,
    ) -> int:
        query, args = "SELECT action, COUNT(*) FROM events WHERE id > ?", [after_id]
        if project_id is not None:
            query += " AND project_id = ?"
            args.append(project_id)
        query += " GROUP BY action"
        with self._connect() as db:
            rows = db.execute(query, args).fetchall()
        return sum(n for action, n in rows if actions is None or action in actions)

    def last_id(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
