"""The body of a training job: pull the export, build pairs, train, version, serve.

The webhook that triggered the job is not read here: the data comes from Label Studio's
export API with the configured key, so a forged webhook can at most cause a run on the
project's real annotations.

Step budget: the first reward model trains for `RewardTrainingConfig`'s default epochs
(stopping early on its validation split); later runs warm-start from the served version on
the pairs it has not learned from plus as many replayed ones (`new_and_replayed`: each
version lists the pairs it trained on), one pass of at most `LOOP_MAX_STEPS` steps, which is
what keeps the time from annotation to served version short (see bench/loop.py).
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from datasets import Dataset

from ml_backend.overoptimization import alarm_reasons, live_accuracy, previous_live_accuracy
from ml_backend.scheduler import Job, JobStore, execute_job
from training.datasets import HELD_OUT_FRACTION, MIN_PAIRS, preference_dataset, split_by_prompt
from training.distributed import on_main_process
from training.export import prompts_from_tasks, pull_export
from training.feedback import parse_export
from training.models import resolve_reward_backbone
from training.registry import Registry, lineage
from training.reward import RewardTrainingConfig, pair_key, train_reward, trained_pairs
from training.reward_probe import is_probe
from training.settings import Settings

log = logging.getLogger(__name__)

LOOP_MAX_STEPS = 12
REPLAY_MIN = 32


def run_training(
    settings: Settings,
    job: Job,
    progress: Callable[[float, str], None],
    access: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Train a reward version on the project's annotations, then the policy step and the
    next round of tasks as the settings ask; returns the job's metrics. With a training
    launcher set, the training (reward version and policy step) runs in the processes it
    starts; pulling the export and writing the next round stay in this one."""
    url, key = settings.label_studio_url, settings.label_studio_api_key
    if not key and access:
        url, key = access
    progress(0.02, "pulling annotations from Label Studio")
    tasks, config = pull_export(
        url,
        key,
        job.project_id,
        attempts=settings.export_attempts,
        backoff=settings.export_backoff_seconds,
        request_timeout=settings.label_studio_timeout_seconds,
    )
    if settings.training_launcher:
        metrics = launched_training(settings, job, tasks, config, progress)
    else:
        metrics = train_on_export(settings, job, tasks, config, progress)
    if "policy_version" in metrics and settings.next_round > 0:
        progress(0.98, "generating the next round of tasks")
        registry = lineage(settings.registry_dir, job.project_id, claim=True)
        prompts = loop_prompts(settings, tasks, config)
        created = next_round(settings, url, key, job.project_id, config, prompts, registry, tasks)
        metrics["next_round_tasks"] = created
        metrics["message"] += f"; {created} new tasks from it"
    return metrics


PROGRESS_PREFIX = "ls-rlhf-progress "


def launched_training(
    settings: Settings,
    job: Job,
    tasks: list[dict[str, Any]],
    config: str,
    progress: Callable[[float, str], None],
) -> dict[str, Any]:
    """`train_on_export` in the processes that `settings.training_launcher` starts (for
    instance `accelerate launch --config_file docker/accelerate-ddp.yaml`: every GPU of
    the node). The export and the job go to them in a private scratch file; the main
    process reports progress on its stdout and writes the metrics back."""
    import json
    import shlex
    import subprocess
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory(prefix="ls-rlhf-job-") as scratch:  # mode 0700
        request, result = Path(scratch) / "request.json", Path(scratch) / "metrics.json"
        request.write_text(
            json.dumps(
                {"job": job.as_dict(), "tasks": tasks, "config": config, "metrics": str(result)}
            )
        )
        command = [*shlex.split(settings.training_launcher), "-m", __spec__.name, str(request)]
        log.info("job %d: training through %s", job.id, settings.training_launcher)
        with open(Path(scratch) / "stderr.log", "w+") as errors:
            try:
                process = subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=errors, text=True, env=settings.to_env()
                )
            except OSError as err:
                raise RuntimeError(
                    f"LS_RLHF_TRAINING_LAUNCHER could not start ({err}): set it to a command "
                    "on this machine's PATH, e.g. 'accelerate launch --config_file FILE'"
                ) from None
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    fraction, message = json.loads(line[len(PROGRESS_PREFIX) :])
                    progress(fraction, message)
                else:
                    log.debug("launched: %s", line.rstrip())
            code = process.wait()
            if code != 0 or not result.is_file():
                errors.seek(0)
                tail = errors.read()[-3000:]
                raise RuntimeError(
                    f"the training launched with {settings.training_launcher!r} exited with "
                    f"{code}; its last output:\n{tail}"
                )
        return json.loads(result.read_text())


def _launched(request_path: str) -> None:
    """One process of a launched training (`python -m ml_backend.training_job REQUEST`)."""
    import json
    from pathlib import Path

    from training.distributed import is_main_process

    logging.basicConfig(level=logging.INFO if is_main_process() else logging.WARNING)
    request = json.loads(Path(request_path).read_text())
    main = is_main_process()

    def progress(fraction: float, message: str) -> None:
        if main:
            print(PROGRESS_PREFIX + json.dumps([fraction, message]), flush=True)

    metrics = train_on_export(
        Settings.from_env(), Job(**request["job"]), request["tasks"], request["config"], progress
    )
    if main:
        Path(request["metrics"]).write_text(json.dumps(metrics))


def train_on_export(
    settings: Settings,
    job: Job,
    tasks: list[dict[str, Any]],
    config: str,
    progress: Callable[[float, str], None],
) -> dict[str, Any]:
    """The training of a job on its pulled export: a reward version, and after a promoted
    one the policy step; returns the job's metrics. Under `accelerate launch` every process
    runs it alike (the splits are seeded); versions are written by the main process."""
    parsed = parse_export(tasks, config)
    pairs = preference_dataset(parsed.records)
    summary = {"tasks": len(tasks), "pairs": len(pairs), "problems": len(parsed.problems)}
    if len(pairs) < MIN_PAIRS:
        return {
            "message": f"{len(pairs)} preference pairs: at least {MIN_PAIRS} are needed to train",
            **summary,
        }
    split = split_by_prompt(pairs, HELD_OUT_FRACTION, seed=settings.seed)
    # The project's own lineage: its warm start, promotion gate and served version.
    registry = lineage(settings.registry_dir, job.project_id, claim=True)
    # Before training: the served proxy on the labels of the served policy's answers.
    live = live_accuracy(tasks, config, registry) if settings.loop_policy == "ppo" else {}
    summary.update(live)
    warm = registry.current("reward") is not None
    train_config = RewardTrainingConfig(
        method=settings.reward_method,
        seed=settings.seed,
        warm_start=warm,
        promote=settings.reward_promote,
    )
    if settings.reward_max_steps > 0:
        train_config.max_steps = settings.reward_max_steps
    fit = split["train"]
    current = registry.current("reward")
    # A probe refits on every pair in seconds (it reads only the new answers); fine-tuning
    # takes a few steps on the new pairs and a replayed sample of the old.
    if warm and current is not None and not is_probe(current.path):
        fit = new_and_replayed(fit, trained_pairs(current.path), settings.seed)
        groups = len(set(fit["prompt"]))  # a step takes whole prompt groups
        steps_per_epoch = math.ceil(groups / train_config.per_device_train_batch_size)
        train_config.max_steps = min(steps_per_epoch, LOOP_MAX_STEPS)
        train_config.eval_steps = 0  # judged once at the end, against the served version
    progress(0.1, "training the reward model")
    result = train_reward(
        fit,
        split["test"],
        registry,
        resolve_reward_backbone(settings.reward_backbone),
        train_config,
        data_info={
            "source": f"project {job.project_id}",
            "job": job.id,
            "covers_event_id": job.covers_event_id,
        },
        progress=lambda fraction: progress(0.1 + 0.85 * fraction, "training the reward model"),
    )
    verdict = (
        "promoted" if result.promoted else "kept the served version (not better on held-out pairs)"
    )
    metrics = {
        "message": f"{result.version.label}: {verdict}",
        "reward_version": result.version.label,
        "promoted": result.promoted,
        **summary,
        **{k: v for k, v in result.metrics.items() if v is not None},
    }
    if result.promoted and settings.loop_policy != "none":
        progress(0.96, f"policy step ({settings.loop_policy})")
        prompts = loop_prompts(settings, tasks, config)
        policy = policy_step(settings, registry, prompts, split["train"], job, live)
        metrics.update(policy)
        metrics["message"] += f"; {policy['policy_version']} trained with {settings.loop_policy}"
        if policy.get("alarm"):
            metrics["message"] += f" and NOT served: {'; '.join(policy['alarm'])}"
    return metrics


def new_and_replayed(pairs: Dataset, seen: set[str], seed: int) -> Dataset:
    """The pairs a warm start trains on: every pair the served version has not learned from,
    and as many of the ones it has (at least REPLAY_MIN), drawn at random, so that the new
    annotations are always in the few steps a loop run takes and the old are not forgotten.
    A served version that recorded nothing (older than this rule) gets all pairs."""
    keys = [
        pair_key(*row)
        for row in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True)
    ]
    new = [i for i, key in enumerate(keys) if key not in seen]
    old = [i for i, key in enumerate(keys) if key in seen]
    if not seen or not new:
        return pairs
    replay = random.Random(seed).sample(old, min(len(old), max(len(new), REPLAY_MIN)))
    log.info("warm start on %d new pairs and %d replayed ones", len(new), len(replay))
    return pairs.select(sorted(new + replay))


def policy_step(
    settings: Settings,
    registry: Registry,
    prompts: list[str],
    pairs,
    job: Job,
    live: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the policy after a promoted reward version: PPO against it, or DPO on the pairs.
    A PPO version is served only if the overoptimization alarm stays quiet (`live`: the
    proxy's accuracy on fresh labels, ml_backend/overoptimization.py)."""
    from training.models import resolve_policy

    current = registry.current("policy")
    start = (
        str(current.path)
        if current
        else resolve_policy(settings.policy_model, settings.models_cache_dir)
    )
    metadata: dict[str, Any] = {"parent": current.name if current else None, "job": job.id}
    if settings.loop_policy == "dpo":
        from training.preference import DPOSettings, train_dpo

        version = train_dpo(
            pairs,
            registry,
            start,
            DPOSettings(max_steps=settings.loop_policy_updates),
            metadata={**metadata, "started_from": start},
        )
        return {
            "policy_version": version.label,
            "policy_train_loss": version.metadata["metrics"]["train_loss"],
        }
    from training.engine import engine_from_settings
    from training.ppo import PPOConfig, train_policy_version
    from training.reward import RewardModel

    reward_version = registry.current("reward")
    if reward_version is None:  # the step follows a promoted reward version
        raise RuntimeError("no current reward version to train the policy against")
    # As `ls-rlhf train ppo` runs it (PPOConfig's defaults, the loop's number of updates),
    # through the same function; the KL anchor is the base policy in every round, not the
    # round's starting point, so that rounds in a row cannot drift from it without bound.
    live = live or {}
    previous = previous_live_accuracy(registry)
    version, history = train_policy_version(
        registry,
        start,
        prompts,
        RewardModel.load(reward_version.path).score,
        PPOConfig(
            updates=settings.loop_policy_updates,
            batch_size=settings.loop_policy_batch_size,
            learning_rate=settings.loop_policy_learning_rate,
            seed=settings.seed,
        ),
        {**metadata, "reward_version": reward_version.label, **live},
        reference=resolve_policy(settings.policy_model, settings.models_cache_dir),
        promote=False,  # only once the alarm below has nothing to say
        engine=engine_from_settings(settings),
    )
    first, last = history[0]["objective/score"], history[-1]["objective/score"]
    kl = history[-1]["objective/kl"]
    alarm = alarm_reasons(
        live, previous, first, last, kl, settings.loop_max_kl, settings.loop_alarm_accuracy_drop
    )
    if alarm:
        log.warning("overoptimization alarm: %s not served (%s)", version.label, "; ".join(alarm))
    else:  # once, by the main process, when the step runs under `accelerate launch`
        on_main_process(lambda: registry.promote("policy", version.name))
    return {
        "policy_version": version.label,
        "policy_promoted": not alarm,
        "alarm": alarm,
        "previous_live_accuracy": previous,
        "policy_score_first": first,
        "policy_score_last": last,
        "policy_kl_to_base": kl,
    }


def loop_prompts(settings: Settings, tasks: list[dict[str, Any]], config: str) -> list[str]:
    """The prompts the loop writes its next rounds from and trains the policy on: the
    LS_RLHF_LOOP_PROMPTS file's, or else the project's own tasks'."""
    if not settings.loop_prompts:
        return prompts_from_tasks(tasks, config)
    from ml_backend.tasks import read_prompts

    return list(dict.fromkeys(read_prompts(settings.loop_prompts)))


def least_asked(prompts: list[str], tasks: list[dict[str, Any]], config: str, n: int) -> list[str]:
    """`n` prompts, those the project's tasks ask least first (in the prompts' order among
    equals), so that rounds in a row ask about new prompts before they repeat one; with
    fewer than `n` prompts, they repeat in turn."""
    from training.label_config import read_schema

    field = read_schema(config).prompt_field
    asked = Counter((task.get("data") or {}).get(field) for task in tasks)
    order = sorted(range(len(prompts)), key=lambda i: (asked[prompts[i]], i))
    return [prompts[order[i % len(order)]] for i in range(n)]


def next_round(
    settings: Settings,
    url: str,
    key: str,
    project_id: int,
    config: str,
    prompts: list[str],
    registry: Registry,
    tasks: list[dict[str, Any]] | None = None,
) -> int:
    """New comparison tasks from the current policy (InstructGPT's steps two and three
    repeat), for the prompts the project's `tasks` ask least."""
    import time

    from ml_backend.serving import Served
    from ml_backend.tasks import make_tasks
    from training.label_config import read_schema
    from training.label_studio_client import client as label_studio_client
    from training.models import load_causal_lm, resolve_policy

    # The served policy writes: the new one, or (the alarm kept it out) the one before it.
    version = registry.current("policy")
    path = (
        str(version.path)
        if version
        else resolve_policy(settings.policy_model, settings.models_cache_dir)
    )
    chosen = least_asked(prompts, tasks or [], config, settings.next_round)
    model, tokenizer = load_causal_lm(path, dtype=settings.dtype)
    # The tasks are written as `ls-rlhf generate` writes them (tasks.make_tasks), by this
    # policy; no reward model is needed to write them.
    writer = Served(model, tokenizer, version, None, None, time.time())
    tasks = [{"data": data} for data in make_tasks(chosen, read_schema(config), writer, settings)]
    # The SDK types the request as its own models; it sends plain task dicts as they are.
    label_studio_client(url=url, api_key=key).projects.import_tasks(
        id=project_id,
        request=tasks,  # type: ignore[arg-type]
    )
    return len(tasks)


def run_queued_job(job_id: int, access: tuple[str, str] | None = None) -> None:
    """Entry point of `ls-rlhf worker` (RQ): run one job from the shared job store.

    `access` is the Label Studio URL and token that /setup gave the backend which queued
    the job (the in-process path passes the same to `run_training`): without an API key
    setting, it is how the worker reaches Label Studio. RQ logs the job's description, not
    its arguments, and the backend sets a description without them.
    """
    import os

    settings = Settings.from_env()
    store = JobStore(settings.state_dir / "jobs.sqlite3")
    job = store.claim(f"{os.getpid()}@{os.uname().nodename}", job_id=job_id)
    if job is None:
        log.info("job %d is not runnable now (done, or its project has a run going)", job_id)
        return
    given = (access[0], access[1]) if access else None  # a list, if it went through JSON
    execute_job(store, job, lambda j, progress: run_training(settings, j, progress, given))


if __name__ == "__main__":
    import sys

    from training.distributed import leave_process_group

    try:
        _launched(sys.argv[1])
    finally:
        leave_process_group()
