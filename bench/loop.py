"""Benchmark: from the annotation that crosses the threshold to the new reward version served.

For each size N (200 and 1,000 preference pairs of FineGrainedRLHF), against a real Label
Studio and a real `ls-rlhf serve` process with the default models:

1. a project holds N-1 annotated pairwise tasks and one more task;
2. "Start Training" trains the first reward version (cold; not the figure measured);
3. one annotation is created through Label Studio's API: its webhook crosses the threshold
   (LS_RLHF_TRAIN_EVERY=1); the clock runs until /health reports the new version served
   (or, if the held-out gate keeps the old one, until the job is done: both are printed).

    .venv/bin/python bench/loop.py [--sizes 200 1000] [--cold-steps 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import requests
from label_studio_sdk import LabelStudio

import label_configs
from ml_backend.harness.backend_process import BackendServer
from ml_backend.harness.label_studio_server import LABEL_STUDIO_VERSION, LabelStudioServer
from ml_backend.harness.waiting import wait_until
from training.finegrained import DEFAULT_PATH as DATA
from training.finegrained import load_finegrained, to_label_studio_tasks
from training.settings import Settings


def run_size(
    n: int, studio: LabelStudioServer, ls: LabelStudio, cold_steps: int, workdir: Path
) -> dict:
    tasks = to_label_studio_tasks(load_finegrained(DATA), "pairwise")[:n]
    project = ls.projects.create(
        title=f"bench loop {n}", label_config=label_configs.load("pairwise")
    )
    ls.projects.import_tasks(id=project.id, request=tasks[:-1])
    last = ls.projects.import_tasks(
        id=project.id, request=[{"data": tasks[-1]["data"]}], return_task_ids=True
    ).task_ids[0]

    base = Settings.from_env()
    settings = dataclasses.replace(
        base,
        home=workdir / f"home-{n}",
        label_studio_url=studio.url,
        label_studio_api_key=studio.token,
        train_every=1,
        reward_max_steps=cold_steps,
    )
    (settings.home / "models").mkdir(parents=True, exist_ok=True)
    cached = base.models_cache_dir / "SmolLM2-135M-Instruct"
    if cached.is_dir():  # reuse the converted default policy
        shutil.copytree(cached, settings.home / "models" / cached.name)
    backend = BackendServer(settings, workdir / f"backend-{n}.log")
    url = backend.url
    try:
        backend.start(timeout=300)
        # Connecting creates Label Studio's webhook to /webhook: annotations reach the backend.
        ls.ml.create(project=project.id, url=url, title="ls-rlhf", is_interactive=False)
        started = time.monotonic()
        requests.post(
            f"{url}/webhook",
            json={"action": "START_TRAINING", "project": {"id": project.id}},
            timeout=5,
        )
        wait_until(lambda: "reward-v1" in _get(f"{url}/health").get("model_version", ""), 1800, 0.5)
        cold = time.monotonic() - started

        result = tasks[-1]["annotations"][0]["result"]
        started = time.monotonic()
        ls.annotations.create(id=last, result=result, ground_truth=False)
        job = wait_until(
            lambda: next(
                (
                    j
                    for j in _get(f"{url}/jobs").get("jobs", [])
                    if j["id"] == 2 and j["state"] in ("done", "failed")
                ),
                None,
            ),
            600,
        )
        job_done = time.monotonic() - started
        served = None
        if job["metrics"].get("promoted"):
            wait_until(
                lambda: "reward-v2" in _get(f"{url}/health").get("model_version", ""), 60, 0.05
            )
            served = time.monotonic() - started
        return {"n": n, "cold": cold, "job_done": job_done, "served": served, "job": job}
    finally:
        backend.stop()


def _get(url: str) -> dict:
    try:
        return requests.get(url, timeout=5).json()
    except (requests.RequestException, ValueError):
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000])
    parser.add_argument(
        "--cold-steps", type=int, default=30, help="steps of the first (cold) training"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-loop-"))
    template = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "ls-rlhf-test"
        / f"label-studio-{LABEL_STUDIO_VERSION}"
    )
    studio = LabelStudioServer(data_dir=workdir / "label-studio")
    if (template / "label_studio.sqlite3").is_file():
        shutil.copytree(template, studio.data_dir, dirs_exist_ok=True)
    studio.start()
    try:
        ls = studio.client()
        rows = [run_size(n, studio, ls, args.cold_steps, workdir) for n in args.sizes]
    finally:
        studio.stop()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; default reward backbone (all-MiniLM-L6-v2)"
    )
    print(
        f"{'pairs':>6} {'cold first version':>19} {'annotation -> job done':>23} {'-> new version served':>22}  held-out accuracy"
    )
    for r in rows:
        m = r["job"]["metrics"]
        served = f"{r['served']:.1f} s" if r["served"] is not None else "kept v1 (gate)"
        accuracy = f"{m.get('current_accuracy', float('nan')):.3f} -> {m.get('accuracy_after', float('nan')):.3f}"
        print(
            f"{r['n']:>6} {r['cold']:>17.1f} s {r['job_done']:>21.1f} s {served:>22}  {accuracy} ({m.get('method')}: {m.get('steps')} steps, {m.get('answers_read')} answers read, {m.get('train_pairs')} train pairs)"
        )
        if r["job"]["state"] == "failed":
            print(f"  job failed: {r['job'].get('error')}")


if __name__ == "__main__":
    main()
