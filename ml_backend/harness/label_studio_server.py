"""Run a real Label Studio as a child process from its own virtual environment.

Used by the demo and the tests. Label Studio is never imported here: it puts its own
folders on sys.path and ships a top-level package called `web`. It is started on
loopback with a known admin, a legacy API token, and the settings that let it reach a
backend on 127.0.0.1 (SSRF protection off: for a local demo or test only).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from training.label_studio_client import client

if TYPE_CHECKING:
    from label_studio_sdk import LabelStudio

log = logging.getLogger(__name__)


def pinned_versions() -> dict[str, str]:
    """The versions pinned in ml_backend/versions.env (KEY=value lines)."""
    text = (Path(__file__).resolve().parents[1] / "versions.env").read_text()
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.startswith("#")}


LABEL_STUDIO_VERSION = pinned_versions()["LABEL_STUDIO_VERSION"]


class LabelStudioStartError(RuntimeError):
    """Label Studio could not be started; the message points at its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_label_studio(venv: str | os.PathLike[str] | None = None) -> Path:
    """The `label-studio` executable: in `venv`, $LS_RLHF_LABEL_STUDIO_VENV, ./.venv-ls or PATH."""
    candidates = [
        venv,
        os.environ.get("LS_RLHF_LABEL_STUDIO_VENV"),
        Path.cwd() / ".venv-ls",
        Path(__file__).resolve().parents[2] / ".venv-ls",
    ]
    for folder in candidates:
        if folder and (Path(folder) / "bin" / "label-studio").is_file():
            return Path(folder) / "bin" / "label-studio"
    found = shutil.which("label-studio")
    if found:
        return Path(found)
    raise LabelStudioStartError(
        f"label-studio not found: install it in its own environment with "
        f"`python -m venv .venv-ls && .venv-ls/bin/pip install label-studio=={LABEL_STUDIO_VERSION}` "
        f"(`make setup` does this) or set LS_RLHF_LABEL_STUDIO_VENV"
    )


@dataclass
class LabelStudioServer:
    data_dir: Path
    port: int = field(default_factory=free_port)
    username: str = "admin@example.com"
    password: str = "ls-rlhf-admin"
    token: str = "ls-rlhf-test-token-0123456789"
    executable: Path | None = None
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self.data_dir) / "label-studio.log"

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            # Label Studio reads plain USERNAME, PORT, ... as its own settings.
            if k not in ("USERNAME", "PASSWORD", "HOST", "PORT", "DEBUG")
            and not k.startswith("LS_RLHF_")
        }
        env.update(
            LABEL_STUDIO_USERNAME=self.username,
            LABEL_STUDIO_PASSWORD=self.password,
            LABEL_STUDIO_USER_TOKEN=self.token,
            LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
            # Let Label Studio call a backend and webhooks on 127.0.0.1.
            ML_BLOCK_LOCAL_IP="false",
            SSRF_PROTECTION_ENABLED="false",
            USE_DEFAULT_BANNED_SUBNETS="false",
            SENTRY_DSN="",
            FRONTEND_SENTRY_DSN="",
            COLLECT_ANALYTICS="false",
            LATEST_VERSION_CHECK="false",
            LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED="false",
        )
        return env

    def init_data_dir(self) -> None:
        """Run the migrations once (30-50 s); copying the folder afterwards starts in seconds."""
        exe = self.executable or find_label_studio()
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            subprocess.run(
                [str(exe), "init", "--no-browser", "-q", "--data-dir", str(self.data_dir)],
                env=self.environment(),
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=600,
            )

    def start(self, timeout: float = 180.0) -> LabelStudioServer:
        exe = self.executable or find_label_studio()
        Path(self.data_dir).mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.process = subprocess.Popen(
            [
                str(exe),
                "start",
                "--no-browser",
                "--internal-host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--username",
                self.username,
                "--password",
                self.password,
                "--user-token",
                self.token,
                "--enable-legacy-api-token",
            ],
            env=self.environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LabelStudioStartError(
                    f"Label Studio exited with {self.process.returncode}; see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if b"UP" in response.read():
                        log.info("Label Studio is up at %s", self.url)
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise LabelStudioStartError(
            f"Label Studio did not answer /health in {timeout:.0f} s; see {self.log_path}"
        )

    def client(self) -> LabelStudio:
        """An SDK client logged in as this server's admin."""
        return client(url=self.url, api_key=self.token)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
