"""Benchmark (issue 16): load on a real `ls-rlhf serve` (gunicorn) with the default models.

Part 1, /predict: eight client threads, each with its own HTTP session, send `--requests`
requests each. Most are one pairwise task (the reward model scores both answers); every
`--generate-every`-th is a demonstration task (the policy writes a draft of up to
LS_RLHF_MAX_NEW_TOKENS tokens). The policy is SmolLM2-135M-Instruct; the reward version is
made from the default backbone (all-MiniLM-L6-v2), untrained: scoring costs the same.
Printed: latency p50/p99 per kind, throughput, errors (any status but 200), and the
backend's resident memory (its process and children, sampled every 0.5 s) before, at peak,
after each of `--rounds` rounds of this load, and after.

Part 2, the webhook flood during a training: a real Label Studio project holds `--pairs`
annotated pairwise tasks; "Start Training" trains a reward version on the default backbone
(`--steps` steps); while the job runs, eight senders post 1,000 annotation webhooks, each
with Label Studio's own 1 s timeout. Each must be recorded (the event log is counted, also
for those the sender gave up on), answers are timed, and the job must still finish.

    flock /tmp/ls-rlhf-bench.lock nice -n 0 .venv/bin/python bench/load.py [--skip-flood]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

import label_configs
from ml_backend.events import EventLog
from ml_backend.harness.backend_process import BackendServer
from ml_backend.harness.label_studio_server import LABEL_STUDIO_VERSION, LabelStudioServer
from training.finegrained import DEFAULT_PATH as DATA
from training.finegrained import load_finegrained, to_label_studio_tasks
from training.settings import Settings

CLIENTS = 8
WEBHOOK_TIMEOUT = 1.0


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class MemorySampler:
    def __init__(self, pid: int, every: float = 0.5) -> None:
        self.pid, self.every = pid, every
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(rss_mb(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def add_default_reward_version(settings: Settings) -> str:
    from training.models import load_sequence_classifier, resolve_reward_backbone
    from training.registry import Registry

    registry = Registry(settings.registry_dir)
    backbone = resolve_reward_backbone(settings.reward_backbone)
    model, tokenizer = load_sequence_classifier(backbone)
    with registry.stage("reward") as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        return registry.commit("reward", staged, {"note": "untrained, for load"}, True).label


def base_settings(home: Path, **changes) -> Settings:
    settings = dataclasses.replace(Settings.from_env(), home=home, **changes)
    (settings.home / "models").mkdir(parents=True, exist_ok=True)
    cached = Settings.from_env().models_cache_dir / "SmolLM2-135M-Instruct"
    if cached.is_dir():  # the converted default policy, reused
        shutil.copytree(cached, settings.home / "models" / cached.name)
    return settings


def predict_load(workdir: Path, per_client: int, generate_every: int, rounds: int) -> dict:
    settings = base_settings(workdir / "home-predict")
    reward = add_default_reward_version(settings)
    backend = BackendServer(settings, workdir / "backend-predict.log")
    records = load_finegrained(DATA)[:50]
    pairwise = to_label_studio_tasks(records, "pairwise")
    demos = to_label_studio_tasks(records, "demonstration")
    configs = {k: label_configs.load(k) for k in ("pairwise", "demonstration")}
    try:
        backend.start(timeout=600)
        assert backend.process is not None
        sessions = [requests.Session() for _ in range(CLIENTS)]
        # One warm-up request of each kind: the first generation pays one-off costs.
        for kind, tasks in (("pairwise", pairwise), ("demonstration", demos)):
            body = {"tasks": [{"id": 1, "data": tasks[0]["data"]}], "label_config": configs[kind]}
            sessions[0].post(f"{backend.url}/predict", json=body, timeout=300).raise_for_status()
        before = rss_mb(backend.process.pid)

        failures: list[str] = []

        def client(c: int) -> list[tuple[str, int, float]]:
            out = []
            for i in range(per_client):
                n = c * per_client + i
                kind = "demonstration" if generate_every and n % generate_every == 0 else "pairwise"
                tasks = demos if kind == "demonstration" else pairwise
                body = {
                    "tasks": [{"id": n + 1, "data": tasks[n % len(tasks)]["data"]}],
                    "label_config": configs[kind],
                    "project": "1.1",
                }
                started = time.perf_counter()
                try:
                    status = sessions[c].post(f"{backend.url}/predict", json=body, timeout=300)
                    code = status.status_code
                    if code != 200:
                        failures.append(f"{code}: {status.text[:300]}")
                except requests.RequestException as err:
                    code = -1
                    failures.append(f"{type(err).__name__}: {err}"[:300])
                out.append((kind, code, time.perf_counter() - started))
            return out

        # Several rounds of the same load: memory that is bounded stops growing after the first.
        results, after_round = [], []
        with MemorySampler(backend.process.pid) as memory:
            started = time.perf_counter()
            for _ in range(rounds):
                with ThreadPoolExecutor(CLIENTS) as pool:
                    results += [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
                after_round.append(round(rss_mb(backend.process.pid)))
            seconds = time.perf_counter() - started
        after = rss_mb(backend.process.pid)
        health = requests.get(f"{backend.url}/health", timeout=10).json()
    finally:
        backend.stop()
    row: dict = {
        "requests": len(results),
        "errors": sum(1 for _, code, _ in results if code != 200),
        "error_examples": sorted(set(failures))[:5],
        "seconds": round(seconds, 1),
        "throughput_rps": round(len(results) / seconds, 2),
        "rss_mb_before": round(before),
        "rss_mb_peak": round(max(memory.samples, default=before)),
        "rss_mb_after": round(after),
        "rss_mb_after_each_round": after_round,
        "reward_version": reward,
        "served_after": health.get("model_version"),
    }
    for kind in ("pairwise", "demonstration"):
        times = [t for k, code, t in results if k == kind and code == 200]
        if times:
            row[kind] = {
                "n": len(times),
                "p50_s": round(statistics.median(times), 3),
                "p99_s": round(percentile(times, 0.99), 3),
                "max_s": round(max(times), 3),
            }
    return row


def flood_during_training(workdir: Path, pairs: int, steps: int, webhooks: int) -> dict:
    template = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "ls-rlhf-test"
        / f"label-studio-{LABEL_STUDIO_VERSION}"
    )
    studio = LabelStudioServer(data_dir=workdir / "label-studio")
    if (template / "label_studio.sqlite3").is_file():
        shutil.copytree(template, studio.data_dir, dirs_exist_ok=True)
    studio.start()
    backend = None
    try:
        ls = studio.client()
        project = ls.projects.create(
            title="bench load", label_config=label_configs.load("pairwise")
        )
        assert project.id is not None
        ls.projects.import_tasks(
            id=project.id,
            request=to_label_studio_tasks(load_finegrained(DATA), "pairwise")[:pairs],
        )
        settings = base_settings(
            workdir / "home-flood",
            label_studio_url=studio.url,
            label_studio_api_key=studio.token,
            train_every=0,  # the flood's annotation events are recorded, and start no run
            reward_max_steps=steps,
        )
        backend = BackendServer(settings, workdir / "backend-flood.log")
        backend.start(timeout=600)
        url = backend.url
        ls.ml.create(project=project.id, url=url, title="ls-rlhf", is_interactive=False)
        events = EventLog(settings.state_dir / "events.sqlite3")
        job_id = requests.post(
            f"{url}/webhook",
            json={"action": "START_TRAINING", "project": {"id": project.id}},
            timeout=10,
        ).json()["job"]

        def job() -> dict:
            return requests.get(f"{url}/jobs/{job_id}", timeout=30).json()

        deadline = time.monotonic() + 600
        while job()["state"] != "running" or job()["progress"] < 0.1:  # training, not pulling
            if time.monotonic() > deadline or job()["state"] in ("done", "failed"):
                raise RuntimeError(f"the job did not reach training: {job()}")
            time.sleep(0.2)
        before_events = events.last_id()

        def send(i: int) -> tuple[int, float]:
            payload = {
                "action": "ANNOTATION_CREATED",
                "annotation": {"id": 100_000 + i},
                "task": {"id": 100_000 + i},
                "project": {"id": project.id},
            }
            started = time.perf_counter()
            try:
                # Label Studio's own timeout for a webhook (WEBHOOK_TIMEOUT, 1 s; no retry):
                # a slower answer is a failed delivery to it, whether or not it was recorded.
                # A new connection each, as Label Studio sends them (no keep-alive to race).
                response = requests.post(f"{url}/webhook", json=payload, timeout=WEBHOOK_TIMEOUT)
                code = response.status_code
            except requests.Timeout:
                code = -1
            except requests.ConnectionError:
                code = -2
            return code, time.perf_counter() - started

        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = list(pool.map(send, range(webhooks)))
        flood_seconds = time.perf_counter() - started
        state_after_flood = job()["state"]
        time.sleep(WEBHOOK_TIMEOUT * 5)  # requests the client gave up on still finish
        recorded = [e for e in events.events(project_id=project.id) if e.id > before_events]
        while job()["state"] not in ("done", "failed"):
            time.sleep(0.5)
        final = job()
    finally:
        if backend is not None:
            backend.stop()
        studio.stop()
    latencies = [t for code, t in results if code == 201]
    return {
        "webhooks": webhooks,
        "answered_201": len(latencies),
        "timed_out_at_1s": sum(1 for code, _ in results if code == -1),
        "connection_errors": sum(1 for code, _ in results if code == -2),
        "answered_over_0.5s": sum(1 for t in latencies if t > 0.5),
        "recorded": len(recorded),
        "distinct_annotations": len({e.annotation_ids[0] for e in recorded if e.annotation_ids}),
        "flood_seconds": round(flood_seconds, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1) if latencies else None,
        "max_ms": round(max(latencies) * 1000, 1) if latencies else None,
        "job_state_after_flood": state_after_flood,
        "job": {k: final[k] for k in ("state", "message")},
        "job_seconds": round((final["finished_at"] or 0) - (final["started_at"] or 0), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=25, help="/predict requests per client")
    parser.add_argument("--generate-every", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the /predict load")
    parser.add_argument("--pairs", type=int, default=300, help="annotated tasks for part 2")
    parser.add_argument("--steps", type=int, default=60, help="training steps in part 2")
    parser.add_argument("--webhooks", type=int, default=1000)
    parser.add_argument("--skip-flood", action="store_true")
    parser.add_argument("--skip-predict", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the logs and state folder")
    parser.add_argument("--results", help="append the results as one JSON line to this file")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-load-"))
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "settings": {"max_new_tokens": Settings.from_env().max_new_tokens, "clients": CLIENTS},
    }
    try:
        if not args.skip_predict:
            result["predict"] = predict_load(
                workdir, args.requests, args.generate_every, args.rounds
            )
            print(json.dumps({"predict": result["predict"]}, indent=2), flush=True)
        if not args.skip_flood:
            result["flood"] = flood_during_training(workdir, args.pairs, args.steps, args.webhooks)
            print(json.dumps({"flood": result["flood"]}, indent=2), flush=True)
    finally:
        if args.keep:
            print(f"logs and state kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.results:
        with open(args.results, "a") as out:
            out.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
