"""DPO (Rafailov et al., 2023) on the annotators' preference pairs, with TRL's DPOTrainer."""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from training.models import load_causal_lm
from training.policy import conversational, fit_with_trl
from training.registry import Registry, Version


@dataclass
class DPOSettings:
    beta: float = field(
        default=0.1, metadata={"help": "Strength of the implicit KL to the reference."}
    )
    learning_rate: float = field(
        default=5e-7, metadata={"help": "Learning rate (DPO wants small ones)."}
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the pairs."})
    max_steps: int = field(default=-1, metadata={"help": "If > 0, exactly this many steps."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Pairs per step."})
    max_length: int = field(default=512, metadata={"help": "Prompt + answer tokens."})


def train_dpo(
    pairs: Dataset,
    registry: Registry,
    start_from: str,
    settings: DPOSettings,
    promote: bool = True,
    metadata: dict | None = None,
) -> Version:
    """A new policy version trained with DPO on prompt/chosen/rejected pairs."""
    if len(pairs) == 0:
        raise ValueError("no preference pairs for DPO: annotate comparisons or rankings first")
    model, tokenizer = load_causal_lm(start_from)
    tokenizer.padding_side = "left"
    data = conversational(
        pairs.select_columns(["prompt", "chosen", "rejected"]), tokenizer, ("chosen", "rejected")
    )
    return fit_with_trl(
        DPOTrainer,
        DPOConfig,
        settings,
        model,
        tokenizer,
        data,
        registry,
        {"algorithm": "dpo", "started_from": start_from, "pairs": len(pairs), **(metadata or {})},
        promote,
    )
