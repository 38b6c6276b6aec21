"""`ls-rlhf demo`: Label Studio and the backend on loopback, a project, tasks: ready to annotate."""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from ml_backend.cli import UserError
from training.settings import Settings

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo",
        help="start Label Studio and the backend, create a project with tasks, print the login",
        description="Start a Label Studio (from ./.venv-ls) and the ML backend on loopback with the "
        "default offline models, create a project with the chosen label config, connect the backend, "
        "generate tasks with the policy, print the URL and login, and keep both running until Ctrl-C. "
        "State lives under LS_RLHF_HOME/demo.",
    )
    parser.add_argument(
        "--config",
        default="pairwise",
        help="label config: pairwise, ranking, rating, demonstration, critique",
    )
    parser.add_argument(
        "--prompts", help="prompts file (.jsonl/.csv/.txt); default: the bundled demo prompts"
    )
    parser.add_argument(
        "--num-prompts", type=int, default=12, help="tasks to generate (default 12)"
    )
    parser.add_argument("--ls-port", type=int, default=8080, help="Label Studio port")
    parser.add_argument("--backend-port", type=int, default=9090, help="backend port")
    parser.add_argument(
        "--exit-when-ready",
        action="store_true",
        help="stop everything once the tasks exist (for checks)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from label_studio_sdk import LabelStudio

    import label_configs
    from ml_backend.studio import LabelStudioServer
    from ml_backend.tasks import read_prompts

    settings = Settings.from_env()
    demo_dir = Path(settings.home) / "demo"
    studio = LabelStudioServer(
        data_dir=demo_dir / "label-studio", port=args.ls_port, password="ls-rlhf-demo"
    )
    prompts_path = (
        Path(args.prompts)
        if args.prompts
        else resources.files("training") / "data" / "demo_prompts.txt"
    )
    prompts = read_prompts(prompts_path)[: args.num_prompts]
    xml = label_configs.load(args.config)

    print(
        f"starting Label Studio on {studio.url} (first start runs migrations: ~1 min) ...",
        flush=True,
    )
    studio.start()
    backend_url = f"http://127.0.0.1:{args.backend_port}"
    env_settings = settings.replace(label_studio_url=studio.url, label_studio_api_key=studio.token)
    backend = _start_backend(env_settings, args.backend_port, demo_dir / "backend.log")
    try:
        ls = LabelStudio(base_url=studio.url, api_key=studio.token)
        project = ls.projects.create(title=f"ls-rlhf demo ({args.config})", label_config=xml)
        print(
            f"waiting for the backend at {backend_url} to load the models (first run converts SmolLM2: ~30 s) ...",
            flush=True,
        )
        _wait_for_backend(backend_url, backend)
        ls.ml.create(project=project.id, url=backend_url, title="ls-rlhf", is_interactive=False)
        from ml_backend.cli import main as cli

        with _env(env_settings):
            prompts_file = demo_dir / "prompts.txt"
            prompts_file.write_text("\n".join(prompts) + "\n")
            if cli(["generate", "--project", str(project.id), "--prompts", str(prompts_file)]) != 0:
                raise UserError("generating tasks failed; see the messages above")
        print(
            "\nReady.\n"
            f"  Label Studio: {studio.url}/projects/{project.id}/data\n"
            f"  login:        {studio.username} / {studio.password}\n"
            f"  backend:      {backend_url} (log: {demo_dir / 'backend.log'})\n"
            "Open a task: the backend's suggestion and reward scores are pre-filled. Ctrl-C stops both.",
            flush=True,
        )
        if not args.exit_when_ready:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
    finally:
        backend.terminate()
        backend.wait(timeout=20)
        studio.stop()
    return 0


def _start_backend(settings: Settings, port: int, log_path: Path) -> subprocess.Popen:
    import dataclasses
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("LS_RLHF_")}
    for f in dataclasses.fields(settings):
        env[f"LS_RLHF_{f.name.upper()}"] = str(getattr(settings, f.name))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    out = open(log_path, "ab")  # noqa: SIM115 - the child writes to it for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "ml_backend.cli", "serve", "--port", str(port)],
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )


def _wait_for_backend(url: str, process: subprocess.Popen, timeout: float = 600.0) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise UserError(f"the backend exited with {process.returncode}; see its log")
        try:
            health = requests.get(f"{url}/health", timeout=2).json()
            if health.get("models") == "loaded":
                return
            if health.get("models") == "failed":
                raise UserError(f"the backend could not load its models: {health.get('error')}")
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise UserError(f"the backend did not load its models in {timeout:.0f} s")


class _env:
    """Temporarily export settings as LS_RLHF_* variables for in-process commands."""

    def __init__(self, settings: Settings) -> None:
        import dataclasses

        self.values = {
            f"LS_RLHF_{f.name.upper()}": str(getattr(settings, f.name))
            for f in dataclasses.fields(settings)
        }

    def __enter__(self) -> None:
        import os

        self.saved = {k: os.environ.get(k) for k in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc: object) -> None:
        import os

        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
