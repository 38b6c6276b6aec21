"""`ls-rlhf worker`: run training jobs from the Redis queue (RQ)."""

from __future__ import annotations

import argparse

from ml_backend.cli import UserError
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "worker",
        help="process training jobs from the Redis queue (with LS_RLHF_REDIS_URL set)",
        description="With LS_RLHF_REDIS_URL set, backends send training jobs to an RQ queue instead of "
        "training in-process; this command processes them, on this machine or a GPU node that shares "
        "LS_RLHF_HOME (registry and job store) with the backends.",
    )
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = Settings.from_env()
    if not settings.redis_url:
        raise UserError("set LS_RLHF_REDIS_URL (e.g. redis://localhost:6379/0) to use the queue")
    try:
        from redis import Redis
        from rq import Queue, Worker
    except ImportError:
        raise UserError("the queue needs redis and rq: pip install 'ls-rlhf[queue]'") from None
    from ml_backend.scheduler import QUEUE_NAME

    connection = Redis.from_url(settings.redis_url)
    worker = Worker([Queue(QUEUE_NAME, connection=connection)], connection=connection)
    worker.work(burst=args.burst, with_scheduler=False)
    return 0
