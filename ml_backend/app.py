"""The HTTP side of the backend: Label Studio's ML-backend protocol in Flask.

Routes only translate between HTTP and `RLHFBackend`; they validate requests, check
auth and turn known errors into 4xx answers that say what to fix. `create_app()` is the
app factory that gunicorn (`ls-rlhf serve`) and the tests use.
"""

from __future__ import annotations

import base64
import hmac
import logging
import time
from typing import Any

from flask import Flask, Response, jsonify, request

from ml_backend.backend import RLHFBackend
from ml_backend.events import EventError, EventLog
from ml_backend.jobs import JobStore, Trainer
from ml_backend.results import TaskDataError
from ml_backend.serving import ModelHolder
from ml_backend.training_job import run_training
from training.label_config import LabelConfigError
from training.registry import RegistryError
from training.settings import Settings

log = logging.getLogger(__name__)

WEBHOOK_SECRET_HEADER = "X-LS-RLHF-Secret"


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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
    trainer = backend.trainer = Trainer(
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
    if load_models if start_worker is None else start_worker:
        trainer.start()

    app = Flask("ls_rlhf")
    app.config["SETTINGS"] = settings
    app.extensions["ls_rlhf"] = backend
    started_at = time.time()

    @app.before_request
    def check_auth() -> Response | None:
        if _authorized(settings, request.path, request.headers):
            return None
        response = jsonify(
            error="authentication required: use the backend's HTTP Basic auth user and password"
        )
        response.status_code = 401
        response.headers["WWW-Authenticate"] = 'Basic realm="ls-rlhf"'
        return response

    @app.errorhandler(BadRequest)
    def bad_request(err: BadRequest):
        return jsonify(error=str(err)), err.status

    @app.errorhandler(TaskDataError)
    def task_error(err: TaskDataError):
        return jsonify(error=str(err), task=err.task_id), 422

    @app.errorhandler(LabelConfigError)
    def config_error(err: LabelConfigError):
        return jsonify(error=f"label config does not fit: {err}"), 422

    @app.errorhandler(EventError)
    def event_error(err: EventError):
        return jsonify(error=str(err)), 400

    @app.errorhandler(RegistryError)
    def registry_error(err: RegistryError):
        return jsonify(error=str(err)), 404

    @app.errorhandler(ValueError)
    def value_error(err: ValueError):
        return jsonify(error=str(err)), 400

    @app.errorhandler(TimeoutError)
    def still_loading(err: TimeoutError):
        return jsonify(error=str(err)), 503

    @app.get("/")
    @app.get("/health")
    def health():
        state = "loaded" if holder.ready else ("failed" if holder.load_error else "loading")
        body = {"status": "UP", "model_class": "RLHFBackend", "models": state}
        if holder.ready:
            body["model_version"] = holder.get().model_version
        if holder.load_error:
            body["error"] = holder.load_error
        return jsonify(body)

    @app.post("/setup")
    def setup():
        return jsonify(backend.setup(_json_object()))

    @app.post("/predict")
    def predict():
        payload = _json_object()
        tasks = payload.get("tasks")
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            raise BadRequest('"tasks" must be a list of task objects')
        label_config = payload.get("label_config")
        if not isinstance(label_config, str) or not label_config.strip():
            raise BadRequest('"label_config" (the project\'s labeling config XML) is missing')
        params = payload.get("params") or {}
        context = params.get("context") if isinstance(params, dict) else None
        results = backend.predict(
            tasks, label_config, context=context, project=payload.get("project")
        )
        version = results[0]["model_version"] if results else holder.get(timeout=0.1).model_version
        return jsonify(results=results, model_version=version)

    @app.post("/webhook")
    def webhook():
        payload = _json_object()
        action = payload.get("action")
        if not isinstance(action, str):
            raise BadRequest(
                'a webhook body needs an "action" such as "ANNOTATION_CREATED" or "START_TRAINING"'
            )
        return jsonify(backend.fit(action, payload)), 201

    @app.post("/train")
    def train_legacy():
        """Label Studio's legacy training call: recorded like the "Start Training" button."""
        payload = _json_object()
        recorded = backend.fit("START_TRAINING", {"project": payload.get("project")})
        return jsonify(job=recorded.get("job"), event=recorded["event_id"]), 201

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        registry = holder.registry
        payload = request.get_json(silent=True) if request.method == "POST" else None
        if isinstance(payload, dict) and payload.get("kind") and payload.get("version"):
            promoted = registry.promote(str(payload["kind"]), str(payload["version"]))
            holder.refresh_soon()
            log.info("promoted %s through /versions", promoted.label)
        served = holder.get(timeout=0.1).model_version if holder.ready else None
        listing = {
            kind: [v.label for v in registry.versions(kind)] for kind in ("policy", "reward")
        }
        current = {
            kind: (v.label if (v := registry.current(kind)) else None)
            for kind in ("policy", "reward")
        }
        names = [served] if served else []
        return jsonify(
            versions=names + listing["reward"] + listing["policy"],
            current=current,
            served=served,
            all=listing,
        )

    @app.get("/jobs")
    def jobs():
        project = request.args.get("project", type=int)
        return jsonify(jobs=[job.as_dict() for job in trainer.store.jobs(project)])

    @app.get("/jobs/<int:job_id>")
    def job(job_id: int):
        found = trainer.store.get(job_id)
        if found is None:
            raise BadRequest(f"no job {job_id}; GET /jobs lists them", status=404)
        return jsonify(found.as_dict())

    @app.get("/predictions/progress")
    def prediction_progress():
        return jsonify(jobs=[job.as_dict() for job in backend.deliveries.values()])

    @app.get("/metrics")
    def metrics():
        lines = [
            "# HELP ls_rlhf_up 1 when the models are loaded.",
            "# TYPE ls_rlhf_up gauge",
            f"ls_rlhf_up {1 if holder.ready else 0}",
            f"ls_rlhf_uptime_seconds {time.time() - started_at:.1f}",
        ]
        for name, value in backend.stats.items():
            kind = "counter"
            lines += [f"# TYPE ls_rlhf_{name}_total {kind}", f"ls_rlhf_{name}_total {value}"]
        lines.append(f"ls_rlhf_events_recorded_total {events.last_id()}")
        running = sum(1 for job in backend.deliveries.values() if job.state == "running")
        lines.append(f"ls_rlhf_prediction_deliveries_running {running}")
        if holder.ready:
            lines.append(f'ls_rlhf_model_info{{model_version="{holder.get().model_version}"}} 1')
        return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")

    return app


def _json_object() -> dict[str, Any]:
    payload = request.get_json(silent=True)
    if payload is None:
        raise BadRequest("the body must be JSON (Content-Type: application/json)")
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object")
    return payload


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
