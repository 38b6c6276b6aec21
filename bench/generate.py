"""Benchmark: completions for Label Studio tasks, batched as the product does it.

Three ways to do the same work (N prompts x K completions x T new tokens, default policy):

* product:    training.generation.generate_completions (chat template, left padding,
              batches of --batch-size prompts, decode), what `ls-rlhf generate` and /predict run;
* per-prompt: one model.generate call per prompt, the pattern of the public
              label-studio-ml-backend LLM examples (timed on --per-prompt-sample prompts: it
              is a rate, and the slow path would otherwise dominate the run);
* ceiling:    a bare batched model.generate on pre-tokenized batches of the same size
              (in file order), without rendering or decoding: what batching alone reaches.
              The product also sorts prompts by length to cut padding, so it can beat it.

Every path generates exactly T new tokens (min_new_tokens = T) so they do equal work.
Prints tasks/s (a task = one prompt with its K completions) and the ratios.

With --engine vllm the product path runs once more through a vLLM server
(LS_RLHF_GENERATION_ENGINE=vllm: training/engine.py), started here from .venv-vllm on
the same model and dtype after the in-process paths are done; its start-up time is
printed, not counted in its rate.

    .venv/bin/python bench/generate.py [--prompts 32] [--dtype float32] [--engine vllm]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from training.finegrained import DEFAULT_PATH as DATA
from training.generation import generate_completions, render_prompt
from training.models import load_causal_lm, resolve_policy
from training.settings import Settings


def load_prompts(n: int) -> list[str]:
    if DATA.is_file():
        return [r["question"] for r in json.loads(DATA.read_text())[:n]]
    return [
        f"Explain, in two sentences, fact number {i} about the history of science."
        for i in range(n)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--completions", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="prompts per generate call")
    parser.add_argument("--per-prompt-sample", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--model", default="default", help="policy: 'default', an HF id or a folder"
    )
    parser.add_argument(
        "--engine",
        default="hf",
        choices=["hf", "vllm"],
        help="vllm: also time the product path through a vLLM server",
    )
    args = parser.parse_args()

    settings = Settings.from_env()
    path = resolve_policy(args.model, settings.models_cache_dir)
    model, tokenizer = load_causal_lm(path, dtype=args.dtype)
    prompts = load_prompts(args.prompts)
    k, t = args.completions, args.new_tokens
    common = dict(
        max_new_tokens=t,
        min_new_tokens=t,
        do_sample=True,
        temperature=0.8,
        top_p=0.95,
        top_k=None,
        num_return_sequences=k,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    generate_completions(
        model, tokenizer, prompts[:2], num_completions=k, max_new_tokens=4
    )  # warm-up

    started = time.perf_counter()
    generate_completions(
        model,
        tokenizer,
        prompts,
        num_completions=k,
        max_new_tokens=t,
        min_new_tokens=t,
        temperature=0.8,
        top_p=0.95,
        batch_size=args.batch_size,
    )
    product = len(prompts) / (time.perf_counter() - started)

    batches = []
    tokenizer.padding_side = "left"
    for i in range(0, len(prompts), args.batch_size):
        texts = [render_prompt(tokenizer, p) for p in prompts[i : i + args.batch_size]]
        batches.append(
            tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        )
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model.generate(**batch, **common)
    ceiling = len(prompts) / (time.perf_counter() - started)

    sample = prompts[: args.per_prompt_sample]
    started = time.perf_counter()
    with torch.inference_mode():
        for prompt in sample:
            inputs = tokenizer(
                render_prompt(tokenizer, prompt), return_tensors="pt", add_special_tokens=False
            )
            output = model.generate(**inputs, **common)
            tokenizer.batch_decode(
                output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
            )
    per_prompt = len(sample) / (time.perf_counter() - started)

    rows = [("product", product), ("per-prompt", per_prompt), ("ceiling", ceiling)]
    if args.engine == "vllm":
        rows.append(("product, vLLM", vllm_rate(args, path, tokenizer, prompts, k, t)))

    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, dtype {args.dtype}"
    )
    print(
        f"work: {len(prompts)} prompts x {k} completions x {t} new tokens, batch {args.batch_size} prompts"
    )
    print(f"{'path':<15}{'tasks/s':>10}{'tokens/s':>10}")
    for name, rate in rows:
        print(f"{name:<15}{rate:>10.3f}{rate * k * t:>10.1f}")
    print(f"product / per-prompt = {product / per_prompt:.2f}x (target >= 5x)")
    print(f"product / ceiling    = {product / ceiling:.1%} (target >= 90%)")


def vllm_rate(args, path: str, tokenizer, prompts: list[str], k: int, t: int) -> float:
    """tasks/s of the product path through a vLLM server on the same model and dtype."""
    from ml_backend.harness.vllm_server import VLLMServer
    from training.engine import VLLMEngine

    with tempfile.TemporaryDirectory() as scratch:
        server = VLLMServer(Path(path), Path(scratch), dtype=args.dtype, kv_cache_gb=2)
        started = time.perf_counter()
        server.start()
        print(f"vLLM server started in {time.perf_counter() - started:.0f} s", flush=True)
        try:
            engine = VLLMEngine(server.url, Path(scratch) / "weights")
            run = dict(num_completions=k, temperature=0.8, top_p=0.95, engine=engine)
            generate_completions(None, tokenizer, prompts[:2], max_new_tokens=4, **run)  # warm-up
            started = time.perf_counter()
            generate_completions(
                None,
                tokenizer,
                prompts,
                max_new_tokens=t,
                min_new_tokens=t,
                batch_size=args.batch_size,
                **run,
            )
            return len(prompts) / (time.perf_counter() - started)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
