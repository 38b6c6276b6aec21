"""What the backend does, apart from HTTP: `setup`, `predict(tasks, context)`, `fit(event, data)`.

The shape follows label-studio-ml's `LabelStudioMLBase` so its users feel at home, but the
models are loaded once per process (`ModelHolder`), `/setup` never loads anything, and
`fit` only records the event: training happens in a worker.

`predict` works through the tasks in batches (generation and scoring are batched across
tasks) until its time budget runs out, then answers with what is ready. The remaining
tasks get an item without `result` (Label Studio skips those) and are finished in a
background thread that posts their predictions through Label Studio's API; their
progress is visible at `/predictions/progress`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ml_backend.events import EventLog, parse_project_id, project_id_of
from ml_backend.results import (
    Answer,
    InputError,
    TaskDataError,
    build_prediction,
    describe_type,
    suggestion_withheld,
    task_answers,
    task_prompt,
)
from ml_backend.sampling import VersionFollower
from ml_backend.serving import ModelHolder, Served, model_version_of
from training.generation import generate_completions
from training.label_config import LabelConfigError, Schema, read_schema
from training.label_studio_client import client as label_studio_client
from training.registry import Registry
from training.settings import Settings

if TYPE_CHECKING:
    from ml_backend.scheduler import JobScheduler

log = logging.getLogger(__name__)


@dataclass
class DeliveryJob:
    """Predictions finished after /predict answered, posted to Label Studio."""

    id: str
    project_id: int | None
    total: int
    model_version: str
    done: int = 0
    delivered: int = 0
    state: str = "running"  # running | done | failed
    error: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class _Prepared:
    task: dict
    prompt: str
    answers: list[Answer]


class RLHFBackend:
    def __init__(
        self, settings: Settings, holder: ModelHolder, events: EventLog | None = None
    ) -> None:
        self.settings = settings
        self.holder = holder
        self.events = events
        self.deliveries: dict[str, DeliveryJob] = {}
        self.scheduler: JobScheduler | None = None  # set by the app
        # What Label Studio told /setup per project: where it is and a token to call it back.
        self.label_studio_access: dict[int, tuple[str, str]] = {}
        # Keeps each project's model_version (what uncertainty sampling reads) on the version
        # its own lineage serves.
        self.follower = VersionFollower(
            self._label_studio_client,
            lambda project: holder.model_version_for(project) if holder.ready else None,
        )
        self.stats = {
            "predict_requests": 0,
            "predicted_tasks": 0,
            "predict_seconds": 0.0,
            "webhook_events": 0,
        }
        self._stats_lock = threading.Lock()

    # -- /setup ---------------------------------------------------------------------------

    def setup(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Fast: reads the registry's pointers only. Checks the config if one is sent.
        Every field is checked before anything is changed (promotions, access, connection)."""
        project_id = None
        if payload.get("project") is not None:
            project_id = parse_project_id(payload["project"])
        for name in ("schema", "hostname", "access_token", "model_version"):
            value = payload.get(name)
            if value is not None and not isinstance(value, str):
                raise InputError(
                    f'"{name}" is {describe_type(value)}, not text; '
                    + (
                        "send the project's labeling config XML"
                        if name == "schema"
                        else f'send "{name}" as a string, or leave it out'
                    ),
                    name,
                )
        schema_xml = payload.get("schema")
        if schema_xml:
            try:
                read_schema(schema_xml)  # LabelConfigError names what is missing
            except LabelConfigError as err:
                raise InputError(
                    f'"schema", the label config, does not fit: {err}', "schema", 422
                ) from None
        wanted = self._versions_to_promote(payload.get("extra_params"))
        # The project's own lineage; connecting claims the registry root if it has no owner
        # yet, once the versions named are known to exist (a refused /setup changes nothing).
        self._promote(wanted, self.holder.registry_for(project_id))
        registry = self.holder.registry_for(project_id, claim=True)
        hostname, token = payload.get("hostname"), payload.get("access_token")
        if project_id is not None:
            if self.events is not None:
                self.events.connect(project_id, "/setup")
            if hostname and token:
                self.label_studio_access[project_id] = (hostname, token)
            self.follower.know(project_id)
        if model_version_of(registry) != self.holder.model_version_for(project_id):
            self.holder.refresh_soon()
        return {"model_version": self.holder.model_version_for(project_id)}

    @staticmethod
    def _versions_to_promote(extra_params: Any) -> dict[str, str]:
        """Label Studio's "extra params" of the backend (an object, or JSON text of one):
        the versions to promote, {"reward": "v2"}; InputError for a wrong type."""
        example = 'e.g. {"reward_version": "v2"}'
        if isinstance(extra_params, str):
            if not extra_params.strip():
                return {}
            try:
                extra_params = json.loads(extra_params)
            except json.JSONDecodeError:
                raise InputError(
                    f'"extra_params" is not valid JSON: send a JSON object, {example}',
                    "extra_params",
                ) from None
            if extra_params is None:
                return {}
        if extra_params is None:
            return {}
        if not isinstance(extra_params, dict):
            raise InputError(
                f'"extra_params" is {describe_type(extra_params)}, not an object: send a JSON '
                f"object, {example}",
                "extra_params",
            )
        versions = {}
        for kind in ("reward", "policy"):
            wanted = extra_params.get(f"{kind}_version")
            if wanted is None or wanted == "":
                continue
            if not isinstance(wanted, str):
                raise InputError(
                    f'"extra_params.{kind}_version" is {describe_type(wanted)}, not text: name a '
                    f'version such as "v2" (`ls-rlhf versions list`)',
                    f"extra_params.{kind}_version",
                )
            versions[kind] = wanted
        return versions

    def _promote(self, versions: dict[str, str], registry: Registry) -> None:
        """Promote the versions named in the backend's extra params, {"reward": "v2",
        "policy": "v1"} (a rollback is promoting an older one), in the project's lineage."""
        for kind in ("reward", "policy"):
            wanted = versions.get(kind)
            if wanted:
                current = registry.current(kind)
                if current is None or current.name != wanted:
                    registry.promote(kind, str(wanted))
                    log.info("promoted %s-%s through extra_params", kind, wanted)

    # -- /predict -------------------------------------------------------------------------

    def predict(
        self,
        tasks: list[dict[str, Any]],
        label_config: str,
        context: dict[str, Any] | None = None,
        project: Any = None,
        budget_seconds: float | None = None,
    ) -> list[dict[str, Any]]:
        """Exactly one prediction item per task, in order."""
        started = time.monotonic()
        budget = self.settings.predict_budget_seconds if budget_seconds is None else budget_seconds
        schema = read_schema(label_config)
        prepared = []
        for index, task in enumerate(tasks):  # all validated before any work
            try:
                prepared.append(self._prepare(task, schema))
            except TaskDataError as err:
                err.field = f"tasks[{index}].{err.field}"
                raise
        project_id = project_id_of(project)
        if project_id is not None:
            if self.events is not None:
                self.events.connect(project_id, "/predict")
            self.holder.registry_for(project_id, claim=True)
        # One snapshot for the whole request: a swap meanwhile never mixes two versions.
        served = self.holder.get(timeout=max(1.0, budget), project=project_id)
        items: list[dict[str, Any]] = []
        step = max(1, self.settings.generation_batch_size)
        for start in range(0, len(prepared), step):
            if items and time.monotonic() - started > budget:
                break
            items.extend(self._predict_batch(prepared[start : start + step], schema, served))
        rest = prepared[len(items) :]
        if rest:
            job = self._deliver_later(rest, schema, served, project_id)
            items.extend({"model_version": served.model_version} for _ in rest)
            log.info(
                "predict: answered %d tasks in time, %d more follow as job %s",
                len(items) - len(rest),
                len(rest),
                job.id,
            )
        if len(rest) < len(items):
            self.follower.predictions_made(project_id, served.model_version)
        with self._stats_lock:
            self.stats["predict_requests"] += 1
            self.stats["predicted_tasks"] += len(tasks) - len(rest)
            self.stats["predict_seconds"] += time.monotonic() - started
        return items

    def _prepare(self, task: dict[str, Any], schema: Schema) -> _Prepared:
        prompt = task_prompt(task, schema, self.settings.max_prompt_chars)
        answers = [] if schema.kind == "demonstration" else task_answers(task, schema)
        return _Prepared(task, prompt, answers)

    def _predict_batch(
        self, batch: list[_Prepared], schema: Schema, served: Served
    ) -> list[dict[str, Any]]:
        with self.holder.compute_lock:
            drafts: list[str | None] = [None] * len(batch)
            if schema.answer_box:
                completions = generate_completions(
                    served.policy,
                    served.tokenizer,
                    [p.prompt for p in batch],
                    num_completions=1,
                    max_new_tokens=self.settings.max_new_tokens,
                    temperature=self.settings.temperature,
                    top_p=self.settings.top_p,
                    batch_size=len(batch),
                )
                drafts = [c[0] for c in completions]
            rewards: list[list[float] | None] = [None] * len(batch)
            if served.reward is not None:
                pairs = [(p.prompt, a.text) for p in batch for a in p.answers]
                if pairs:
                    flat = served.reward.score([q for q, _ in pairs], [a for _, a in pairs])
                    offset = 0
                    for i, p in enumerate(batch):
                        rewards[i] = flat[offset : offset + len(p.answers)]
                        offset += len(p.answers)
        reward_label = served.reward_version.label if served.reward_version else None
        return [
            build_prediction(
                schema,
                p.answers,
                r,
                served.model_version,
                reward_label,
                draft=d,
                withhold=suggestion_withheld(
                    p.task.get("id"), self.settings.withhold_suggestion_share, self.settings.seed
                ),
            )
            for p, r, d in zip(batch, rewards, drafts, strict=True)
        ]

    def _deliver_later(
        self, rest: list[_Prepared], schema: Schema, served: Served, project_id: int | None
    ) -> DeliveryJob:
        job = DeliveryJob(uuid.uuid4().hex[:12], project_id, len(rest), served.model_version)
        self.deliveries[job.id] = job
        threading.Thread(
            target=self._deliver, args=(job, rest, schema, served), daemon=True
        ).start()
        return job

    def _deliver(
        self, job: DeliveryJob, rest: list[_Prepared], schema: Schema, served: Served
    ) -> None:
        try:
            client = self._label_studio_client(job.project_id)
            step = max(1, self.settings.generation_batch_size)
            for start in range(0, len(rest), step):
                batch = rest[start : start + step]
                for prepared, item in zip(
                    batch, self._predict_batch(batch, schema, served), strict=True
                ):
                    job.done += 1
                    if client is not None and item.get("result"):
                        client.predictions.create(
                            task=prepared.task["id"],
                            result=item["result"],
                            score=item.get("score"),
                            model_version=item["model_version"],
                        )
                        job.delivered += 1
            if client is None:
                job.state, job.error = (
                    "failed",
                    (
                        "finished, but could not deliver: set LS_RLHF_LABEL_STUDIO_URL and "
                        "LS_RLHF_LABEL_STUDIO_API_KEY so the backend can post predictions"
                    ),
                )
            else:
                job.state = "done"
                if job.delivered:
                    self.follower.predictions_made(job.project_id, job.model_version)
        except Exception as err:
            log.exception("delivering predictions failed")
            job.state, job.error = "failed", f"{type(err).__name__}: {err}"
        finally:
            job.finished_at = time.time()

    def _label_studio_client(self, project_id: int | None):
        if self.settings.label_studio_api_key:
            return label_studio_client(self.settings)
        if project_id in self.label_studio_access:
            hostname, token = self.label_studio_access[project_id]
            return label_studio_client(url=hostname, api_key=token)
        return None

    # -- /webhook ---------------------------------------------------------------------------

    def is_connected(self, project_id: int) -> bool:
        """Whether Label Studio connected this project to the backend (its /setup or
        /predict), or the backend trained for it before (a registry from before this rule)."""
        if self.events is not None and self.events.is_connected(project_id):
            return True
        return self.scheduler is not None and bool(self.scheduler.store.jobs(project_id, limit=1))

    def fit(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """Record the event; training is started by the worker, outside this request."""
        if self.events is None:
            raise RuntimeError("this backend has no event log")
        recorded = self.events.record({**data, "action": event})
        with self._stats_lock:
            self.stats["webhook_events"] += 1
        answer: dict[str, Any] = {
            "status": "recorded",
            "event_id": recorded.id,
            "action": recorded.action,
        }
        if recorded.project_id is not None and not self.is_connected(recorded.project_id):
            answer["job"] = None
            answer["note"] = (
                f"project {recorded.project_id} never connected to this backend (Label Studio "
                "calls /setup when the backend is added to a project): the event is recorded, "
                "and starts no training"
            )
            log.warning(
                "event %d for unconnected project %d: no training", recorded.id, recorded.project_id
            )
            return answer
        if self.scheduler is not None:
            job = self.scheduler.on_event(recorded)
            if job is not None:
                answer["job"] = job.id
        return answer
