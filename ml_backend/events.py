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
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml_backend.results import describe_type

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
CREATE TABLE IF NOT EXISTS projects (
    id INTEGER PRIMARY KEY,           -- a Label Studio project that connected to this backend
    connected_at REAL NOT NULL,
    via TEXT NOT NULL                 -- how the backend learnt of it: /setup, /predict
);
"""


class EventError(ValueError):
    """A webhook body that is not a Label Studio event; the message says why and what to send."""

    def __init__(self, message: str, field: str = "body") -> None:
        super().__init__(message)
        self.field = field


# SQLite's INTEGER is 64-bit; a larger id cannot name anything the backend stores.
MAX_ID = 2**63 - 1
_ACTION = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


@dataclass(frozen=True)
class Event:
    id: int
    received_at: float
    action: str
    project_id: int | None
    task_id: int | None
    annotation_ids: tuple[int, ...]


def project_id_of(value: Any) -> int | None:
    """Label Studio sends a project as an object with "id", an int, or "<id>.<timestamp>".
    None for anything else (see `parse_project_id` for the strict reading)."""
    try:
        return parse_project_id(value)
    except EventError:
        return None


def parse_project_id(value: Any, field: str = "project") -> int:
    """A project id as Label Studio sends it, or EventError naming `field`: a positive
    integer, a string "<id>" or "<id>.<timestamp>", or an object with such an "id"."""
    if isinstance(value, dict):
        field, value = f"{field}.id", value.get("id")
    hint = (
        f'"{field}" must be a project id: a positive integer such as 3 (Label Studio also '
        'sends "3.1700000000" or {"id": 3})'
    )
    if value is None:
        raise EventError(f'"{field}" is missing: {hint}', field)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EventError(f'"{field}" is {describe_type(value)}, not a project id: {hint}', field)
    if isinstance(value, str):
        head, dot, tail = value.partition(".")
        if not (head.isascii() and head.isdigit()) or (
            dot and not (tail.isascii() and tail.isdigit())
        ):
            raise EventError(
                f'"{field}" is the text {value[:40]!r}, not a project id: {hint}', field
            )
        value = int(head)
    if not 0 < value <= MAX_ID:
        raise EventError(f'"{field}" is {value}, not a project id: {hint}', field)
    return value


def _ids(value: Any, field: str) -> tuple[int, ...]:
    """Ids of an object or a list of objects ({"id": 3} or [{"id": 3}, ...])."""
    items = value if isinstance(value, list) else [value]
    ids = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]" if isinstance(value, list) else field
        if not isinstance(item, dict):
            raise EventError(
                f'"{where}" is {describe_type(item)}; Label Studio sends an object with an "id"',
                where,
            )
        raw = item.get("id")
        if raw is None:
            continue
        if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= MAX_ID:
            raise EventError(
                f'"{where}.id" must be an integer id (0 or more), not {describe_type(raw)} {str(raw)[:40]}',
                f"{where}.id",
            )
        ids.append(raw)
    return tuple(ids)


def summarize(payload: Any) -> tuple[str, int, int | None, tuple[int, ...]]:
    """(action, project id, task id, annotation ids) of a webhook body; EventError names
    the field of a body that is not a Label Studio event (nothing of it is recorded)."""
    if not isinstance(payload, dict):
        raise EventError(
            'a webhook body must be a JSON object with an "action", e.g. {"action": "START_TRAINING", "project": 3}'
        )
    action = payload.get("action")
    if not isinstance(action, str):
        what = "missing" if action is None else f"{describe_type(action)}, not text"
        raise EventError(
            f'"action" is {what}: a webhook body needs an "action" such as "ANNOTATION_CREATED" '
            'or "START_TRAINING"',
            "action",
        )
    if not _ACTION.fullmatch(action):
        raise EventError(
            f'"action" {action[:40]!r} is not a Label Studio action: send one such as '
            '"ANNOTATION_CREATED" or "START_TRAINING" (capitals and underscores)',
            "action",
        )
    task = payload.get("task")
    if task is not None and not isinstance(task, dict):
        raise EventError(
            f'"task" is {describe_type(task)}; Label Studio sends the task object', "task"
        )
    task_ids = _ids(task, "task") if task is not None else ()
    annotation_ids: tuple[int, ...] = ()
    for key in ("annotation", "annotations"):
        if payload.get(key) is not None:
            annotation_ids = _ids(payload[key], key)
            break
    if (
        payload.get("project") is None
        and isinstance(task, dict)
        and task.get("project") is not None
    ):
        project_id = parse_project_id(task.get("project"), "task.project")
    else:
        project_id = parse_project_id(payload.get("project"))
    return action, project_id, (task_ids[0] if task_ids else None), annotation_ids


def thread_connection(local: threading.local, path: Path, *pragmas: str) -> sqlite3.Connection:
    """This thread's connection to the SQLite file `path` (a connection is not shared between
    threads), opened on first use: autocommit, WAL, then `pragmas` (e.g. "synchronous=NORMAL")."""
    db = getattr(local, "db", None)
    if db is None:
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        for pragma in pragmas:
            db.execute(f"PRAGMA {pragma}")
        local.db = db
    return db


class EventLog:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(_SCHEMA)

    def _db(self) -> sqlite3.Connection:
        return thread_connection(self._local, self.path, "synchronous=NORMAL")

    def record(self, payload: Any) -> Event:
        action, project_id, task_id, annotation_ids = summarize(payload)
        now = time.time()
        cursor = self._db().execute(
            "INSERT INTO events (received_at, action, project_id, task_id, annotation_ids) VALUES (?, ?, ?, ?, ?)",
            (now, action, project_id, task_id, json.dumps(list(annotation_ids))),
        )
        assert cursor.lastrowid is not None  # set by every INSERT
        return Event(cursor.lastrowid, now, action, project_id, task_id, annotation_ids)

    def connect(self, project_id: int, via: str) -> None:
        """Remember that a project talks to this backend (Label Studio's /setup, /predict)."""
        self._db().execute(
            "INSERT OR IGNORE INTO projects (id, connected_at, via) VALUES (?, ?, ?)",
            (project_id, time.time(), via),
        )

    def is_connected(self, project_id: int) -> bool:
        row = self._db().execute("SELECT 1 FROM projects WHERE id = ?", (project_id,)).fetchone()
        return row is not None

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
        rows = self._db().execute(query, args).fetchall()
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
        rows = self._db().execute(query, args).fetchall()
        return sum(n for action, n in rows if actions is None or action in actions)

    def last_id(self) -> int:
        return self._db().execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
