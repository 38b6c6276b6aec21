"""`ls-rlhf vllm`: start the vLLM server that LS_RLHF_GENERATION_ENGINE=vllm samples from."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from urllib.parse import urlparse

from ml_backend.cli import UserError
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "vllm",
        help="start a vLLM server (from .venv-vllm) for LS_RLHF_GENERATION_ENGINE=vllm",
        description="Starts vLLM's OpenAI-compatible server on the policy, on 127.0.0.1 at the "
        "port of LS_RLHF_VLLM_URL, until interrupted. With LS_RLHF_GENERATION_ENGINE=vllm, "
        "task generation, `ls-rlhf eval policy` and PPO rollouts sample from it, and give it "
        "each new policy's weights (reloaded in place). vLLM lives in its own environment: "
        "`make vllm` installs it in .venv-vllm.",
    )
    parser.add_argument(
        "--model",
        help="model folder to start with (default: the current policy version, else the base "
        "policy); later versions must share its architecture",
    )
    parser.add_argument("--dtype", default="auto", help="vLLM's --dtype (auto, bfloat16, float32)")
    parser.add_argument(
        "--kv-cache-gb", type=int, default=2, help="KV cache size on a CPU (VLLM_CPU_KVCACHE_SPACE)"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM compile the model (slower start, faster generation) instead of eager mode",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ml_backend.harness.vllm_server import VLLMServer, VLLMStartError
    from training.models import resolve_policy
    from training.registry import Registry

    settings = Settings.from_env()
    model = args.model
    if model is None:
        current = Registry(settings.registry_dir).current("policy")
        model = (
            str(current.path)
            if current
            else resolve_policy(settings.policy_model, settings.models_cache_dir)
        )
    port = urlparse(settings.vllm_url).port
    if port is None:
        raise UserError(f"LS_RLHF_VLLM_URL={settings.vllm_url!r} names no port")
    server = VLLMServer(
        Path(model),
        Path(settings.home) / "vllm",
        port=port,
        dtype=args.dtype,
        kv_cache_gb=args.kv_cache_gb,
        enforce_eager=not args.compile,
    )
    print(f"starting vLLM on {model} (log: {server.log_path}); this takes a minute or more")
    try:
        server.start()
    except VLLMStartError as err:
        raise UserError(str(err)) from None
    print(f"vLLM serves at {server.url}: set LS_RLHF_GENERATION_ENGINE=vllm to use it")
    try:
        while server.process is not None and server.process.poll() is None:
            time.sleep(1)
    finally:
        server.stop()
    return 0
