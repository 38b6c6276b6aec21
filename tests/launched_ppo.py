"""PPO under `accelerate launch`, run by tests/test_distributed.py (one process or several).

Each process writes what the test compares into OUT:

* grads-<world>-<rank>.pt: the gradient of the first update on one fixed rollout of 8
  responses (the same in every run: sampled with one seed, then each process takes its
  consecutive share), so one process and two can be compared on the same data;
* rank-<rank>.json: a short run of its own (adaptive KL on): every update's reduced
  metrics, the KL coefficient before each update and after the last, the running score moments, the responses this
  process sampled, and the version the run wrote.

Usage: python tests/launched_ppo.py POLICY_DIR OUT_DIR
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from training.distributed import num_processes, process_index
from training.models import load_causal_lm
from training.ppo import PPOConfig, PPOTrainer, Rollout, save_policy_version
from training.registry import Registry

PROMPTS = [
    "Name a colour.",
    "Say something kind.",
    "What is water?",
    "Count to three.",
    "Who wrote the novel?",
    "Explain plants.",
    "Pick a number.",
    "Describe a fox.",
]


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    return [len(r) / 10 for r in responses]


def shard(rollout: Rollout, start: int, stop: int) -> Rollout:
    return Rollout(
        *(
            value[start:stop]
            for value in (getattr(rollout, f.name) for f in dataclasses.fields(Rollout))
        )
    )


def first_update_gradients(policy: str) -> dict[str, torch.Tensor]:
    """The gradient of one update on a rollout every run samples alike (seed 1234, the whole
    batch in each process, normalization off so the rollout needs no other process)."""
    world, rank = num_processes(), process_index()
    model, tokenizer = load_causal_lm(policy)
    config = PPOConfig(
        updates=1,
        batch_size=8,
        mini_batch_size=8,
        samples_per_prompt=2,
        max_new_tokens=8,
        normalize_scores=False,
        max_grad_norm=0.0,  # the raw gradient, not its clipped direction
    )
    trainer = PPOTrainer(model, tokenizer, length_reward, config)
    prompts = PROMPTS[:4]
    torch.manual_seed(1234)
    whole = trainer.rollout([p for p in prompts for _ in range(config.samples_per_prompt)])
    share = len(whole.texts) // world
    mine = shard(whole, rank * share, (rank + 1) * share)
    trainer.rollout = lambda _prompts: mine  # type: ignore[method-assign,assignment]
    n = len(prompts) // world
    trainer.step(prompts[rank * n : (rank + 1) * n])
    return {
        name: p.grad.detach().clone()
        for name, p in trainer.unwrapped.named_parameters()
        if p.grad is not None
    }


def short_run(policy: str, registry: Registry) -> dict:
    sampled: list[str] = []

    def reward(prompts: list[str], responses: list[str]) -> list[float]:
        sampled.extend(responses)
        return length_reward(prompts, responses)

    model, tokenizer = load_causal_lm(policy)
    config = PPOConfig(
        updates=3,
        batch_size=8,
        mini_batch_size=4,
        max_new_tokens=8,
        learning_rate=1e-3,
        adaptive_kl=True,
        target_kl=0.01,  # far from the run's KL, so the coefficient moves every update
        kl_horizon=16,
    )
    trainer = PPOTrainer(model, tokenizer, reward, config)
    history = trainer.train(PROMPTS)
    version = save_policy_version(trainer, registry, {"test": "launched_ppo"})
    m = trainer.score_moments
    return {
        "kl_coef": [h["objective/kl_coef"] for h in history] + [trainer.kl.value],
        "score_moments": [m.count, m.mean, m.m2],
        "metrics": history,
        "sampled": sampled,
        "version": version.name,
    }


def main(policy: str, out: Path) -> None:
    world, rank = num_processes(), process_index()
    torch.save(first_update_gradients(policy), out / f"grads-{world}-{rank}.pt")
    result = short_run(policy, Registry(out / "registry"))
    (out / f"rank-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
