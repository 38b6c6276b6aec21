"""Supervised fine-tuning on demonstrations and corrections, with TRL's SFTTrainer."""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from training.models import load_causal_lm
from training.policy import conversational, fit_with_trl
from training.registry import Registry, Version


@dataclass
class SFTSettings:
    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate."})
    num_train_epochs: float = field(
        default=2.0, metadata={"help": "Passes over the demonstrations."}
    )
    max_steps: int = field(default=-1, metadata={"help": "If > 0, exactly this many steps."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Examples per step."})
    max_length: int = field(default=512, metadata={"help": "Prompt + completion tokens."})


def train_sft(
    examples: Dataset,
    registry: Registry,
    start_from: str,
    settings: SFTSettings,
    promote: bool = True,
    metadata: dict | None = None,
) -> Version:
    """A new policy version fine-tuned on prompt/completion pairs (loss on the completion only)."""
    if len(examples) == 0:
        raise ValueError(
            "no demonstrations for SFT: annotate the demonstration or critique config first"
        )
    model, tokenizer = load_causal_lm(start_from)
    data = conversational(
        examples.select_columns(["prompt", "completion"]), tokenizer, ("completion",)
    )
    return fit_with_trl(
        SFTTrainer,
        SFTConfig,
        settings,
        model,
        tokenizer,
        data,
        registry,
        {
            "algorithm": "sft",
            "started_from": start_from,
            "examples": len(examples),
            **(metadata or {}),
        },
        promote,
    )
