"""Talking to Label Studio with its SDK: the one client factory and the one error translator.

Both sides use it: the backend and the CLI (ml_backend/) and the export pull
(training/export.py). It lives in training/ because training/ never imports ml_backend/.
The SDK takes either kind of API key: a legacy token or a personal access token (a JWT it
refreshes itself).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

    from training.settings import Settings

NO_API_KEY = (
    "no Label Studio API key: set LS_RLHF_LABEL_STUDIO_API_KEY (Account & Settings > "
    "Personal Access Token, or a legacy token) or pass --api-key"
)


class LabelStudioError(RuntimeError):
    """Label Studio refused or could not be reached; the message says which setting to check."""


def client(
    settings: Settings | None = None,
    url: str | None = None,
    api_key: str | None = None,
    *,
    timeout: float | None = None,
    max_retries: int | None = None,
) -> LabelStudio:
    """An SDK client for `url` with `api_key`, each defaulting to the settings' value.

    `timeout` (seconds per request) and `max_retries` (the SDK's own retries) keep the
    SDK's defaults unless given."""
    from label_studio_sdk import LabelStudio

    key = api_key or (settings.label_studio_api_key if settings else "")
    base_url = url or (settings.label_studio_url if settings else "")
    if not key:
        raise LabelStudioError(NO_API_KEY)
    if not base_url:
        raise LabelStudioError("no Label Studio URL: set LS_RLHF_LABEL_STUDIO_URL or pass --url")
    options: dict[str, Any] = {}
    if timeout is not None:
        options["timeout"] = timeout
    if max_retries is not None:
        options["max_retries"] = max_retries
    return LabelStudio(base_url=base_url.rstrip("/"), api_key=key, **options)


def get_project(ls: LabelStudio, project_id: int) -> Any:
    """The project, with a clear error for the usual mistakes."""
    try:
        return ls.projects.get(id=project_id)
    except Exception as err:  # noqa: BLE001 - the SDK raises httpx and ApiError types
        raise LabelStudioError(describe(err, f"project {project_id}")) from None


def describe(err: Exception, what: str, url: str | None = None) -> str:
    """One line for an SDK or HTTP error about `what` (e.g. "project 3"), naming the
    setting to check; `url` is Label Studio's, when the caller knows it."""
    at = f" at {url}" if url else ""
    status = getattr(err, "status_code", None)
    if status == 401:
        return (
            f"Label Studio{at} refused the API key (401) for {what}: "
            "check LS_RLHF_LABEL_STUDIO_API_KEY"
        )
    if status == 404:
        return (
            f"{what} does not exist{at or ' in Label Studio'} (404): "
            "check the id in the project's URL"
        )
    if status is not None:
        body = str(getattr(err, "body", err))[:300]
        return f"Label Studio{at} answered {status} for {what}: {body}"
    return (
        f"could not reach Label Studio{at} for {what} ({type(err).__name__}: {err}): "
        "check LS_RLHF_LABEL_STUDIO_URL"
    )
