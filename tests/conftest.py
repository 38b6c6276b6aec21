"""Shared fixtures: tiny real models, a real Label Studio server, projects, settings.

One Label Studio runs per test session (its own venv, loopback only); every test gets a
fresh project. The migrated data folder is made once per machine and copied per session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# No model hub here: everything loads from local folders, and nothing should try the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from tiny_models import build_tiny_policy, build_tiny_reward_backbone

from ml_backend.harness.backend_process import BackendServer
from ml_backend.harness.label_studio_server import (
    LABEL_STUDIO_VERSION,
    LabelStudioServer,
    LabelStudioStartError,
    find_label_studio,
)
from training.registry import Registry
from training.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FINEGRAINED = SHARED_DATA / "finegrainedrlhf" / "qa_feedback_dev.json"
OUTPUT = ROOT / "test-output"


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    return build_tiny_policy(tmp_path_factory.mktemp("tiny-policy"))


@pytest.fixture(scope="session")
def tiny_reward_backbone_dir(tmp_path_factory) -> Path:
    return build_tiny_reward_backbone(tmp_path_factory.mktemp("tiny-reward"))


@pytest.fixture
def settings(tmp_path, tiny_policy_dir, tiny_reward_backbone_dir) -> Settings:
    """Settings on tiny models with a fresh home (registry, state) per test."""
    return Settings(
        home=tmp_path / "home",
        policy_model=str(tiny_policy_dir),
        reward_backbone=str(tiny_reward_backbone_dir),
        max_new_tokens=8,
        num_completions=2,
        temperature=1.0,
    )


@pytest.fixture(scope="session")
def finegrained_path() -> Path:
    if not FINEGRAINED.is_file():
        pytest.skip(
            f"real preference data not found at {FINEGRAINED} (it lives in ../shared beside the project)"
        )
    return FINEGRAINED


@pytest.fixture
def output_dir(request) -> Path:
    """test-output/<test name>/: screenshots, plots and reports a person may look at."""
    folder = OUTPUT / request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _label_studio_executable() -> Path:
    try:
        return find_label_studio()
    except LabelStudioStartError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"Label Studio is not installed here ({err})")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory) -> LabelStudioServer:
    """A real Label Studio on 127.0.0.1 for the whole session."""
    exe = _label_studio_executable()
    template = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "ls-rlhf-test"
        / f"label-studio-{LABEL_STUDIO_VERSION}"
    )
    if not (template / "label_studio.sqlite3").is_file():
        shutil.rmtree(template, ignore_errors=True)
        LabelStudioServer(data_dir=template, executable=exe).init_data_dir()
    data_dir = tmp_path_factory.mktemp("label-studio")
    shutil.copytree(template, data_dir, dirs_exist_ok=True)
    server = LabelStudioServer(data_dir=data_dir, executable=exe).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ls_client(label_studio):
    return label_studio.client()


@pytest.fixture
def make_project(ls_client, request):
    """make_project(config_name_or_xml) -> project; deleted after the test."""
    import label_configs

    created = []

    def make(config: str = "pairwise", title: str | None = None):
        xml = config if config.lstrip().startswith("<") else label_configs.load(config)
        project = ls_client.projects.create(
            title=title or f"test {request.node.name}"[:50], label_config=xml
        )
        created.append(project.id)
        return project

    yield make
    for pid in created:
        # Cleanup must not mask the test's own result.
        with contextlib.suppress(Exception):
            ls_client.projects.delete(id=pid)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that hands these settings to a child process."""
    return {**settings.to_env(), "HF_HUB_OFFLINE": "1"}


def run_burst_worker(settings: Settings) -> subprocess.CompletedProcess:
    """`ls-rlhf worker --burst` as a real process: it runs the queued jobs, then exits."""
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "ls-rlhf"), "worker", "--burst"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=300,
    )


def start_redis_server(port: int, folder: Path) -> subprocess.Popen:
    """A real redis-server on 127.0.0.1:`port`, nothing persisted, answering PING on return."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip(
            "redis-server is not installed (apt-get install redis-server; `make setup` does it)"
        )
    command = [server, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    process = subprocess.Popen(
        [*command, "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL
    )
    from redis import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    client, deadline = Redis(port=port), time.monotonic() + 10
    while True:
        try:
            client.ping()
            return process
        except RedisConnectionError:
            if time.monotonic() > deadline:
                process.terminate()
                raise
            time.sleep(0.1)


@pytest.fixture
def start_backend(tmp_path):
    """start_backend(settings) -> a running `ls-rlhf serve` process; stopped after the test."""
    started = []

    def start(settings: Settings) -> BackendServer:
        backend = BackendServer(
            settings,
            tmp_path / f"backend-{len(started)}.log",
            extra_env={"HF_HUB_OFFLINE": "1"},
        )
        started.append(backend)
        return backend.start(timeout=120)

    yield start
    for backend in started:
        backend.stop()


def add_reward_version(settings, backbone_dir):
    """A reward version in the registry: the tiny classifier saved as a version folder."""
    from training.models import load_sequence_classifier

    registry = Registry(settings.registry_dir)
    model, tokenizer = load_sequence_classifier(str(backbone_dir))
    with registry.stage("reward") as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        return registry.commit("reward", staged, {"note": "untrained test version"}, promote=True)


@pytest.fixture
def served(settings, label_studio, start_backend, tiny_reward_backbone_dir, monkeypatch):
    """A backend with a reward version, configured to reach the session's Label Studio."""
    settings = settings.replace(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token
    )
    version = add_reward_version(settings, tiny_reward_backbone_dir)
    for key, value in {
        "LS_RLHF_HOME": str(settings.home),
        "LS_RLHF_POLICY_MODEL": settings.policy_model,
        "LS_RLHF_REWARD_BACKBONE": settings.reward_backbone,
        "LS_RLHF_MAX_NEW_TOKENS": str(settings.max_new_tokens),
        "LS_RLHF_LABEL_STUDIO_URL": label_studio.url,
        "LS_RLHF_LABEL_STUDIO_API_KEY": label_studio.token,
    }.items():
        monkeypatch.setenv(key, value)
    backend = start_backend(settings)
    return backend, f"policy-base+{version.label}"


@pytest.fixture
def fit_tiny_probe(tmp_path, tiny_reward_backbone_dir):
    """fit(train, held_out, **config) -> (result, its reward_probe.json): a linear probe on
    the tiny backbone through `train_reward`, as the CLI trains one."""
    import json

    from training.reward import RewardTrainingConfig, train_reward

    def fit(train, held_out, **config):
        result = train_reward(
            train,
            held_out,
            Registry(tmp_path / "registry"),
            str(tiny_reward_backbone_dir),
            RewardTrainingConfig(method="probe", max_length=64, dtype="float32", **config),
        )
        return result, json.loads((result.version.path / "reward_probe.json").read_text())

    return fit
