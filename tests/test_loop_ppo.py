"""The loop's policy step and its queued jobs: PPO as `train ppo` runs it, anchored at the
base policy across rounds; RQ jobs reaching Label Studio with what /setup gave."""

from __future__ import annotations

from dataclasses import asdict

import requests
import torch
from conftest import add_reward_version, run_burst_worker
from test_reliability import _project_with_annotations, redis_url  # noqa: F401 - a fixture

from ml_backend.harness.waiting import wait_until
from ml_backend.scheduler import Job
from ml_backend.training_job import policy_step
from training.finegrained import load_finegrained, to_label_studio_tasks
from training.models import load_causal_lm
from training.ppo import PPOConfig
from training.registry import Registry

PROMPTS = [f"prompt number {i}" for i in range(8)]


def a_job() -> Job:
    return Job(1, 1, "running", "test", 0, 0.0, None, None, 0.0, "", {}, 1)


def test_the_loop_trains_ppo_as_train_ppo_does(settings, tiny_reward_backbone_dir):
    settings = settings.replace(loop_policy="ppo", loop_policy_updates=1)
    add_reward_version(settings, tiny_reward_backbone_dir)
    registry = Registry(settings.registry_dir)
    metrics = policy_step(settings, registry, PROMPTS, None, a_job())
    version = registry.current("policy")
    assert metrics["policy_version"] == version.label
    # PPOConfig's defaults, as `ls-rlhf train ppo` without flags; only the number of updates
    # is the loop's own setting
    assert version.metadata["config"] == asdict(PPOConfig(updates=1, seed=settings.seed))


def test_the_loops_kl_anchor_stays_at_the_base_policy(settings, tiny_reward_backbone_dir):
    # The served policy has moved away from the base (an earlier round, here made by noise):
    # the next round starts from it, but its KL terms still hold it to the base.
    settings = settings.replace(loop_policy="ppo", loop_policy_updates=1)
    add_reward_version(settings, tiny_reward_backbone_dir)
    registry = Registry(settings.registry_dir)
    moved, tokenizer = load_causal_lm(settings.policy_model)
    torch.manual_seed(0)
    with torch.no_grad():
        moved.get_input_embeddings().weight.add_(
            torch.randn_like(moved.get_input_embeddings().weight)
        )
    with registry.stage("policy") as staged:
        moved.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        registry.commit("policy", staged, {"note": "an earlier round"}, promote=True)
    metrics = policy_step(settings, registry, PROMPTS, None, a_job())
    version = registry.current("policy")
    assert version.metadata["parent"] == "v1"
    # KL to the base from the first rollout on (a round anchored at its own start: ~0)
    assert version.metadata["history"][0]["objective/kl"] > 1.0
    assert version.metadata["reference"] == settings.policy_model  # the base
    assert metrics["policy_kl_to_base"] == version.metadata["history"][-1]["objective/kl"]


def test_queued_jobs_reach_label_studio_with_the_access_setup_gave(
    settings,
    label_studio,
    start_backend,
    make_project,
    ls_client,
    finegrained_path,
    redis_url,  # noqa: F811 - the fixture imported above
):
    # No API key setting, and a URL setting where no Label Studio is: only the URL and
    # token that Label Studio sent to /setup can reach it, from a separate RQ worker.
    settings = settings.replace(
        label_studio_url="http://127.0.0.1:9",
        label_studio_api_key="",
        train_every=0,
        redis_url=redis_url,
    )
    project = _project_with_annotations(make_project, ls_client, finegrained_path, n=6)
    backend = start_backend(settings)
    setup = {"project": f"{project.id}.0", "hostname": label_studio.url}
    requests.post(
        f"{backend.url}/setup", json={**setup, "access_token": label_studio.token}, timeout=10
    ).raise_for_status()
    answer = requests.post(
        f"{backend.url}/webhook",
        json={"action": "START_TRAINING", "project": {"id": project.id}},
        timeout=5,
    ).json()
    from redis import Redis
    from rq import Queue

    # A dispatcher thread hands recorded jobs to Redis (so /webhook never waits on it).
    queue = Queue("ls-rlhf", connection=Redis.from_url(redis_url))
    queued = wait_until(lambda: queue.jobs, timeout=30)
    assert len(queued) == 1 and label_studio.token not in queued[0].description
    worker = run_burst_worker(settings)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert label_studio.token not in worker.stdout + worker.stderr  # never in a log
    wait_until(
        lambda: (
            requests.get(f"{backend.url}/jobs/{answer['job']}", timeout=5).json()["state"]
            in ("done", "failed")
        ),
        timeout=30,
    )
    job = requests.get(f"{backend.url}/jobs/{answer['job']}", timeout=5).json()
    assert job["state"] == "done", job
    tasks = to_label_studio_tasks(load_finegrained(finegrained_path)[:6], "pairwise")
    assert job["metrics"]["tasks"] == len(tasks)  # pulled from the project's export
