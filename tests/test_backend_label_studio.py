"""End to end against a real Label Studio (the pinned version) and a real `ls-rlhf serve` process."""

from __future__ import annotations

import json
import time

import pytest

import label_configs
from ml_backend.cli import main as cli
from training.label_config import read_schema

pytestmark = pytest.mark.label_studio

PROMPTS = ["What is the capital of France?", "Name a fruit.", "Why is the sky blue?"]


def wait_for_predictions(ls_client, task_ids, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {tid: ls_client.predictions.list(task=tid) for tid in task_ids}
        if all(found.values()):
            return found
        time.sleep(0.5)
    missing = [tid for tid, preds in found.items() if not preds]
    raise AssertionError(f"no predictions for tasks {missing} after {timeout} s")


@pytest.mark.parametrize("config", ["pairwise", "ranking", "rating", "demonstration", "critique"])
def test_generate_connect_and_retrieve_predictions(
    config, served, make_project, ls_client, tmp_path
):
    backend, model_version = served
    project = make_project(config)
    schema = read_schema(label_configs.load(config))

    # Generate: the CLI writes completions into tasks, with the backend's predictions attached.
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    assert cli(["generate", "--project", str(project.id), "--prompts", str(prompts_file)]) == 0
    tasks = list(ls_client.tasks.list(project=project.id))
    assert sorted(t.data["prompt"] for t in tasks) == sorted(PROMPTS)
    for task in tasks:
        if schema.list_field:
            assert len(task.data["items"]) >= 2 and all(
                isinstance(i["body"], str) for i in task.data["items"]
            )
        for field in schema.answer_fields:
            assert isinstance(task.data[field], str)

    # Connect the backend and ask for predictions on tasks imported without any.
    ml = ls_client.ml.create(
        project=project.id, url=backend.url, title="ls-rlhf", is_interactive=False
    )
    assert ml.id
    fresh = [{"data": {k: v for k, v in t.data.items() if k != "policy_version"}} for t in tasks]
    imported = ls_client.projects.import_tasks(id=project.id, request=fresh, return_task_ids=True)
    ls_client.actions.create(
        id="retrieve_tasks_predictions",
        project=project.id,
        selected_items={"all": False, "included": imported.task_ids},
    )
    found = wait_for_predictions(ls_client, imported.task_ids)
    for predictions in found.values():
        (prediction,) = predictions
        assert prediction.model_version == model_version
        types = {r["type"] for r in prediction.result}
        if config == "pairwise":
            assert "pairwise" in types and 0.5 <= prediction.score <= 1.0
        if config == "ranking":
            assert "ranker" in types and 0.5 <= prediction.score <= 1.0
        if config == "demonstration":
            assert prediction.result[0]["from_name"] == "answer"
    # Label Studio adopted the backend's version.
    versions = ls_client.ml.list_model_versions(id=str(ml.id))
    assert model_version in json.dumps(
        versions.dict() if hasattr(versions, "dict") else versions, default=str
    )


def test_backend_refuses_a_task_without_the_field_it_needs(served, label_studio):
    import requests

    backend, _ = served
    response = requests.post(
        f"{backend.url}/predict",
        json={
            "tasks": [{"id": 9, "data": {"text": "hi"}}],
            "label_config": label_configs.load("pairwise"),
            "project": "1.1",
        },
        timeout=30,
    )
    assert response.status_code == 422 and "task 9" in response.json()["error"]
    assert requests.get(f"{backend.url}/health", timeout=5).json()["models"] == "loaded"


def test_predict_over_budget_delivers_the_rest_through_label_studio(
    settings, label_studio, start_backend, make_project, ls_client
):
    """With no time budget, /predict answers with one task done; the others arrive via the API."""
    import requests

    settings = settings.replace(
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.token,
        predict_budget_seconds=0.0,
        generation_batch_size=1,
    )
    backend = start_backend(settings)
    project = make_project("demonstration")
    ls_client.ml.create(project=project.id, url=backend.url, title="ls-rlhf", is_interactive=False)
    imported = ls_client.projects.import_tasks(
        id=project.id,
        request=[{"data": {"prompt": f"Tell me about number {i}"}} for i in range(4)],
        return_task_ids=True,
    )
    ls_client.actions.create(
        id="retrieve_tasks_predictions",
        project=project.id,
        selected_items={"all": False, "included": imported.task_ids},
    )
    found = wait_for_predictions(ls_client, imported.task_ids)
    assert all(len(p) == 1 and p[0].result[0]["from_name"] == "answer" for p in found.values())
    jobs = requests.get(f"{backend.url}/predictions/progress", timeout=5).json()["jobs"]
    assert sum(job["delivered"] for job in jobs) == 3 and all(
        job["state"] == "done" for job in jobs
    )
