"""Pulling annotations out of Label Studio: its export API, or a file a user downloaded.

A snapshot export with full predictions is used (not the quick JSON export, whose
predictions are ids only), so a Demonstration can know the model's draft and an
annotation can be compared with the prediction it started from. The client and its
error messages come from training/label_studio_client.py.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from training.label_config import read_schema
from training.label_studio_client import LabelStudioError, client, describe

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The export could not be pulled or read; the message says what to check."""


def pull_export(
    url: str,
    api_key: str,
    project_id: int,
    timeout: float = 600.0,
    attempts: int = 4,
    backoff: float = 1.0,
    request_timeout: float = 60.0,
) -> tuple[list[dict], str]:
    """(tasks as in Label Studio's JSON export, the project's label config).

    Label Studio down, too slow (no answer in `request_timeout` s) or answering 5xx/429 is
    tried again, `attempts` times in all, waiting `backoff` s, then twice that, ... (at
    most 30 s); then an ExportError says what happened on each attempt. A refusal that
    another try cannot change (a bad key, a missing project) fails at once."""
    try:
        # The SDK's own retries are off: this function's are bounded and logged.
        ls = client(url=url, api_key=api_key, timeout=request_timeout, max_retries=0)
    except LabelStudioError as err:
        raise ExportError(str(err)) from None
    attempts = max(1, attempts)
    tried: list[str] = []
    for attempt in range(1, attempts + 1):
        try:
            return _pull_once(ls, url, project_id, timeout)
        except _Transient as err:
            tried.append(str(err))
            if attempt == attempts:
                break
            wait = min(backoff * 2 ** (attempt - 1), 30.0)
            log.warning(
                "export of project %d, attempt %d of %d: %s; trying again in %.1f s",
                project_id,
                attempt,
                attempts,
                err,
                wait,
            )
            time.sleep(wait)
    raise ExportError(
        f"Label Studio at {url} failed {attempts} attempt(s) to export project {project_id} "
        f"(last: {tried[-1]}): check that it runs and LS_RLHF_LABEL_STUDIO_URL; the next "
        "trigger tries again"
    )


class _Transient(Exception):
    """A failure another attempt may not have: unreachable, too slow, 5xx or 429."""


def _pull_once(ls: Any, url: str, project_id: int, timeout: float) -> tuple[list[dict], str]:
    from label_studio_sdk.types import SerializationOptionRequest, SerializationOptionsRequest

    try:
        project = ls.projects.get(id=project_id)
        snapshot = ls.projects.exports.create(
            project_id,
            title=f"ls-rlhf {time.strftime('%Y-%m-%d %H:%M:%S')}",
            serialization_options=SerializationOptionsRequest(
                predictions=SerializationOptionRequest(only_id=False)
            ),
        )
        export_id, status = snapshot.id, snapshot.status
        if export_id is None:
            raise ExportError(f"Label Studio started no export of project {project_id}")
        deadline = time.monotonic() + timeout
        while status not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            status = ls.projects.exports.get(project_id, export_pk=export_id).status
        if status != "completed":
            raise ExportError(f"Label Studio's export of project {project_id} ended as {status!r}")
        raw = b"".join(
            ls.projects.exports.download(project_id, export_pk=export_id, export_type="JSON")
        )
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001 - httpx and SDK errors become one clear message
        status_code = getattr(err, "status_code", None)
        if status_code is None or status_code >= 500 or status_code in (408, 429):
            raise _Transient(describe(err, f"project {project_id}", url)) from None
        raise ExportError(describe(err, f"project {project_id}", url)) from None
    try:
        tasks = json.loads(raw)
    except ValueError:
        raise _Transient(f"Label Studio's export of project {project_id} is not JSON") from None
    if not isinstance(tasks, list):
        raise ExportError(f"Label Studio's export of project {project_id} is not a list of tasks")
    if not project.label_config:
        raise ExportError(f"project {project_id} has no labeling config")
    return tasks, project.label_config


def read_export_file(path: str | Path) -> list[dict]:
    """A JSON export downloaded from Label Studio (Export > JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"export file {path} does not exist")
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ExportError(
            f"{path} is not JSON ({err.msg} at line {err.lineno}); export the project as JSON"
        ) from None
    if not isinstance(tasks, list) or not all(isinstance(t, dict) and "data" in t for t in tasks):
        raise ExportError(
            f"{path} is not a Label Studio JSON export (a list of tasks with 'data'); "
            "use Export > JSON, not JSON_MIN or CSV"
        )
    return tasks


def prompts_from_tasks(tasks: list[dict[str, Any]], label_config: str) -> list[str]:
    """The distinct prompts of a project's tasks, in task order."""
    field = read_schema(label_config).prompt_field
    seen: dict[str, None] = {}
    for task in tasks:
        prompt = (task.get("data") or {}).get(field)
        if isinstance(prompt, str) and prompt.strip():
            seen.setdefault(prompt, None)
    return list(seen)
