"""Reliability against the real servers: a webhook flood, SIGKILL mid-training, a failing
training, and the Redis queue with a real redis-server."""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import add_reward_version, run_burst_worker, start_redis_server

from ml_backend.events import EventLog
from ml_backend.harness.label_studio_server import free_port
from ml_backend.harness.waiting import wait_until
from training.finegrained import load_finegrained, to_label_studio_tasks
from training.registry import Registry

pytestmark = pytest.mark.label_studio


def test_a_thousand_webhooks_from_eight_senders_are_all_recorded_fast(settings, start_backend):
    backend = start_backend(settings.replace(train_every=0))
    session_per_sender = [requests.Session() for _ in range(8)]

    def send(i: int) -> tuple[int, float]:
        payload = {
            "action": "ANNOTATION_CREATED",
            "annotation": {"id": i},
            "task": {"id": i},
            "project": {"id": 1},
        }
        started = time.perf_counter()
        response = session_per_sender[i % 8].post(f"{backend.url}/webhook", json=payload, timeout=5)
        return response.status_code, time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(send, range(1000)))
    latencies = sorted(t for _, t in results)
    assert [s for s, _ in results].count(201) == 1000
    events = EventLog(settings.state_dir / "events.sqlite3").events(project_id=1)
    assert len(events) == 1000 and sorted(e.annotation_ids[0] for e in events) == list(range(1000))
    p99 = latencies[int(0.99 * len(latencies))]
    print(f"1000 webhooks: median {latencies[500] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms")
    assert p99 < 1.0  # Label Studio gives a webhook 1 s


def _project_with_annotations(make_project, ls_client, finegrained_path, n=40):
    project = make_project("pairwise")
    ls_client.projects.import_tasks(
        id=project.id,
        request=to_label_studio_tasks(load_finegrained(finegrained_path)[:n], "pairwise"),
    )
    return project


def test_sigkill_during_training_leaves_the_served_version_and_the_restart_finishes(
    settings,
    label_studio,
    start_backend,
    make_project,
    ls_client,
    finegrained_path,
    tiny_reward_backbone_dir,
):
    settings = settings.replace(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token, train_every=0
    )
    add_reward_version(settings, tiny_reward_backbone_dir)  # v1 is served
    project = _project_with_annotations(make_project, ls_client, finegrained_path)
    backend = start_backend(settings)
    requests.post(f"{backend.url}/setup", json={"project": project.id}, timeout=5)
    requests.post(
        f"{backend.url}/webhook",
        json={"action": "START_TRAINING", "project": {"id": project.id}},
        timeout=5,
    )
    wait_until(
        lambda: any(
            j["state"] == "running"
            for j in requests.get(f"{backend.url}/jobs", timeout=5).json()["jobs"]
        ),
        every=0.02,
    )
    backend.stop(signal.SIGKILL)

    registry = Registry(settings.registry_dir)
    assert registry.current("reward").name == "v1"
    assert [v.name for v in registry.versions("reward")] == [
        "v1"
    ]  # nothing half-written became a version

    restarted = start_backend(settings)
    assert (
        requests.get(f"{restarted.url}/health", timeout=5).json()["model_version"]
        == "policy-base+reward-v1"
    )
    job = wait_until(
        lambda: (
            (j := requests.get(f"{restarted.url}/jobs", timeout=5).json()["jobs"][0])["state"]
            in ("done", "failed")
            and j
        )
    )
    assert job["state"] == "done" and job["attempts"] == 2, job
    assert job["metrics"]["reward_version"] == "reward-v2"


def test_a_training_that_raises_keeps_the_served_version_and_the_event_log(
    settings, label_studio, start_backend, tiny_reward_backbone_dir
):
    settings = settings.replace(
        label_studio_url=label_studio.url, label_studio_api_key="not-a-valid-token", train_every=0
    )
    add_reward_version(settings, tiny_reward_backbone_dir)
    backend = start_backend(settings)
    requests.post(f"{backend.url}/setup", json={"project": 1}, timeout=5)
    for i in range(5):
        requests.post(
            f"{backend.url}/webhook",
            json={"action": "ANNOTATION_CREATED", "annotation": {"id": i}, "project": {"id": 1}},
            timeout=5,
        )
    requests.post(
        f"{backend.url}/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}, timeout=5
    )
    job = wait_until(
        lambda: (
            (j := requests.get(f"{backend.url}/jobs", timeout=5).json()["jobs"][0])["state"]
            in ("done", "failed")
            and j
        )
    )
    assert job["state"] == "failed" and "LS_RLHF_LABEL_STUDIO_API_KEY" in job["message"]
    assert (
        requests.get(f"{backend.url}/health", timeout=5).json()["model_version"]
        == "policy-base+reward-v1"
    )
    assert len(EventLog(settings.state_dir / "events.sqlite3").events(project_id=1)) == 6
    assert [v.name for v in Registry(settings.registry_dir).versions("reward")] == ["v1"]


@pytest.fixture
def redis_url(tmp_path):
    port = free_port()
    process = start_redis_server(port, tmp_path)
    yield f"redis://127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


def test_jobs_go_through_redis_to_a_separate_worker(
    settings,
    label_studio,
    start_backend,
    make_project,
    ls_client,
    finegrained_path,
    redis_url,
    tmp_path,
):
    settings = settings.replace(
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.token,
        train_every=0,
        redis_url=redis_url,
    )
    project = _project_with_annotations(make_project, ls_client, finegrained_path, n=6)
    backend = start_backend(settings)
    requests.post(f"{backend.url}/setup", json={"project": project.id}, timeout=5)
    answer = requests.post(
        f"{backend.url}/webhook",
        json={"action": "START_TRAINING", "project": {"id": project.id}},
        timeout=5,
    ).json()
    time.sleep(1.0)
    assert (
        requests.get(f"{backend.url}/jobs/{answer['job']}", timeout=5).json()["state"] == "queued"
    )  # nobody trains in-process

    worker = run_burst_worker(settings)
    assert worker.returncode == 0, worker.stderr[-2000:]
    job = requests.get(f"{backend.url}/jobs/{answer['job']}", timeout=5).json()
    assert job["state"] == "done", job
    wait_until(
        lambda: (
            requests.get(f"{backend.url}/health", timeout=5).json().get("model_version")
            == "policy-base+reward-v1"
        ),
        timeout=30,
    )
