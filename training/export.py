"""Pulling annotations out of Label Studio: its export API, or a file a user downloaded.

A snapshot export with full predictions is used (not the quick JSON export, whose
predictions are ids only), so a Demonstration can know the model's draft and an
annotation can be compared with the prediction it started from. The SDK handles both
kinds of API key: a legacy token, or a personal access token (a JWT it refreshes itself).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from training.label_config import read_schema


class ExportError(RuntimeError):
    """The export could not be pulled or read; the message says what to check."""


def pull_export(
    url: str, api_key: str, project_id: int, timeout: float = 600.0
) -> tuple[list[dict], str]:
    """(tasks as in Label Studio's JSON export, the project's label config)."""
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.types import SerializationOptionRequest, SerializationOptionsRequest

    if not api_key:
        raise ExportError(
            "no Label Studio API key: set LS_RLHF_LABEL_STUDIO_API_KEY or pass --api-key"
        )
    ls = LabelStudio(base_url=url.rstrip("/"), api_key=api_key)
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
        raise ExportError(_describe(err, url, project_id)) from None
    tasks = json.loads(raw)
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


def _describe(err: Exception, url: str, project_id: int) -> str:
    status = getattr(err, "status_code", None)
    if status == 401:
        return (
            f"Label Studio at {url} refused the API key (401): check LS_RLHF_LABEL_STUDIO_API_KEY"
        )
    if status == 404:
        return (
            f"project {project_id} does not exist at {url} (404): check the id in the project's URL"
        )
    if status is not None:
        return f"Label Studio at {url} answered {status}: {getattr(err, 'body', err)}"
    return f"could not reach Label Studio at {url} ({type(err).__name__}: {err}): check LS_RLHF_LABEL_STUDIO_URL"
