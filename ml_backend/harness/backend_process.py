"""Run `ls-rlhf serve` as a child process on loopback and wait until its models load.

Used by the demo, the loop benchmark and the tests: the backend gets exactly the given
settings (as `LS_RLHF_*` variables), its output goes to a log file, and it is ready once
/health says the models are loaded, which for the default models takes tens of seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from ml_backend.harness.label_studio_server import free_port
from training.settings import Settings


class BackendStartError(RuntimeError):
    """The backend exited, failed to load its models, or did not load them in time."""


@dataclass
class BackendServer:
    settings: Settings
    log_path: Path
    port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> tuple[str, str] | None:
        s = self.settings
        return (s.basic_auth_user, s.basic_auth_password) if s.basic_auth_user else None

    def launch(self) -> BackendServer:
        """Start the process and return at once (the models load in the background)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it for its lifetime
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ml_backend.cli", "serve", "--port", str(self.port)],
            env={**self.settings.to_env(), **self.extra_env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stop() signals the whole group: gunicorn and its workers
        )
        return self

    def wait_until_loaded(self, timeout: float = 600.0) -> BackendServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else None
                raise BackendStartError(f"the backend exited with {code}; see {self.log_path}")
            try:
                health = requests.get(f"{self.url}/health", timeout=2, auth=self.auth).json()
            except (requests.RequestException, ValueError):
                health = {}
            if health.get("models") == "loaded":
                return self
            if health.get("models") == "failed":
                raise BackendStartError(
                    f"the backend could not load its models: {health.get('error')}; see {self.log_path}"
                )
            time.sleep(0.3)
        raise BackendStartError(
            f"the backend did not load its models in {timeout:.0f} s; see {self.log_path}"
        )

    def start(self, timeout: float = 600.0) -> BackendServer:
        return self.launch().wait_until_loaded(timeout)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
