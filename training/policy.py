"""Shared pieces of policy training: TRL arguments that suit the machine, conversational
data for chat models, sequence log-probabilities, and committing a policy version."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from training.distributed import mean_over_processes, num_processes, on_main_process
from training.generation import render_prompt
from training.registry import Registry, Version
from training.settings import Settings, report_to


def machine_args(output_dir: Path, settings: Settings | None = None) -> dict[str, Any]:
    """TRL/transformers arguments: bf16 and gradient checkpointing only on a GPU (on a CPU
    they make every step many times slower), no checkpoints, the trackers that
    `LS_RLHF_REPORT_TO` names (of `settings`, or of the environment)."""
    gpu = torch.cuda.is_available()
    return {
        "output_dir": str(output_dir),
        "use_cpu": not gpu,
        "bf16": gpu and torch.cuda.is_bf16_supported(),
        "activation_checkpointing": False,  # transformers 5 name of gradient checkpointing
        "save_strategy": "no",
        "report_to": report_to(settings),
        "logging_steps": 5,
    }


def conversational(dataset: Dataset, tokenizer, answer_columns: tuple[str, ...]) -> Dataset:
    """prompt/answers as chat messages when the tokenizer has a chat template (so TRL renders
    them as the policy sees prompts), plain text otherwise."""
    if not tokenizer.chat_template:
        return dataset

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        out = {"prompt": [{"role": "user", "content": row["prompt"]}]}
        for column in answer_columns:
            out[column] = [{"role": "assistant", "content": row[column]}]
        return out

    keep = ("prompt", *answer_columns)
    return dataset.map(convert, remove_columns=[c for c in dataset.column_names if c not in keep])


@torch.no_grad()
def sequence_logprob(model, tokenizer, prompt: str, answer: str) -> float:
    """log p(answer | prompt) under the model, as the policy sees the prompt."""
    context = render_prompt(tokenizer, prompt)
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context_ids + answer_ids], device=model.device)
    logprobs = torch.log_softmax(model(ids).logits[0, :-1], dim=-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(1, targets[:, None]).squeeze(1)
    return float(picked[len(context_ids) - 1 :].sum())


def commit_policy(
    model,
    tokenizer,
    registry: Registry,
    metadata: dict[str, Any],
    promote: bool,
    log_history: list[dict] | None = None,
) -> Version:
    """Save a trained policy as the next policy version (with a loss curve when given)."""
    with registry.stage("policy") as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        losses = [(h["step"], h["loss"]) for h in log_history or [] if "loss" in h]
        if losses:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.plot(*zip(*losses, strict=True), marker=".")
            ax.set(xlabel="step", ylabel="loss", title=metadata.get("algorithm", "training"))
            fig.tight_layout()
            fig.savefig(staged / "training_curves.png", dpi=90)
            plt.close(fig)
        return registry.commit("policy", staged, metadata, promote=promote)


def fit_with_trl(
    trainer_class: type,
    config_class: type,
    settings: Any,
    model,
    tokenizer,
    data: Dataset,
    registry: Registry,
    metadata: dict[str, Any],
    promote: bool,
) -> Version:
    """Train with a TRL trainer whose config takes `settings`' fields, then commit a version.

    `settings` is a dataclass whose field names are the TRL config's (learning_rate, ...).
    """
    with registry.stage("policy") as scratch:
        args = config_class(**machine_args(scratch / "trainer"), **asdict(settings))
        trainer = trainer_class(
            model=model, args=args, train_dataset=data, processing_class=tokenizer
        )
        result = trainer.train()
    # Under `accelerate launch` the trainer's loss is the main process's batches' alone:
    # averaged over the processes here; the main process commits, every process returns it.
    metrics = {
        "train_loss": mean_over_processes(result.training_loss),
        "steps": trainer.state.global_step,
    }
    return on_main_process(
        lambda: commit_policy(
            model,
            tokenizer,
            registry,
            {
                "config": asdict(settings),
                "metrics": metrics,
                "processes": num_processes(),
                **metadata,
            },
            promote,
            trainer.state.log_history,
        )
    )
