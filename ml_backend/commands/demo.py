"""`ls-rlhf demo`: Label Studio and the backend on loopback, a project, tasks: ready to annotate."""

from __future__ import annotations

import argparse
import logging
import signal
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
    parser.add_argument(
        "--simulate",
        type=int,
        default=0,
        metavar="N",
        help="also play N rounds without a person: a simulated annotator (ml_backend/harness/simulated_annotator.py) "
        "answers tasks, webhooks retrain, and each round's figures are printed",
    )
    parser.add_argument(
        "--per-round", type=int, default=40, help="annotations per simulated round (default 40)"
    )
    parser.add_argument(
        "--keep-sampling",
        action="store_true",
        help="leave Label Studio's default task order (default: uncertainty sampling, the "
        "closest call first, on the served version's scores)",
    )
    parser.add_argument(
        "--judge",
        nargs="?",
        const="default",
        metavar="FOLDER",
        help="with --simulate: a gold judge (training/judge.py) labels the policy's own answers, "
        "with human-like noise; each round PPO trains the policy and it writes the next round's "
        "tasks. FOLDER: a judge folder (built there if missing); default: "
        "~/.cache/ls-rlhf/judges/, built once (a few minutes)",
    )
    parser.set_defaults(func=run)


class _Stopped(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C (a BaseException, so no `except Exception` eats it)."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped()


def run(args: argparse.Namespace) -> int:
    # SIGTERM (kill, timeout, a service manager) stops the demo as Ctrl-C does. Without a
    # handler, Python dies at once and the finally that stops Label Studio never runs.
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        return _run(args)
    except (_Stopped, KeyboardInterrupt):
        print("stopped: Label Studio and the backend are down", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    import label_configs
    from ml_backend.harness.backend_process import BackendServer, BackendStartError
    from ml_backend.harness.label_studio_server import LabelStudioServer
    from ml_backend.tasks import read_prompts

    settings = Settings.from_env()
    demo_dir = Path(settings.home) / "demo"
    studio = LabelStudioServer(
        data_dir=demo_dir / "label-studio", port=args.ls_port, password="ls-rlhf-demo"
    )
    prompts_path = (
        Path(args.prompts)
        if args.prompts
        else Path(str(resources.files("training") / "data" / "demo_prompts.txt"))
    )
    prompts = read_prompts(prompts_path)[: args.num_prompts]
    xml = label_configs.load(args.config)
    if args.simulate and args.config != "pairwise":
        raise UserError("--simulate plays the pairwise config; drop --config")
    if args.judge and not args.simulate:
        raise UserError("--judge labels the rounds of --simulate N; add --simulate")

    env_settings = settings.replace(label_studio_url=studio.url, label_studio_api_key=studio.token)
    if args.simulate:
        env_settings = env_settings.replace(train_every=args.per_round)
    if args.judge:
        # Every round's labels are of the policy's latest answers: the policy must move, so
        # every round serves its reward version (the gate's few held-out pairs are a coin
        # flip; a kept version would mean no policy step and no next round's tasks).
        env_settings = env_settings.replace(
            loop_policy="ppo" if settings.loop_policy == "none" else settings.loop_policy,
            next_round=args.per_round,
            reward_promote="always",
        )
        prompts = [prompts[i % len(prompts)] for i in range(max(len(prompts), args.per_round))]
    backend = BackendServer(env_settings, demo_dir / "backend.log", port=args.backend_port)
    backend_url = backend.url
    vllm = None
    try:
        print(
            f"starting Label Studio on {studio.url} (first start runs migrations: ~1 min) ...",
            flush=True,
        )
        studio.start()
        backend.launch()
        ls = studio.client()
        project = ls.projects.create(title=f"ls-rlhf demo ({args.config})", label_config=xml)
        if project.id is None:
            raise UserError(f"Label Studio at {studio.url} created a project without an id")
        print(
            f"waiting for the backend at {backend_url} to load the models (first run converts SmolLM2: ~30 s) ...",
            flush=True,
        )
        try:
            backend.wait_until_loaded()
        except BackendStartError as err:
            raise UserError(str(err)) from None
        if settings.generation_engine == "vllm":
            vllm = _start_vllm(settings, demo_dir)
        ls.ml.create(project=project.id, url=backend_url, title="ls-rlhf", is_interactive=False)
        from ml_backend.cli import main as cli

        with _env(env_settings):
            prompts_file = demo_dir / "prompts.txt"
            prompts_file.write_text("\n".join(prompts) + "\n")
            if cli(["generate", "--project", str(project.id), "--prompts", str(prompts_file)]) != 0:
                raise UserError("generating tasks failed; see the messages above")
        from ml_backend.commands.connect import _served_version
        from ml_backend.sampling import turn_on_uncertainty_sampling

        print(
            turn_on_uncertainty_sampling(
                ls,
                project.id,
                _served_version(backend_url, env_settings, project.id),
                sampling=not args.keep_sampling,
            ),
            flush=True,
        )
        print(
            "\nReady.\n"
            f"  Label Studio: {studio.url}/projects/{project.id}/data\n"
            f"  login:        {studio.username} / {studio.password}\n"
            f"  backend:      {backend_url} (log: {demo_dir / 'backend.log'})\n"
            "Open a task: the backend's suggestion and reward scores are pre-filled. Ctrl-C stops both.",
            flush=True,
        )
        if args.simulate:
            simulate(
                ls,
                project.id,
                backend_url,
                args.simulate,
                args.per_round,
                env_settings.registry_dir,
                judge=args.judge,
            )
        if not args.exit_when_ready:
            while True:
                signal.pause()  # until SIGINT or SIGTERM raises out of here
    finally:
        # A second Ctrl-C or SIGTERM must not cut the shutdown short and leave a port held.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            backend.stop()
            studio.stop()
            if vllm is not None:
                vllm.stop()
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    return 0


def _start_vllm(settings: Settings, demo_dir: Path):
    """The vLLM server of LS_RLHF_GENERATION_ENGINE=vllm, from its own environment as
    Label Studio is, on the served policy (converted by the backend by now)."""
    from urllib.parse import urlparse

    from ml_backend.harness.vllm_server import VLLMServer, VLLMStartError
    from training.models import resolve_policy
    from training.registry import Registry

    current = Registry(settings.registry_dir).current("policy")
    model = (
        current.path
        if current
        else resolve_policy(settings.policy_model, settings.models_cache_dir)
    )
    server = VLLMServer(
        Path(model), demo_dir / "vllm", port=urlparse(settings.vllm_url).port or 8000
    )
    print(f"starting vLLM on {server.url} (a minute or two) ...", flush=True)
    try:
        return server.start()
    except VLLMStartError as err:
        raise UserError(str(err)) from None


class _env:
    """Temporarily export settings as LS_RLHF_* variables for in-process commands."""

    def __init__(self, settings: Settings) -> None:
        self.values = settings.to_env(base={})

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


def simulate(
    ls,
    project_id: int,
    backend_url: str,
    rounds: int,
    per_round: int,
    registry_dir: Path,
    judge: str | None = None,
) -> None:
    """Play `rounds` rounds of annotation and retraining; print one line per round. With
    `judge` ("default" or a folder) a gold judge labels the policy's tasks."""
    import requests

    from ml_backend.harness.simulated_annotator import SimulatedAnnotator
    from training.finegrained import DEFAULT_PATH, load_finegrained, to_label_studio_tasks
    from training.registry import lineage
    from training.reward_model import RewardModel

    records = load_finegrained(DEFAULT_PATH) if DEFAULT_PATH.is_file() else []
    if judge:
        from training.judge import HUMAN_AGREEMENT, GoldJudge, build_judge, flip_rate_for_agreement

        print("loading the gold judge (the first time it trains: a few minutes) ...", flush=True)
        try:
            folder = build_judge(None if judge == "default" else judge)
        except FileNotFoundError as err:
            raise UserError(f"the gold judge trains on FineGrainedRLHF: {err}") from None
        gold = GoldJudge(folder, flip_rate=flip_rate_for_agreement(HUMAN_AGREEMENT))
        annotator = SimulatedAnnotator(judge=gold)
        pool: list[dict] = []  # the policy's own tasks only
    else:
        annotator = SimulatedAnnotator(records)
        pool = [{"data": t["data"]} for t in to_label_studio_tasks(records, "pairwise")]
    policy_tasks = [t.data for t in ls.tasks.list(project=project_id)]
    print(
        f"\nsimulating {rounds} rounds of {per_round} annotations "
        f"({'policy answers, labelled by the gold judge' if judge else 'FineGrainedRLHF pairs answered with the recorded human judgments' if pool else 'policy answers, stand-in rule'})",
        flush=True,
    )
    print(
        f"{'round':>5} {'annotations':>11} {'reward version':>15} {'held-out acc':>12} {'policy':>12} {'mean reward':>11} {'annotation -> served':>21}"
    )
    done_jobs: set[int] = set()
    total = 0
    for number in range(1, rounds + 1):
        if pool:
            batch, pool = pool[:per_round], pool[per_round:]
            ids = ls.projects.import_tasks(
                id=project_id, request=batch, return_task_ids=True
            ).task_ids
            todo = list(zip(ids, [t["data"] for t in batch], strict=True))
        else:
            todo = [
                (t.id, t.data) for t in ls.tasks.list(project=project_id) if not t.total_annotations
            ][:per_round]
            if len(todo) < per_round:
                raise UserError("no more unannotated tasks: generate more with `ls-rlhf generate`")
        for task_id, data in todo:
            ls.annotations.create(
                id=task_id, result=annotator.pairwise_result(data), ground_truth=False
            )
            last_annotation = time.monotonic()
        total += len(todo)
        job = _wait_job(requests, backend_url, done_jobs)
        served = "not promoted"
        metrics = job.get("metrics", {})
        if job["state"] == "done" and metrics.get("promoted"):
            version = metrics["reward_version"]
            _wait(
                lambda v=version: (
                    v
                    in requests.get(f"{backend_url}/health", timeout=5)
                    .json()
                    .get("model_version", "")
                ),
                120,
            )
            served = f"{time.monotonic() - last_annotation:.1f} s"
        elif job["state"] == "failed":
            served = f"failed: {job['message']}"
        registry = lineage(registry_dir, project_id)  # the demo project's own versions
        current = registry.current("reward")
        policy = registry.current("policy")
        mean = float("nan")
        if "policy_score_last" in metrics:
            # PPO's own figure: the new reward model's mean score of the updated policy's answers.
            mean = metrics["policy_score_last"]
        elif current is not None and policy_tasks:
            # No policy step this round: the served reward model scores the policy's answers in the project.
            model = RewardModel.load(current.path)
            prompts = [d["prompt"] for d in policy_tasks for _ in (1, 2)]
            answers = [d[k] for d in policy_tasks for k in ("answer1", "answer2")]
            scores = model.score(prompts, answers)
            mean = sum(scores) / len(scores)
        accuracy = metrics.get("accuracy_after")
        print(
            f"{number:>5} {total:>11} {metrics.get('reward_version', '-'):>15} "
            f"{'n/a' if accuracy is None else format(accuracy, '.3f'):>12} {policy.label if policy else 'base':>12} {mean:>11.3f} {served:>21}",
            flush=True,
        )
        if metrics.get("live_accuracy") is not None:
            print(
                f"      the served proxy ranked {metrics['live_accuracy']:.3f} of "
                f"{metrics['fresh_pairs']} fresh labels of {metrics['fresh_labels_of']} right",
                flush=True,
            )
        for reason in metrics.get("alarm") or []:
            print(f"      overoptimization alarm, {metrics['policy_version']} not served: {reason}")


def _wait_job(requests, backend_url: str, done: set[int], timeout: float = 3600) -> dict:
    def finished():
        for job in requests.get(f"{backend_url}/jobs", timeout=5).json()["jobs"]:
            if job["id"] not in done and job["state"] in ("done", "failed"):
                done.add(job["id"])
                return job
        return None

    return _wait(finished, timeout)


def _wait(check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise UserError(f"the backend did not finish training in {timeout:.0f} s; see its log")
