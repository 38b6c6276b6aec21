"""Talking to Label Studio with its SDK: one place for the client and its errors."""

from __future__ import annotations

from typing import Any

from training.settings import Settings


class LabelStudioError(RuntimeError):
    """Label Studio refused or could not be reached; the message says which setting to check."""


def client(settings: Settings, url: str | None = None, api_key: str | None = None):
    """An SDK client; the key may be a legacy token or a personal access token (JWT)."""
    from label_studio_sdk import LabelStudio

    key = api_key or settings.label_studio_api_key
    if not key:
        raise LabelStudioError(
            "no Label Studio API key: set LS_RLHF_LABEL_STUDIO_API_KEY (Account & Settings > "
            "Personal Access Token, or a legacy token) or pass --api-key"
        )
    return LabelStudio(base_url=(url or settings.label_studio_url).rstrip("/"), api_key=key)


def get_project(ls, project_id: int) -> Any:
    """The project, with a clear error for the usual mistakes."""
    try:
        return ls.projects.get(id=project_id)
    except Exception as err:  # noqa: BLE001 - the SDK raises httpx and ApiError types
        raise LabelStudioError(describe(err, f"project {project_id}")) from None


def describe(err: Exception, what: str) -> str:
    status = getattr(err, "status_code", None)
    if status == 401:
        return (
            f"Label Studio refused the API key (401) for {what}: check LS_RLHF_LABEL_STUDIO_API_KEY"
        )
    if status == 404:
        return f"{what} does not exist in Label Studio (404): check the id in the project's URL"
    if status is not None:
        return f"Label Studio answered {status} for {what}: {getattr(err, 'body', err)}"
    return f"could not reach Label Studio for {what} ({type(err).__name__}: {err}): check LS_RLHF_LABEL_STUDIO_URL"
