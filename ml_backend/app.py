"""The HTTP side of the backend: Label Studio's ML-backend protocol in Flask.

Routes only translate between HTTP and `RLHFBackend`; they validate requests, check
auth and turn known errors into 4xx answers that say what to fix. `create_app()` is the
app factory that gunicorn (`ls-rlhf serve`) and the tests use.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from ml_backend.backend import RLHFBackend
from ml_backend.events import MAX_ID, EventError, EventLog, parse_project_id
from ml_backend.results import InputError, TaskDataError, describe_type
from ml_backend.scheduler import JobScheduler, JobStore
from ml_backend.serving import ModelHolder
from ml_backend.status_page import status
from ml_backend.training_job import run_training
from training.label_config import LabelConfigError
from training.quality import REPORTS_DIR, metric_lines
from training.registry import RegistryError, RegistryWriteError
from training.settings import Settings

log = logging.getLogger(__name__)

WEBHOOK_SECRET_HEADER = "X-LS-RLHF-Secret"


class BadRequest(InputError):
    """An answer the route gives itself: 400 (or `status`) naming the field."""

    def __init__(self, message: str, field: str = "body", status: int = 400) -> None:
        super().__init__(message, field, status)


ROUTES = (
    "GET /health, POST /setup, POST /predict, GET /predictions/progress, POST /webhook, "
    "GET|POST /versions, POST /train, GET /jobs, GET /jobs/<id>, GET /metrics, GET /status"
)


def create_app(
    settings: Settings | None = None,
    holder: ModelHolder | None = None,
    load_models: bool = True,
    start_worker: bool | None = None,
) -> Flask:
    """The backend app. Tests pass a loaded `holder` and `load_models=False`; the training
    worker starts with the models unless `start_worker` says otherwise."""
    settings = settings or Settings.from_env()
    holder = holder or ModelHolder(settings)
    events = EventLog(settings.state_dir / "events.sqlite3")
    backend = RLHFBackend(settings, holder, events)
    scheduler = backend.scheduler = JobScheduler(
        events,
        JobStore(settings.state_dir / "jobs.sqlite3"),
        settings.train_every,
        run_job=lambda job, progress: run_training(
            settings, job, progress, access=backend.label_studio_access.get(job.project_id)
        ),
        redis_url=settings.redis_url,
        access=backend.label_studio_access.get,
    )
    if load_models and not holder.ready:
        holder.start_loading()
        holder.start_watching()
    if load_models:
        backend.follower.watch()
    if load_models if start_worker is None else start_worker:
        scheduler.start()

    app = Flask("ls_rlhf")
    # Werkzeug refuses a longer body (Content-Length or a chunked stream) with a 413.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["ls_rlhf"] = backend
    app.extensions["ls_rlhf_parts"] = _Parts(
        settings, holder, backend, events, scheduler, _scrubber(settings), time.time()
    )
    app.register_blueprint(api)
    app.register_blueprint(status)  # GET /status, the page a person reads
    return app


@dataclass(frozen=True)
class _Parts:
    """What the routes and error handlers need, built once by `create_app`."""

    settings: Settings
    holder: ModelHolder
    backend: RLHFBackend
    events: EventLog
    scheduler: JobScheduler
    scrub: Callable[[str], str]  # takes the server's folders out of a client's message
    started_at: float


def _parts() -> _Parts:
    return current_app.extensions["ls_rlhf_parts"]


# The routes, the auth check and the error handlers, registered on every app create_app
# builds (app_errorhandler: also for answers no route gives, such as a 404).
api = Blueprint("ls_rlhf", __name__)


# Every answer that is not a success is JSON: {"error": what is wrong and what to do,
# "field": what it is about}. Paths on the server's disk and tracebacks go to the log.
def _error(message: str, field: str, status: int, **extra: Any) -> tuple[Response, int]:
    return jsonify(error=_parts().scrub(message), field=field, **extra), status


@api.before_app_request
def check_auth() -> Response | None:
    settings = _parts().settings
    if _authorized(settings, request.path, request.headers):
        return None
    response = jsonify(
        error="authentication required: use the backend's HTTP Basic auth user and password"
        + (
            f" (or, on /webhook, the {WEBHOOK_SECRET_HEADER} header)"
            if settings.webhook_secret and request.path == "/webhook"
            else ""
        ),
        field="Authorization",
    )
    response.status_code = 401
    response.headers["WWW-Authenticate"] = 'Basic realm="ls-rlhf"'
    return response


@api.app_errorhandler(InputError)
def input_error(err: InputError):
    extra = {"task": err.task_id} if isinstance(err, TaskDataError) else {}
    return _error(str(err), err.field, err.status, **extra)


@api.app_errorhandler(LabelConfigError)
def config_error(err: LabelConfigError):
    return _error(f'label config does not fit ("label_config"): {err}', "label_config", 422)


@api.app_errorhandler(EventError)
def event_error(err: EventError):
    return _error(str(err), err.field, 400)


@api.app_errorhandler(RegistryError)
def registry_error(err: RegistryError):
    scrub = _parts().scrub
    log.info("registry: %s", err)
    # Which folder (the root or a project's lineage) is for the log, not the client.
    message = re.sub(r" in <server folder>\S*", "", scrub(str(err)))
    return _error(f"{message} (`ls-rlhf versions list` shows them)", "version", 404)


@api.app_errorhandler(RegistryWriteError)
def registry_write_error(err: RegistryWriteError):
    log.error("registry: %s", err)
    return _error(str(err.strerror or err), "version", 507)


@api.app_errorhandler(TimeoutError)
def still_loading(err: TimeoutError):
    return _error(str(err), "models", 503)


@api.app_errorhandler(RequestEntityTooLarge)
def too_large(err: RequestEntityTooLarge):
    return _error(
        f"the request body is over {_parts().settings.max_request_bytes} bytes "
        "(LS_RLHF_MAX_REQUEST_BYTES): send less, or raise the limit",
        "body",
        413,
    )


@api.app_errorhandler(NotFound)
def not_found(err: NotFound):
    return _error(f"no route {request.path}; the backend serves {ROUTES}", "path", 404)


@api.app_errorhandler(MethodNotAllowed)
def not_allowed(err: MethodNotAllowed):
    allowed = sorted(set(err.valid_methods or ()) - {"HEAD", "OPTIONS"})
    response, status = _error(
        f"{request.method} is not allowed on {request.path}; use {' or '.join(allowed)}",
        "method",
        405,
    )
    response.headers["Allow"] = ", ".join(sorted(err.valid_methods or ()))
    return response, status


@api.app_errorhandler(HTTPException)
def http_error(err: HTTPException):
    return _error(f"{err.name}: {err.description}", "request", err.code or 400)


@api.app_errorhandler(Exception)
def unexpected(err: Exception):
    holder = _parts().holder
    # ValueErrors and the rest that no handler above knows are the backend's own faults.
    log.exception("%s %s failed", request.method, request.path)
    if isinstance(err, RuntimeError) and holder.load_error and not holder.ready:
        return _error(
            "the models failed to load; GET /health says why and the backend's log has the details",
            "models",
            503,
        )
    return _error(
        f"the backend failed on this request ({type(err).__name__}); its log has the "
        "details: please report it",
        "backend",
        500,
    )


@api.get("/")
@api.get("/health")
def health():
    parts = _parts()
    state = "loaded" if parts.holder.ready else ("failed" if parts.holder.load_error else "loading")
    body: dict[str, Any] = {"status": "UP", "model_class": "RLHFBackend", "models": state}
    if parts.holder.ready:
        body["model_version"] = parts.holder.get().model_version
    if parts.holder.load_error:
        body["error"] = parts.scrub(parts.holder.load_error)
    problems = parts.holder.problems()
    if problems:
        # A damaged registry: still serving (the last good versions), but say what is wrong.
        body["registry"] = problems
    return jsonify(body)


@api.post("/setup")
def setup():
    backend = _parts().backend
    return jsonify(backend.setup(_json_object()))


@api.post("/predict")
def predict():
    parts = _parts()
    payload = _json_object()
    tasks = payload.get("tasks")
    if not isinstance(tasks, list):
        what = "missing" if tasks is None else f"{describe_type(tasks)}"
        raise BadRequest(f'"tasks" must be a list of task objects, not {what}', "tasks")
    if len(tasks) > parts.settings.max_predict_tasks:
        raise BadRequest(
            f'"tasks" holds {len(tasks)} tasks, over the limit of {parts.settings.max_predict_tasks} '
            "(LS_RLHF_MAX_PREDICT_TASKS): send them in smaller batches",
            "tasks",
            413,
        )
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            raise BadRequest(
                f'"tasks[{i}]" is {describe_type(task)}; "tasks" must be a list of task '
                'objects such as {"id": 1, "data": {...}}',
                f"tasks[{i}]",
            )
        tid = task.get("id")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, (int, str))):
            raise BadRequest(
                f'"tasks[{i}].id" is {describe_type(tid)}; a task id is a number',
                f"tasks[{i}].id",
            )
    label_config = payload.get("label_config")
    if not isinstance(label_config, str) or not label_config.strip():
        what = "missing" if label_config in (None, "") else f"{describe_type(label_config)}"
        raise BadRequest(
            f'"label_config" (the project\'s labeling config XML) is {what}; send it as text',
            "label_config",
        )
    params = payload.get("params")
    if params is not None and not isinstance(params, dict):
        raise BadRequest(f'"params" is {describe_type(params)}, not an object', "params")
    context = (params or {}).get("context")
    if context is not None and not isinstance(context, dict):
        raise BadRequest(
            f'"params.context" is {describe_type(context)}, not an object', "params.context"
        )
    project = payload.get("project")
    if project is not None:
        parse_project_id(project)  # EventError names the field
    results = parts.backend.predict(tasks, label_config, context=context, project=project)
    version = (
        results[0]["model_version"] if results else parts.holder.get(timeout=0.1).model_version
    )
    return jsonify(results=results, model_version=version)


@api.post("/webhook")
def webhook():
    backend = _parts().backend
    payload = _json_object()
    # Not checked here: the event log refuses a missing or non-text "action" with a 400
    # naming it, before it records anything.
    action: Any = payload.get("action")
    return jsonify(backend.fit(action, payload)), 201


@api.post("/train")
def train_legacy():
    """Label Studio's legacy training call: recorded like the "Start Training" button."""
    backend = _parts().backend
    payload = _json_object()
    parse_project_id(payload.get("project"))
    recorded = backend.fit("START_TRAINING", {"project": payload.get("project")})
    return jsonify(job=recorded.get("job"), event=recorded["event_id"]), 201


@api.route("/versions", methods=["GET", "POST"])
def versions():
    holder = _parts().holder
    payload = _json_object(empty_ok=True) if request.method == "POST" else {}
    raw_project = payload.get("project", request.args.get("project"))
    project = None if raw_project is None else parse_project_id(raw_project)
    registry = holder.registry_for(project)  # that project's lineage (root without one)
    if payload.get("kind") is not None or payload.get("version") is not None:
        kind, version = payload.get("kind"), payload.get("version")
        if kind not in ("policy", "reward"):
            raise BadRequest(
                f'"kind" must be "reward" or "policy", not {describe_type(kind)} {str(kind)[:40]}',
                "kind",
            )
        if not isinstance(version, str) or not version.strip():
            raise BadRequest(
                '"version" must name a version, e.g. "v2" (`ls-rlhf versions list`), not '
                f"{describe_type(version)}",
                "version",
            )
        promoted = registry.promote(kind, version)
        holder.refresh_soon()
        log.info("promoted %s through /versions", promoted.label)
    served = holder.model_version_for(project) if holder.ready else None
    listing = {kind: [v.label for v in registry.versions(kind)] for kind in ("policy", "reward")}
    current = {
        kind: (v.label if (v := registry.current(kind)) else None) for kind in ("policy", "reward")
    }
    names = [served] if served else []
    return jsonify(
        versions=names + listing["reward"] + listing["policy"],
        current=current,
        served=served,
        all=listing,
    )


@api.get("/jobs")
def jobs():
    scheduler = _parts().scheduler
    raw = request.args.get("project")
    project = None
    if raw is not None:
        try:
            project = parse_project_id(raw)
        except EventError:
            raise BadRequest(
                f"?project= must be a project id (a positive integer), not {raw[:40]!r}",
                "project",
            ) from None
    return jsonify(jobs=[job.as_dict() for job in scheduler.store.jobs(project)])


@api.get("/jobs/<job_id>")
def job(job_id: str):
    scheduler = _parts().scheduler
    found = None
    if job_id.isascii() and job_id.isdigit() and 0 < int(job_id) <= MAX_ID:
        found = scheduler.store.get(int(job_id))
    if found is None:
        raise BadRequest(f"no job {job_id[:40]}; GET /jobs lists them", "job_id", 404)
    return jsonify(found.as_dict())


@api.get("/predictions/progress")
def prediction_progress():
    backend = _parts().backend
    return jsonify(jobs=[job.as_dict() for job in backend.deliveries.values()])


@api.get("/metrics")
def metrics():
    parts = _parts()
    lines = [
        "# HELP ls_rlhf_up 1 when the models are loaded.",
        "# TYPE ls_rlhf_up gauge",
        f"ls_rlhf_up {1 if parts.holder.ready else 0}",
        f"ls_rlhf_uptime_seconds {time.time() - parts.started_at:.1f}",
    ]
    for name, value in parts.backend.stats.items():
        kind = "counter"
        lines += [f"# TYPE ls_rlhf_{name}_total {kind}", f"ls_rlhf_{name}_total {value}"]
    lines.append(f"ls_rlhf_events_recorded_total {parts.events.last_id()}")
    running = sum(1 for job in parts.backend.deliveries.values() if job.state == "running")
    lines.append(f"ls_rlhf_prediction_deliveries_running {running}")
    if parts.holder.ready:
        lines.append(f'ls_rlhf_model_info{{model_version="{parts.holder.get().model_version}"}} 1')
    # The headline figures of the latest `ls-rlhf report` of each project.
    lines += metric_lines(parts.settings.state_dir / REPORTS_DIR)
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")


def _json_object(empty_ok: bool = False) -> dict[str, Any]:
    """The request's JSON object. Read as UTF-8 whatever the Content-Type says (Label Studio
    and curl users do not always set it); a body that is not JSON is a 400."""
    raw = request.get_data(cache=True)  # 413 past MAX_CONTENT_LENGTH, when it is sent
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    # A chunked body is cut at the limit by Werkzeug, silently: more of it is a 413.
    chunked = request.content_length is None
    if chunked and len(raw) >= limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    if empty_ok and not raw.strip():
        return {}
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest(
            "the body must be JSON (Content-Type: application/json), UTF-8 encoded", "body"
        ) from None
    if not isinstance(payload, dict):
        raise BadRequest(f"the body must be a JSON object, not {describe_type(payload)}", "body")
    try:
        json.dumps(payload, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            "the body holds invalid Unicode (an escape of a lone surrogate such as \\ud800); "
            "send UTF-8 text",
            "body",
        ) from None
    return payload


def _scrubber(settings: Settings):
    """A function that takes the server's own folders out of a message meant for a client."""
    roots = {
        str(Path(settings.home)),
        str(Path(settings.home).resolve()),
        sys.prefix,
        str(Path.home()),
        os.getcwd(),
        tempfile.gettempdir(),
        str(Path(__file__).resolve().parents[1]),
    }
    for name in (settings.policy_model, settings.reward_backbone):
        if name.startswith(("/", "~", ".")):
            roots |= {name, str(Path(name).expanduser().resolve())}
    ordered = sorted((r for r in roots if len(r) > 1), key=len, reverse=True)

    def scrub(message: str) -> str:
        for root in ordered:
            message = message.replace(root, "<server folder>")
        return message

    return scrub


def _authorized(settings: Settings, path: str, headers) -> bool:
    secret = headers.get(WEBHOOK_SECRET_HEADER)
    if path == "/webhook" and settings.webhook_secret and secret is not None:
        return hmac.compare_digest(secret.encode(), settings.webhook_secret.encode())
    if settings.basic_auth_user:
        return _basic_auth_ok(headers.get("Authorization", ""), settings)
    # Without Basic auth, a configured secret still guards /webhook.
    return not (path == "/webhook" and settings.webhook_secret)


def _basic_auth_ok(header: str, settings: Settings) -> bool:
    if not header.startswith("Basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    return hmac.compare_digest(
        user.encode(), settings.basic_auth_user.encode()
    ) and hmac.compare_digest(password.encode(), settings.basic_auth_password.encode())
