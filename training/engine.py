"""Where completions are sampled: transformers' `generate` in this process (the default),
or a vLLM server (LS_RLHF_GENERATION_ENGINE=vllm, at LS_RLHF_VLLM_URL).

The vLLM server only samples token ids; everything that depends on the policy's
probabilities stays here: prompts are rendered and tokenized by our tokenizer and sent as
token ids, the answers come back as token ids and are decoded here, and PPO recomputes
the sampled tokens' log-probs and values in its own forward pass (as TRL and OpenRLHF do
with vLLM), so the behaviour policy is the one the loss is computed from whatever the
server's kernels round to.

New weights reach the server in place, without a restart: a folder of safetensors (a
registry version as it is, or a trainer's policy saved under `weights_dir`) is reloaded
by the worker extension of ml_backend/harness/vllm_worker.py through vLLM's development
endpoint /collective_rpc, then the prefix cache is dropped (it holds the old weights'
keys and values) and the server's weight version is set to a label that says which
weights it serves, so that a process that finds the label already there reloads nothing.
Both processes must see the folder: the same machine, or a volume shared by both.
"""

from __future__ import annotations

import logging
import shutil
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from training.settings import Settings, SettingsError

log = logging.getLogger(__name__)

START_HINT = (
    "start one with `ls-rlhf vllm` (it needs vLLM in .venv-vllm: `make vllm`), or set "
    "LS_RLHF_GENERATION_ENGINE=hf to generate in this process"
)


class EngineError(SettingsError):
    """The engine the settings ask for cannot be used; the message says how to install or
    start it (a SettingsError, so the command line prints it as one line)."""


@dataclass
class VLLMEngine:
    """A vLLM server started by ml_backend/harness/vllm_server.py (or `ls-rlhf vllm`)."""

    url: str
    weights_dir: Path  # where weights made in this process are saved for the server to read
    timeout: float = 600.0
    model: str = field(default="", init=False)  # the name the server serves its model as
    last_load_seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        try:
            response = requests.get(f"{self.url}/v1/models", timeout=10)
            response.raise_for_status()
            self.model = response.json()["data"][0]["id"]
        except (requests.RequestException, ValueError, KeyError, IndexError) as err:
            raise EngineError(
                f"no vLLM server answers at {self.url} ({type(err).__name__}): {START_HINT}"
            ) from None

    def _post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = requests.post(f"{self.url}{path}", json=body, timeout=self.timeout)
        if response.status_code >= 400:
            raise EngineError(
                f"vLLM answered {path} with {response.status_code}: {response.text[:300]}"
            )
        return response.json() if response.content else None

    def serving(self) -> str:
        """The label of the weights the server serves ("default": those it started with)."""
        response = requests.get(f"{self.url}/weight_info", timeout=10)
        if response.status_code == 404:
            raise EngineError(
                f"the vLLM server at {self.url} has no development endpoints: start it with "
                "VLLM_SERVER_DEV_MODE=1 and the worker extension, as `ls-rlhf vllm` does"
            )
        return str(response.json()["weight_version"])

    def serve_folder(self, folder: str | Path, label: str | None = None) -> float:
        """Serve the weights in `folder` (an HF folder of safetensors of the served
        model's architecture), unless the server already serves `label` (default: the
        folder's path); returns the seconds the reload took (0 when none was needed)."""
        label = label or str(Path(folder).resolve())
        if self.serving() == label:
            return 0.0
        started = time.perf_counter()
        self._post("/collective_rpc", {"method": "reload_from", "args": [str(folder)]})
        self._post("/reset_prefix_cache")
        self._post("/update_weight_version", {"new_version": label})
        self.last_load_seconds = time.perf_counter() - started
        log.info("vLLM serves %s (reloaded in %.2f s)", label, self.last_load_seconds)
        return self.last_load_seconds

    def serve_model(self, model: Any, label: str | None = None) -> float:
        """Save `model` (a transformers model, float32 or not) under weights_dir and serve
        it; returns the seconds of saving and reloading together."""
        if label is not None and self.serving() == label:
            return 0.0
        started = time.perf_counter()
        folder = Path(self.weights_dir) / uuid.uuid4().hex
        model.save_pretrained(folder)
        try:
            self.serve_folder(folder, label or f"in-process:{folder.name}")
        finally:
            # vLLM reads the files during the reload; once it is done they are not needed.
            shutil.rmtree(folder, ignore_errors=True)
        self.last_load_seconds = time.perf_counter() - started
        return self.last_load_seconds

    def sample(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_completions: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[list[list[int]]]:
        """`num_completions` sampled continuations (token ids, an ending eos included) of
        each prompt, in prompt order. Nothing but temperature and top_p shapes sampling
        (no top-k, penalties or the model's generation_config)."""

        def one(index: int) -> list[list[int]]:
            body: dict[str, Any] = {
                "model": self.model,
                "prompt": list(prompt_ids[index]),
                "n": num_completions,
                "max_tokens": max_new_tokens,
                "min_tokens": min_new_tokens or 0,
                "temperature": temperature,
                "top_p": top_p if temperature > 0 else 1.0,
                "top_k": -1,
                "stop_token_ids": list(stop_token_ids),
                "return_token_ids": True,
                "skip_special_tokens": False,
            }
            if seed is not None:
                # vLLM seeds the n samples of a request seed, seed + 1, ...: a stride of n
                # keeps every sample of the call on its own seed.
                body["seed"] = seed + index * num_completions
            choices = self._post("/v1/completions", body)["choices"]
            return [c["token_ids"] for c in sorted(choices, key=lambda c: c["index"])]

        # One request per prompt, all in flight at once: the server batches them itself.
        with ThreadPoolExecutor(max_workers=max(1, min(32, len(prompt_ids)))) as pool:
            return list(pool.map(one, range(len(prompt_ids))))


def engine_from_settings(settings: Settings) -> VLLMEngine | None:
    """The vLLM engine the settings ask for, or None for generation in this process."""
    if settings.generation_engine == "hf":
        return None
    return VLLMEngine(settings.vllm_url, Path(settings.home) / "vllm-weights")
