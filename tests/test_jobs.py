"""Trigger rules, coalescing, one run per project, recovery after a crash, failures."""

from __future__ import annotations

import os
import threading
import time

import pytest

from ml_backend.events import EventLog
from ml_backend.scheduler import JobScheduler, JobStore, execute_job


def annotation(project, i):
    return {"action": "ANNOTATION_CREATED", "annotation": {"id": i}, "project": {"id": project}}


@pytest.fixture
def parts(tmp_path):
    events = EventLog(tmp_path / "events.sqlite3")
    store = JobStore(tmp_path / "jobs.sqlite3")
    runs = []

    def run_job(job, progress):
        runs.append(job.id)
        progress(0.5, "halfway")
        return {"message": "trained", "pairs": 3}

    return events, store, JobScheduler(events, store, train_every=3, run_job=run_job), runs


def test_threshold_of_new_annotations_triggers_once(parts):
    events, store, scheduler, _ = parts
    jobs = [scheduler.on_event(events.record(annotation(1, i))) for i in range(5)]
    assert [j is not None for j in jobs] == [False, False, True, False, False]
    assert len(store.jobs(1)) == 1 and store.jobs(1)[0].reason == "3 annotation events"
    # Events of another project count for that project only.
    assert scheduler.on_event(events.record(annotation(2, 9))) is None


def test_start_training_always_triggers_and_deletions_count(parts):
    events, store, scheduler, _ = parts
    job = scheduler.on_event(events.record({"action": "START_TRAINING", "project": {"id": 4}}))
    assert job is not None and job.reason == "START_TRAINING"
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 1}], "project": {"id": 5}}
    results = [scheduler.on_event(events.record(deleted)) for _ in range(3)]
    assert [j is not None for j in results] == [False, False, True]
    assert results[2].reason == "3 annotation events" and results[2].project_id == 5


def test_events_during_a_run_coalesce_into_one_follow_up(parts):
    events, store, scheduler, runs = parts
    first = scheduler.on_event(events.record({"action": "START_TRAINING", "project": {"id": 1}}))
    claimed = store.claim("me")
    assert claimed.id == first.id and claimed.state == "running"
    for i in range(10):
        scheduler.on_event(events.record(annotation(1, i)))
    scheduler.on_event(events.record({"action": "START_TRAINING", "project": {"id": 1}}))
    states = [j.state for j in store.jobs(1)]
    assert sorted(states) == ["queued", "running"]
    assert store.claim("other") is None  # one run per project at a time
    execute_job(store, claimed, scheduler.run_job)
    follow_up = store.claim("me")
    assert follow_up is not None and follow_up.covers_event_id == events.last_id()


def test_worker_thread_runs_jobs_and_records_metrics(parts):
    events, store, scheduler, runs = parts
    scheduler.start()
    job = scheduler.on_event(events.record({"action": "START_TRAINING", "project": {"id": 7}}))
    deadline = time.time() + 10
    while store.get(job.id).state != "done" and time.time() < deadline:
        time.sleep(0.05)
    scheduler.stop()
    done = store.get(job.id)
    assert (
        done.state == "done"
        and done.message == "trained"
        and done.metrics == {"pairs": 3}
        and done.progress == 1
    )


def test_a_failing_job_records_why_and_its_events_count_again(parts, caplog):
    events, store, _, _ = parts

    def broken(job, progress):
        raise RuntimeError("Label Studio unreachable")

    scheduler = JobScheduler(events, store, train_every=2, run_job=broken)
    for i in range(2):
        scheduler.on_event(events.record(annotation(3, i)))
    execute_job(store, store.claim("me"), broken)
    (job,) = store.jobs(3)
    assert job.state == "failed" and job.message == "RuntimeError: Label Studio unreachable"
    assert "Traceback" in caplog.text and "Label Studio unreachable" in caplog.text
    # The failed run covered nothing: one more annotation makes three uncovered, and a retry.
    retry = scheduler.on_event(events.record(annotation(3, 2)))
    assert retry is not None and retry.reason == "3 annotation events"


def test_jobs_left_running_by_a_dead_process_are_queued_again(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.enqueue(1, "test", 1)
    store.claim(f"999999999@{os.uname().nodename}")  # a pid that does not exist
    store.enqueue(2, "test", 2)
    store.claim(f"{os.getppid()}@{os.uname().nodename}")  # a live process keeps its job
    assert JobStore(tmp_path / "jobs.sqlite3").requeue_abandoned() == 1
    assert {j.project_id: j.state for j in store.jobs()} == {1: "queued", 2: "running"}


def test_concurrent_enqueues_make_one_queued_job(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    threads = [threading.Thread(target=store.enqueue, args=(1, "race", i)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (job,) = store.jobs(1)
    assert job.state == "queued" and job.covers_event_id == 15
