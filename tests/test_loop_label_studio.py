"""The closed loop against a real Label Studio: annotations -> webhook -> training -> new version served."""

from __future__ import annotations

import json
import time

import pytest
import requests

from ml_backend.cli import main as cli
from ml_backend.harness.waiting import wait_until
from training.finegrained import load_finegrained, to_label_studio_tasks
from training.registry import lineage

pytestmark = pytest.mark.label_studio


def test_annotations_retrain_and_label_studio_sees_the_new_version(
    settings, label_studio, start_backend, make_project, ls_client, finegrained_path, monkeypatch
):
    settings = settings.replace(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token, train_every=10
    )
    monkeypatch.setenv("LS_RLHF_LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LS_RLHF_LABEL_STUDIO_API_KEY", label_studio.token)
    backend = start_backend(settings)
    project = make_project("pairwise")
    assert cli(["connect", "--project", str(project.id), "--backend-url", backend.url]) == 0
    assert requests.post(
        f"{backend.url}/setup", json={"project": f"{project.id}.1"}, timeout=5
    ).json()["model_version"] == ("policy-base+reward-none")

    # Tasks without annotations; then annotators answer them one by one (each fires a webhook).
    tasks = to_label_studio_tasks(load_finegrained(finegrained_path)[:6], "pairwise")[:14]
    imported = ls_client.projects.import_tasks(
        id=project.id, request=[{"data": t["data"]} for t in tasks], return_task_ids=True
    )
    for task_id, task in list(zip(imported.task_ids, tasks, strict=True))[:9]:
        ls_client.annotations.create(
            id=task_id, result=task["annotations"][0]["result"], ground_truth=False
        )
    time.sleep(1.0)
    assert requests.get(f"{backend.url}/jobs", timeout=5).json()["jobs"] == []  # 9 < 10: no run yet

    started = time.monotonic()
    task_id, task = imported.task_ids[9], tasks[9]
    ls_client.annotations.create(
        id=task_id, result=task["annotations"][0]["result"], ground_truth=False
    )
    job = wait_until(
        lambda: next(iter(requests.get(f"{backend.url}/jobs", timeout=5).json()["jobs"]), None),
        timeout=10,
    )
    assert job["reason"] == "10 annotation events"
    done = wait_until(
        lambda: (
            (j := requests.get(f"{backend.url}/jobs/{job['id']}", timeout=5).json())["state"]
            in ("done", "failed")
            and j
        )
    )
    assert done["state"] == "done", done["message"]
    assert done["metrics"]["reward_version"] == "reward-v1" and done["metrics"]["pairs"] >= 8

    # The new version is served without a restart, and Label Studio adopts it from /setup.
    version = wait_until(
        lambda: (
            (
                v := requests.post(
                    f"{backend.url}/setup", json={"project": f"{project.id}.1"}, timeout=5
                ).json()["model_version"]
            )
            == "policy-base+reward-v1"
            and v
        ),
        timeout=30,
    )
    print(f"annotation -> {version} served in {time.monotonic() - started:.1f} s")
    rest = imported.task_ids[10:]
    ls_client.actions.create(
        id="retrieve_tasks_predictions",
        project=project.id,
        selected_items={"all": False, "included": rest},
    )
    predictions = wait_until(
        lambda: (
            all(ls_client.predictions.list(task=t) for t in rest)
            and [ls_client.predictions.list(task=t)[0] for t in rest]
        )
    )
    assert all(p.model_version == "policy-base+reward-v1" for p in predictions)
    assert all(any(r["type"] == "pairwise" for r in p.result) for p in predictions)


def test_start_training_button_and_promoting_through_extra_params(
    settings, label_studio, start_backend, make_project, ls_client, finegrained_path
):
    settings = settings.replace(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token, train_every=0
    )
    backend = start_backend(settings)
    project = make_project("ranking")
    ls_client.projects.import_tasks(
        id=project.id,
        request=to_label_studio_tasks(load_finegrained(finegrained_path)[:8], "ranking"),
    )
    ml = ls_client.ml.create(
        project=project.id, url=backend.url, title="ls-rlhf", is_interactive=False
    )
    for expected in ("reward-v1", "reward-v2"):
        ls_client.ml.train(id=ml.id)  # the "Start Training" button
        wait_until(
            lambda e=expected: any(
                j["metrics"].get("reward_version") == e
                for j in requests.get(f"{backend.url}/jobs", timeout=5).json()["jobs"]
            )
        )
    listing = requests.get(f"{backend.url}/versions", timeout=5).json()
    assert listing["all"]["reward"] == ["reward-v1", "reward-v2"]
    # Roll back by promoting v1 through the backend's extra params in Label Studio; Label
    # Studio forwards them in its own /setup call before the next prediction batch.
    ls_client.ml.update(
        id=ml.id, project=project.id, url=backend.url, extra_params={"reward_version": "v1"}
    )
    task_ids = [t.id for t in ls_client.tasks.list(project=project.id)]
    ls_client.actions.create(
        id="retrieve_tasks_predictions",
        project=project.id,
        selected_items={"all": False, "included": task_ids},
    )
    predictions = wait_until(
        lambda: (
            all(ls_client.predictions.list(task=t) for t in task_ids)
            and [ls_client.predictions.list(task=t)[0] for t in task_ids]
        ),
        timeout=60,
    )
    assert {p.model_version for p in predictions} == {"policy-base+reward-v1"}
    health = requests.get(f"{backend.url}/health", timeout=5).json()
    assert health["model_version"] == "policy-base+reward-v1"


@pytest.mark.parametrize("prompt_file", [False, True], ids=["project-prompts", "prompt-file"])
def test_the_loop_trains_the_policy_and_writes_the_next_round_of_tasks(
    settings,
    label_studio,
    start_backend,
    make_project,
    ls_client,
    finegrained_path,
    tmp_path,
    prompt_file,
):
    records = load_finegrained(finegrained_path)[:4]
    asked = records[0]["question"]
    new = ["Why is the sky blue?", "What do bees eat?"]
    pool = tmp_path / "prompts.jsonl"
    pool.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in [asked, *new]))
    settings = settings.replace(
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.token,
        train_every=0,
        loop_policy="ppo",
        loop_policy_updates=2,
        next_round=3,
        **({"loop_prompts": str(pool), "loop_policy_batch_size": 4} if prompt_file else {}),
    )
    backend = start_backend(settings)
    project = make_project("pairwise")
    ls_client.projects.import_tasks(
        id=project.id, request=to_label_studio_tasks(records, "pairwise")
    )
    before = len(list(ls_client.tasks.list(project=project.id)))
    requests.post(f"{backend.url}/setup", json={"project": project.id}, timeout=5)
    requests.post(
        f"{backend.url}/webhook",
        json={"action": "START_TRAINING", "project": {"id": project.id}},
        timeout=5,
    )
    job = wait_until(
        lambda: (
            (j := requests.get(f"{backend.url}/jobs", timeout=5).json()["jobs"][0])["state"]
            in ("done", "failed")
            and j
        )
    )
    assert job["state"] == "done", job["message"]
    assert (
        job["metrics"]["policy_version"] == "policy-v1" and job["metrics"]["next_round_tasks"] == 3
    )
    tasks = list(ls_client.tasks.list(project=project.id))
    assert len(tasks) == before + 3
    written = [t.data["prompt"] for t in tasks if t.data.get("policy_version") == "policy-v1"]
    assert len(written) == 3
    if prompt_file:
        # The file's prompts no task asked yet come first, then the one the project asked.
        assert written == [*new, asked]
        version = lineage(settings.registry_dir, project.id).current("policy")
        assert version is not None and version.metadata["config"]["batch_size"] == 4
    else:
        assert set(written) <= {r["question"] for r in records}
    wait_until(
        lambda: (
            requests.get(f"{backend.url}/health", timeout=5).json().get("model_version")
            == "policy-v1+reward-v1"
        ),
        timeout=30,
    )


def test_connect_with_a_secret_leaves_one_webhook_and_each_annotation_counts_once(
    settings, label_studio, start_backend, make_project, ls_client, finegrained_path, monkeypatch
):
    settings = settings.replace(
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.token,
        train_every=3,
        webhook_secret="loop-secret",
    )
    monkeypatch.setenv("LS_RLHF_LABEL_STUDIO_URL", label_studio.url)
    monkeypatch.setenv("LS_RLHF_LABEL_STUDIO_API_KEY", label_studio.token)
    monkeypatch.setenv("LS_RLHF_WEBHOOK_SECRET", "loop-secret")
    backend = start_backend(settings)
    project = make_project("pairwise")
    # Twice: connecting again must not add a second webhook.
    for _ in range(2):
        assert cli(["connect", "--project", str(project.id), "--backend-url", backend.url]) == 0
    hooks = [
        w for w in ls_client.webhooks.list(project=str(project.id)) if "/webhook" in (w.url or "")
    ]
    assert len(hooks) == 1 and hooks[0].headers == {"X-LS-RLHF-Secret": "loop-secret"}

    tasks = to_label_studio_tasks(load_finegrained(finegrained_path)[:2], "pairwise")[:3]
    imported = ls_client.projects.import_tasks(
        id=project.id, request=[{"data": t["data"]} for t in tasks], return_task_ids=True
    )
    pairs = list(zip(imported.task_ids, tasks, strict=True))
    for task_id, task in pairs[:2]:
        ls_client.annotations.create(
            id=task_id, result=task["annotations"][0]["result"], ground_truth=False
        )
    time.sleep(1.5)
    # Delivered twice, two annotations would already be 4 events >= 3.
    assert requests.get(f"{backend.url}/jobs", timeout=5).json()["jobs"] == []
    task_id, task = pairs[2]
    ls_client.annotations.create(
        id=task_id, result=task["annotations"][0]["result"], ground_truth=False
    )
    job = wait_until(
        lambda: next(iter(requests.get(f"{backend.url}/jobs", timeout=5).json()["jobs"]), None),
        timeout=10,
    )
    assert job["reason"] == "3 annotation events"
