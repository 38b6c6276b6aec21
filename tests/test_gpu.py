"""What needs a CUDA GPU: the trainers and generation on the device, in bfloat16.

Every test here is marked `gpu` and skips, saying so, where CUDA is not available;
bench/gpu_check.sh runs them (`pytest -m gpu`) with its timed runs. They use the tiny
random models, so they check that the code runs on the device in the precision chosen
there, not how fast.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh runs these)"
    ),
]


def test_a_ppo_update_runs_on_the_gpu_in_bf16(tiny_policy_dir):
    from training.models import load_causal_lm
    from training.ppo import PPOConfig, PPOTrainer

    model, tokenizer = load_causal_lm(str(tiny_policy_dir))
    config = PPOConfig(updates=1, batch_size=4, mini_batch_size=4, max_new_tokens=8, bf16=True)
    trainer = PPOTrainer(model, tokenizer, lambda _p, a: [len(x) / 10 for x in a], config)
    assert trainer.accelerator.device.type == "cuda"
    assert next(trainer.unwrapped.parameters()).device.type == "cuda"
    torch.cuda.reset_peak_memory_stats()
    metrics = trainer.step(["Say something.", "Name a colour."])
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert torch.cuda.max_memory_allocated() > 0
    # float32 weights under bf16 autocast (bfloat16 weights are refused)
    assert next(trainer.unwrapped.parameters()).dtype == torch.float32


def test_reward_fine_tuning_runs_on_the_gpu_in_bf16(tiny_reward_backbone_dir, tmp_path):
    from datasets import Dataset

    from training.registry import Registry
    from training.reward import RewardModel, RewardTrainingConfig, train_reward

    pairs = Dataset.from_list(
        [
            {"prompt": f"Question {i}?", "chosen": f"Yes, {i} is right.", "rejected": "No."}
            for i in range(24)
        ]
    )
    result = train_reward(
        pairs.select(range(16)),
        pairs.select(range(16, 24)),
        Registry(tmp_path),
        str(tiny_reward_backbone_dir),
        RewardTrainingConfig(
            method="finetune", max_steps=3, validation_fraction=0.0, dtype="bfloat16"
        ),
    )
    assert result.metrics["precision"] == "bfloat16 autocast"
    served = RewardModel.load(result.version.path, dtype="bfloat16")
    scores = served.score(["Question 1?"], ["Yes, 1 is right."])
    assert math.isfinite(scores[0])


def test_dpo_runs_on_the_gpu(tiny_policy_dir, tmp_path):
    from datasets import Dataset

    from training.policy import machine_args
    from training.preference import DPOSettings, train_dpo
    from training.registry import Registry

    assert machine_args(tmp_path)["use_cpu"] is False
    pairs = Dataset.from_list(
        [{"prompt": f"Q{i}?", "chosen": f"It is {i}.", "rejected": "No."} for i in range(8)]
    )
    version = train_dpo(pairs, Registry(tmp_path), str(tiny_policy_dir), DPOSettings(max_steps=2))
    assert math.isfinite(version.metadata["metrics"]["train_loss"])


def test_generation_runs_on_the_gpu_in_bf16(tiny_policy_dir):
    from training.generation import generate_completions
    from training.models import load_causal_lm

    model, tokenizer = load_causal_lm(str(tiny_policy_dir), dtype="bfloat16")
    model = model.to("cuda")  # type: ignore[arg-type]
    completions = generate_completions(
        model, tokenizer, ["Say something.", "Name a colour."], num_completions=2, max_new_tokens=8
    )
    assert len(completions) == 2
