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

from ml_backend.events import EventLog, project_id_of
from ml_backend.results import Answer, build_prediction, task_answers, task_prompt
from ml_backend.serving import ModelHolder, Served, model_version_of
from training.generation import generate_completions
from training.label_config import Schema, read_schema
from training.settings import Settings

if TYPE_CHECKING:
    from ml_backend.jobs import Trainer

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
        self.trainer: Trainer | None = None  # set by the app
        # What Label Studio told /setup per project: where it is and a token to call it back.
        self.label_studio_access: dict[int, tuple[str, str]] = {}
        self.stats = {
            "predict_requests": 0,
            "predicted_tasks": 0,
            "predict_seconds": 0.0,
            "webhook_events": 0,
        }
        self._stats_lock = threading.Lock()

    # -- /setup ---------------------------------------------------------------------------

    def setup(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Fast: reads the registry's pointers only. Checks the config if one is sent."""
        schema_xml = payload.get("schema")
        if schema_xml:
            read_schema(schema_xml)  # LabelConfigError names what is missing
        project_id = project_id_of(payload.get("project"))
        self._pin_versions(payload.get("extra_params"))
        hostname, token = payload.get("hostname"), payload.get("access_token")
        if project_id is not None and hostname and token:
            self.label_studio_access[project_id] = (hostname, token)
        if model_version_of(self.holder.registry) != self.holder.model_version:
            self.holder.refresh_soon()
        return {"model_version": self.holder.model_version}

    def _pin_versions(self, extra_params: Any) -> None:
        """Label Studio's "extra params" of the backend can pin versions:
        {"reward_version": "v2", "policy_version": "v1"} (a rollback is pinning an older one)."""
        if isinstance(extra_params, str) and extra_params.strip():
            try:
                extra_params = json.loads(extra_params)
            except json.JSONDecodeError:
                raise ValueError(
                    'extra_params must be JSON, e.g. {"reward_version": "v2"}'
                ) from None
        if not isinstance(extra_params, dict):
            return
        registry = self.holder.registry
        for kind in ("reward", "policy"):
            wanted = extra_params.get(f"{kind}_version")
            if wanted:
                current = registry.current(kind)
                if current is None or current.name != wanted:
                    registry.promote(kind, str(wanted))
                    log.info("pinned %s-%s through extra_params", kind, wanted)

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
        prepared = [self._prepare(task, schema) for task in tasks]  # all validated before any work
        served = self.holder.get(timeout=max(1.0, budget))
        items: list[dict[str, Any]] = []
        step = max(1, self.settings.generation_batch_size)
        for start in range(0, len(prepared), step):
            if items and time.monotonic() - started > budget:
                break
            items.extend(self._predict_batch(prepared[start : start + step], schema, served))
        rest = prepared[len(items) :]
        if rest:
            job = self._deliver_later(rest, schema, served, project_id_of(project))
            items.extend({"model_version": served.model_version} for _ in rest)
            log.info(
                "predict: answered %d tasks in time, %d more follow as job %s",
                len(items) - len(rest),
                len(rest),
                job.id,
            )
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
            build_prediction(schema, p.answers, r, served.model_version, reward_label, draft=d)
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
        except Exception as err:
            log.exception("delivering predictions failed")
            job.state, job.error = "failed", f"{type(err).__name__}: {err}"
        finally:
            job.finished_at = time.time()

    def _label_studio_client(self, project_id: int | None):
        from label_studio_sdk import LabelStudio

        if self.settings.label_studio_api_key:
            return LabelStudio(
                base_url=self.settings.label_studio_url, api_key=self.settings.label_studio_api_key
            )
        if project_id in self.label_studio_access:
            hostname, token = self.label_studio_access[project_id]
            return LabelStudio(base_url=hostname, api_key=token)
        return None

    # -- /webhook ---------------------------------------------------------------------------

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
        if self.trainer is not None:
            job = self.trainer.on_event(recorded)
            if job is not None:
                answer["job"] = job.id
        return answer
