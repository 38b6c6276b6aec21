"""The measurements of the GPU check (bench/gpu_check.sh): a short PPO run and a reward
training, both in bfloat16, with seconds per update (step) and peak memory.

    python bench/gpu_check.py ppo [--tiny] --json OUT.json
    python bench/gpu_check.py reward [--tiny] --json OUT.json
    python bench/gpu_check.py summary OUT_DIR

The models are the defaults (SmolLM2-135M-Instruct policy, all-MiniLM-L6-v2 backbone), or
with --tiny the tests' tiny random ones (tests/tiny_models.py), for a machine without the
default models. PPO: 1 warm-up update then 3 timed ones, 4 prompts x 2 samples, 32 new
tokens, one minibatch of 8, bf16 autocast over float32 weights; the reward is the answer's
length in characters / 100 (no reward model: the policy's cost is what is measured).
Reward: 20 fine-tuning steps of 8 prompts on 160 synthetic pairs, bf16 autocast, no
validation split. Peak memory: on a GPU the CUDA allocator's peak
(torch.cuda.max_memory_allocated) from the first timed step on; on the CPU the process's
peak resident set from the same point (bench/memory.py), so the two are not the same
measure (the CPU's includes Python and the libraries).

`summary` prints each figure beside the CPU run's of the same configuration, recorded in
bench/gpu_check_cpu.json (docs/benchmarks.md, "The GPU check").
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models
sys.path.insert(0, str(ROOT / "bench"))  # memory

CPU_REFERENCE = ROOT / "bench" / "gpu_check_cpu.json"
PROMPTS = [
    "What is the capital of France?",
    "Explain how plants make food.",
    "Give one tip for staying healthy.",
    "Why is the sky blue?",
    "What does a compiler do?",
    "Name three primary colours.",
    "How do vaccines work?",
    "What is the boiling point of water?",
]


def device_info() -> dict:
    import torch

    info: dict[str, object] = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "device": "cuda",
            "name": props.name,
            "memory_gb": round(props.total_memory / 1024**3, 1),
            "bf16": torch.cuda.is_bf16_supported(),
        }
    else:
        info |= {"device": "cpu", "name": platform.processor() or platform.machine()}
    return info


class Peak:
    """Peak memory from `reset()` on: the CUDA allocator's on a GPU, else the resident set."""

    def __init__(self) -> None:
        import torch

        self.cuda = torch.cuda.is_available()

    def reset(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            from memory import reset_peak_memory

            reset_peak_memory()

    def gb(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 1024**3
        from memory import peak_memory_gb

        return peak_memory_gb()


def models(tiny: bool, scratch: Path) -> tuple[str, str, str]:
    """(policy, reward backbone, "default" or "tiny"): the default models where they are
    installed (the policy converted on first use), else, saying why, the tiny ones."""
    if not tiny:
        from training.models import resolve_policy, resolve_reward_backbone
        from training.settings import Settings

        try:
            settings = Settings.from_env()
            policy = resolve_policy(settings.policy_model, settings.models_cache_dir)
            backbone = resolve_reward_backbone(settings.reward_backbone)
            for folder in (policy, backbone):
                if not (Path(folder) / "config.json").is_file():
                    raise FileNotFoundError(f"{folder}/config.json")
            return policy, backbone, "default"
        except (
            OSError,
            ValueError,
            ImportError,
        ) as err:  # not installed: tiny ones still check the device
            print(f"default models not usable ({type(err).__name__}: {err}); the tiny ones run")
    from tiny_models import build_tiny_policy, build_tiny_reward_backbone

    return (
        str(build_tiny_policy(scratch / "policy")),
        str(build_tiny_reward_backbone(scratch / "reward")),
        "tiny",
    )


def measure_ppo(tiny: bool) -> dict:
    import torch

    from training.models import load_causal_lm
    from training.ppo import PPOConfig, PPOTrainer

    with tempfile.TemporaryDirectory() as scratch:
        policy, _, kind = models(tiny, Path(scratch))
        started = time.perf_counter()
        model, tokenizer = load_causal_lm(policy)
        config = PPOConfig(
            updates=4,
            batch_size=8,
            samples_per_prompt=2,
            mini_batch_size=8,
            max_new_tokens=32,
            bf16=True,
            seed=0,
        )
        trainer = PPOTrainer(
            model, tokenizer, lambda _p, answers: [len(a) / 100 for a in answers], config
        )
        load_seconds = time.perf_counter() - started
        peak = Peak()
        trainer.step(PROMPTS[:4])  # warm-up: kernels, allocator, autotuning
        peak.reset()
        seconds = []
        for update in range(1, config.updates):
            start = 4 * update % len(PROMPTS)
            began = time.perf_counter()
            metrics = trainer.step((PROMPTS * 2)[start : start + 4])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - began)
            if not all(v == v for v in metrics.values()):  # a nan anywhere
                raise RuntimeError(f"PPO update {update} gave nan metrics: {metrics}")
        return {
            "what": "ppo",
            "models": kind,
            "policy": policy,
            "seconds_per_update": round(sum(seconds) / len(seconds), 3),
            "updates_timed": len(seconds),
            "peak_memory_gb": round(peak.gb(), 3),
            "load_seconds": round(load_seconds, 1),
            "last_score": round(metrics["objective/score"], 4),
            "last_kl": round(metrics["objective/kl"], 4),
        }


def synthetic_pairs(n: int):
    from datasets import Dataset

    rows = []
    for i in range(n):
        topic = PROMPTS[i % len(PROMPTS)]
        rows.append(
            {
                "prompt": f"{topic} (question {i})",
                "chosen": f"A careful answer to question {i}: it explains the reason step by "
                "step, gives an example and says where to read more.",
                "rejected": f"No idea about {i}.",
            }
        )
    return Dataset.from_list(rows)


def measure_reward(tiny: bool) -> dict:
    from training.registry import Registry
    from training.reward import RewardTrainingConfig, train_reward

    with tempfile.TemporaryDirectory() as scratch:
        _, backbone, kind = models(tiny, Path(scratch))
        pairs = synthetic_pairs(192)
        train, held_out = pairs.select(range(160)), pairs.select(range(160, 192))
        config = RewardTrainingConfig(
            method="finetune",
            max_steps=20,
            per_device_train_batch_size=8,
            validation_fraction=0.0,
            dtype="bfloat16",
            promote="always",
        )
        peak = Peak()
        peak.reset()
        started = time.perf_counter()
        result = train_reward(
            train, held_out, Registry(Path(scratch) / "registry"), backbone, config
        )
        wall = time.perf_counter() - started
        m = result.metrics
        return {
            "what": "reward",
            "models": kind,
            "backbone": backbone,
            "seconds_per_step": round(m["seconds"] / max(1, m["steps"]), 4),
            "steps": m["steps"],
            "pairs_per_second": m["pairs_per_second"],
            "precision": m["precision"],
            "peak_memory_gb": round(peak.gb(), 3),
            "wall_seconds": round(wall, 1),
            "held_out_accuracy": m["accuracy_after"],
        }


FIGURES = {
    "ppo": [("s / update", "seconds_per_update"), ("peak memory GB", "peak_memory_gb")],
    "reward": [
        ("s / step", "seconds_per_step"),
        ("pairs / s", "pairs_per_second"),
        ("peak memory GB", "peak_memory_gb"),
    ],
}


def summary(folder: Path) -> str:
    reference = json.loads(CPU_REFERENCE.read_text()) if CPU_REFERENCE.is_file() else {}
    machine = json.loads((folder / "device.json").read_text())
    lines = [
        f"device: {machine.get('name')} ({machine.get('device')}), torch {machine.get('torch')}",
        f"CPU reference: {reference.get('machine', 'none recorded')} "
        f"({reference.get('date', '?')}; {CPU_REFERENCE.relative_to(ROOT)})",
        "",
        f"{'run':<8} {'models':<8} {'figure':<16} {'this run':>10} {'CPU run':>10} {'ratio':>8}",
    ]
    for what, figures in FIGURES.items():
        path = folder / f"{what}.json"
        if not path.is_file():
            lines.append(f"{what:<8} (no result: see its step's output above)")
            continue
        run = json.loads(path.read_text())
        cpu = reference.get(f"{what}-{run['models']}", {})
        if cpu:
            lines.append(f"{'':<8} CPU run: {cpu.get('config', '')} [{cpu.get('source', '')}]")
        for label, key in figures:
            mine, theirs = run.get(key), cpu.get(key)
            ratio = f"{theirs / mine:.1f}x" if mine and theirs else ""
            lines.append(
                f"{what:<8} {run['models']:<8} {label:<16} {mine!s:>10} {theirs!s:>10} {ratio:>8}"
            )
    lines += [
        "",
        "ratio: the CPU run's figure / this run's (for s / step and memory: how many times "
        "less; for pairs / s, read it inverted). GPU memory is the allocator's peak, the "
        "CPU's the resident set: not the same measure.",
        reference.get("note", ""),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["ppo", "reward", "device", "summary"])
    parser.add_argument("folder", nargs="?", help="summary: the folder of the results")
    parser.add_argument("--tiny", action="store_true", help="the tiny random models")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args()
    if args.what == "summary":
        print(summary(Path(args.folder)))
        return 0
    result = {
        "device": device_info,
        "ppo": lambda: measure_ppo(args.tiny),
        "reward": lambda: measure_reward(args.tiny),
    }[args.what]()
    result["device"] = result.get("device") or device_info()["device"]
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
