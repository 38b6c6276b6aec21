"""Faults while the loop runs (issue 16), each losing nothing, with real processes: the
gunicorn backend, the session's Label Studio behind a small real HTTP proxy that can
answer 500 or stall, a closed port for "Label Studio is down", and a real redis-server
that starts late."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import add_reward_version, start_redis_server
from test_reliability import _project_with_annotations

from ml_backend.events import EventLog
from ml_backend.harness.label_studio_server import free_port
from ml_backend.harness.waiting import wait_until
from ml_backend.scheduler import QUEUE_NAME
from training.registry import Registry

pytestmark = pytest.mark.label_studio


class LabelStudioProxy:
    """A real HTTP server on 127.0.0.1 in front of Label Studio. `mode` says what it does
    with each request: "forward" it, answer "500", or stall ("slow") before forwarding;
    `fail_first` answers that many requests with 500 before it forwards."""

    def __init__(self, upstream: str, port: int | None = None) -> None:
        self.upstream, self.port = upstream.rstrip("/"), port or free_port()
        self.mode, self.fail_first, self.stall = "forward", 0, 3.0
        self.requests = 0
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LabelStudioProxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def handle_one(self) -> None:
                with proxy._lock:
                    proxy.requests += 1
                    failing = proxy.mode == "500" or proxy.fail_first > 0
                    proxy.fail_first = max(0, proxy.fail_first - 1)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if failing:
                    self.answer(500, b'{"detail": "proxy: internal server error"}')
                    return
                if proxy.mode == "slow":
                    time.sleep(proxy.stall)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "content-length", "connection")
                }
                upstream = requests.request(
                    self.command,
                    proxy.upstream + self.path,
                    headers=headers,
                    data=body,
                    allow_redirects=False,
                    timeout=60,
                )
                self.answer(upstream.status_code, upstream.content, upstream.headers)

            def answer(self, status: int, content: bytes, headers=None) -> None:
                try:
                    self.send_response(status)
                    for k, v in (headers or {"Content-Type": "application/json"}).items():
                        if k.lower() not in (
                            "content-length",
                            "transfer-encoding",
                            "content-encoding",
                            "connection",
                        ):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    self.wfile.write(content)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): that is the point of "slow"

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_one

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def proxies():
    started: list[LabelStudioProxy] = []

    def make(upstream: str, port: int | None = None) -> LabelStudioProxy:
        proxy = LabelStudioProxy(upstream, port)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def _train(backend, project_id: int) -> dict:
    """Press "Start Training" and wait for that job's end."""
    answer = requests.post(
        f"{backend.url}/webhook",
        json={"action": "START_TRAINING", "project": {"id": project_id}},
        timeout=5,
    ).json()
    job_id = answer["job"]
    assert isinstance(job_id, int), answer
    return wait_until(
        lambda: (
            (j := requests.get(f"{backend.url}/jobs/{job_id}", timeout=5).json())["state"]
            in ("done", "failed")
            and j
        ),
        timeout=300,
    )


def _served(backend) -> str:
    return requests.get(f"{backend.url}/health", timeout=5).json()["model_version"]


@pytest.fixture
def fault_setup(
    settings, label_studio, make_project, ls_client, finegrained_path, tiny_reward_backbone_dir
):
    """Settings with reward-v1 served and a project of 40 annotated comparisons."""
    settings = settings.replace(
        label_studio_api_key=label_studio.token,
        train_every=0,
        export_attempts=4,
        export_backoff_seconds=0.1,
    )
    add_reward_version(settings, tiny_reward_backbone_dir)
    project = _project_with_annotations(make_project, ls_client, finegrained_path)
    return settings, project


def test_label_studio_down_fails_the_job_after_bounded_retries_and_the_next_trigger_runs_it(
    fault_setup, label_studio, start_backend, proxies
):
    settings, project = fault_setup
    port = free_port()  # nothing listens here yet: Label Studio is down
    backend = start_backend(settings.replace(label_studio_url=f"http://127.0.0.1:{port}"))
    requests.post(f"{backend.url}/setup", json={"project": project.id}, timeout=5)

    started = time.monotonic()
    job = _train(backend, project.id)
    assert job["state"] == "failed", job
    assert "failed 4 attempt(s)" in job["message"] and "could not reach" in job["message"], job
    assert time.monotonic() - started >= 0.1 + 0.2 + 0.4  # it backed off between attempts
    assert _served(backend) == "policy-base+reward-v1"
    assert [v.name for v in Registry(settings.registry_dir).versions("reward")] == ["v1"]

    # Label Studio is back on that address: the next trigger runs the training again.
    proxies(label_studio.url, port).start()
    job = _train(backend, project.id)
    assert job["state"] == "done", job
    assert job["metrics"]["reward_version"] == "reward-v2"
    assert len(EventLog(settings.state_dir / "events.sqlite3").events(project.id)) == 2


def test_label_studio_answering_500_is_tried_a_bounded_number_of_times(
    fault_setup, label_studio, start_backend, proxies
):
    settings, project = fault_setup
    proxy = proxies(label_studio.url).start()
    proxy.mode = "500"
    backend = start_backend(settings.replace(label_studio_url=proxy.url))
    requests.post(f"{backend.url}/setup", json={"project": project.id}, timeout=5)

    job = _train(backend, project.id)
    assert job["state"] == "failed" and "answered 500" in job["message"], job
    assert proxy.requests == 4  # four attempts, each stopped at its first call; no more
    assert _served(backend) == "policy-base+reward-v1"

    # A Label Studio that fails twice, then answers: the retries carry the job through.
    proxy.mode, proxy.fail_first = "forward", 2
    job = _train(backend, project.id)
    assert job["state"] == "done", job
    assert job["metrics"]["reward_version"] == "reward-v2"


def test_a_label_studio_too_slow_to_answer_fails_the_job_with_the_reason(
    fault_setup, label_studio, start_backend, proxies
):
    settings, project = fault_setup
    proxy = proxies(label_studio.url).start()
    proxy.mode, proxy.stall = "slow", 2.0
    backend = start_backend(
        settings.replace(label_studio_url=proxy.url, label_studio_timeout_seconds=0.5)
    )
    requests.post(f"{backend.url}/setup", json={"project": project.id}, timeout=5)
    started = time.monotonic()
    job = _train(backend, project.id)
    assert job["state"] == "failed" and "Timeout" in job["message"], job
    assert proxy.requests == 4
    assert time.monotonic() - started < 30  # bounded: 4 x 0.5 s plus the waits
    assert _served(backend) == "policy-base+reward-v1"
    assert [v.name for v in Registry(settings.registry_dir).versions("reward")] == ["v1"]


@pytest.fixture
def redis_server(tmp_path):
    """start() runs a real redis-server on a port chosen now; stopped after the test."""
    port, processes = free_port(), []

    def start():
        process = start_redis_server(port, tmp_path)
        processes.append(process)
        from redis import Redis

        return Redis(port=port)

    yield port, start
    for process in processes:
        process.terminate()
        process.wait(timeout=10)


def test_redis_unreachable_when_a_job_is_queued_loses_nothing(
    settings, start_backend, redis_server
):
    port, start_redis = redis_server
    settings = settings.replace(train_every=0, redis_url=f"redis://127.0.0.1:{port}/0")
    backend = start_backend(settings)  # Redis is not running yet
    requests.post(f"{backend.url}/setup", json={"project": 5}, timeout=5)

    started = time.monotonic()
    answer = requests.post(
        f"{backend.url}/webhook", json={"action": "START_TRAINING", "project": 5}, timeout=5
    )
    assert answer.status_code == 201 and time.monotonic() - started < 1.0, answer.text
    job_id = answer.json()["job"]
    assert requests.get(f"{backend.url}/jobs/{job_id}", timeout=5).json()["state"] == "queued"
    events = EventLog(settings.state_dir / "events.sqlite3").events(project_id=5)
    assert [e.action for e in events] == ["START_TRAINING"]

    # Redis comes up: the backend hands it the job by itself, once.
    from rq import Queue

    client = start_redis()
    queue = Queue(QUEUE_NAME, connection=client)
    wait_until(lambda: queue.count >= 1, timeout=60, every=0.2)
    time.sleep(1.0)
    (queued,) = queue.jobs
    assert queued.args[0] == job_id and queue.count == 1
    assert requests.get(f"{backend.url}/jobs/{job_id}", timeout=5).json()["state"] == "queued"


def test_an_event_log_locked_by_another_process_makes_events_wait_not_vanish(
    settings, start_backend
):
    settings = settings.replace(train_every=0)
    backend = start_backend(settings)
    path = settings.state_dir / "events.sqlite3"
    # Another process takes the write lock of the event log for 3 s.
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "db.execute('BEGIN EXCLUSIVE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(3)\n"
            "db.execute('COMMIT')\n",
            str(path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"

    def send(i: int) -> int:
        body = {"action": "ANNOTATION_CREATED", "annotation": {"id": i}, "project": {"id": 4}}
        return requests.post(f"{backend.url}/webhook", json=body, timeout=30).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(send, range(40)))
    waited = time.monotonic() - started
    assert locker.wait(timeout=30) == 0
    assert statuses == [201] * 40
    assert waited >= 2.0  # they did wait for the lock
    events = EventLog(path).events(project_id=4)
    assert sorted(e.annotation_ids[0] for e in events) == list(range(40))
