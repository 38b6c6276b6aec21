"""`ls-rlhf jobs`: training jobs and their state, from the backend's job store."""

from __future__ import annotations

import argparse
import json
import time

from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "jobs",
        help="training jobs: queued, running with progress, done with metrics, failed with the reason",
        description="List training jobs from the job store under LS_RLHF_HOME/state (the same one the "
        "backend and `ls-rlhf worker` use).",
    )
    parser.add_argument("--project", type=int, help="only this project's jobs")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ml_backend.scheduler import JobStore

    settings = Settings.from_env()
    jobs = JobStore(settings.state_dir / "jobs.sqlite3").jobs(args.project)
    if args.json:
        print(json.dumps([j.as_dict() for j in jobs], indent=2))
        return 0
    if not jobs:
        print("no training jobs yet")
    for job in jobs:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.created_at))
        line = f"job {job.id:>4}  project {job.project_id:<4} {job.state:<8} {when}  {job.reason}"
        if job.state == "running":
            line += f"  {job.progress:.0%} {job.message}"
        elif job.message:
            line += f"  -> {job.message}"
        print(line)
    return 0
