"""`ls-rlhf serve`: the ML backend under gunicorn, a production WSGI server."""

from __future__ import annotations

import argparse
import logging

from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the ML backend for Label Studio (gunicorn)",
        description="Serve Label Studio's ML-backend protocol (/health, /setup, /predict, /webhook, "
        "/versions, /train, /metrics). Models load once, in the background; the current registry "
        "versions are served and swapped without a restart when training promotes new ones.",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (0.0.0.0 in a container)"
    )
    parser.add_argument(
        "--port", type=int, default=9090, help="port (Label Studio's default for backends is 9090)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=8,
        help="request threads; model work takes turns, so /health and /webhook stay fast",
    )
    parser.add_argument(
        "--timeout", type=int, default=180, help="gunicorn worker timeout in seconds"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from gunicorn.app.base import BaseApplication

    from ml_backend.app import create_app

    settings = Settings.from_env()
    logging.getLogger(__name__).info("settings: %s", settings.public())

    class Server(BaseApplication):
        def load_config(self) -> None:
            # One worker process: each process holds its own copy of the models. Scale out with
            # replicas sharing the registry (see docker/), not with more workers per replica.
            self.cfg.set("bind", f"{args.host}:{args.port}")
            self.cfg.set("workers", 1)
            self.cfg.set("worker_class", "gthread")
            self.cfg.set("threads", args.threads)
            self.cfg.set("timeout", args.timeout)
            self.cfg.set("accesslog", "-")
            # gunicorn 25+ opens a control socket at one path per user ($HOME/.gunicorn/):
            # each new backend on the machine would take it over from the last. Nothing here
            # uses gunicornc; stop the replicas with signals, as the harness does.
            self.cfg.set("control_socket_disable", True)

        def load(self):
            return create_app(settings)

    Server().run()
    return 0
