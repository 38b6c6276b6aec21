"""Reward models: scoring answers, and fitting a Bradley-Terry model on preference pairs.

A reward model maps (prompt, answer) to a scalar; trained on pairs where people preferred
`chosen` over `rejected`, it maximizes log sigmoid(r(chosen) - r(rejected) - margin)
(Bradley-Terry; InstructGPT section 3.5). TRL's `RewardTrainer` is the engine.

One function, `format_reward_input`, turns (prompt, answer) into token ids for both
training and scoring, so a model is always scored the way it was trained:

* encoders without a chat template (BERT, the default MiniLM): `[CLS] prompt [SEP] answer [SEP]`
  as one segment; the prompt is cut from the LEFT first, so the answer (where chosen and
  rejected differ) and the end of the prompt (usually the question) survive; only an answer
  that alone is too long is cut, from the right;
* decoders with a chat template: the user/assistant dialogue, cut from the left.

Training is grouped by prompt (InstructGPT section 3.5): a step takes a few prompts, runs
the model ONCE over each distinct answer of each prompt, and puts every judged pair of those
answers into the loss. A ranking of K answers yields K(K-1)/2 pairs from K forward passes
instead of K(K-1), so an epoch over real rankings (K = 4) costs 2-3x less, and the pairs of
one prompt, which share their answers, do not each count as an independent example.

Choosing when to stop without the held-out set: `train_reward` carves a validation split
from the training prompts, evaluates it a few times per epoch (each distinct answer scored
once, so this costs about a tenth of the run), stops once its loss stops improving and keeps
the best weights. On hardware with native bfloat16, forward and backward run under bf16
autocast over float32 master weights (training/precision.py).

The ids are pre-tokenized for TRL: its text path appends an eos token that encoders such as
MiniLM do not have, and it drops over-long pairs instead of truncating them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import RewardConfig, RewardTrainer

from training.consensus import consensus
from training.distributed import (
    from_main_process,
    is_main_process,
    mean_over_processes,
    num_processes,
)
from training.fairness import CounterfactualPenalty
from training.grounding import GROUNDING_FEATURES, grounding_features
from training.models import load_backbone, load_sequence_classifier
from training.precision import resolve_dtype
from training.registry import Registry, Version
from training.reward_eval import RewardEvaluation, evaluation_of, reward_differences
from training.reward_model import (
    TRAINED_PAIRS_FILE,
    RewardModel,
    format_reward_input,
    longer_answer_accuracy,
    pair_key,
    pairwise_accuracy,
)
from training.reward_model import trained_pairs as trained_pairs  # imported from here too
from training.reward_probe import (
    CounterfactualVariants,
    FeatureCache,
    JudgedPairs,
    LinearProbe,
    answer_key,
    answer_token_counts,
    bradley_terry_figures,
    candidate_layers,
    fit_probe,
    is_probe,
    pooled_features,
)
from training.settings import report_to

log = logging.getLogger(__name__)

METHODS = ("auto", "probe", "finetune")


@dataclass
class RewardTrainingConfig:
    method: str = field(
        default="auto",
        metadata={
            "help": "probe: a linear Bradley-Terry model on the frozen backbone's features "
            "(training/reward_probe.py; each answer read once, no backward pass); finetune: "
            "train the backbone and a score head with TRL's RewardTrainer; auto: both, "
            "fine-tuning kept only when its validation loss is lower by more than one "
            "standard error, else the probe (a warm start continues its parent's method)."
        },
    )
    learning_rate: float = field(
        default=2e-4,
        metadata={
            "help": "AdamW peak learning rate (chosen on a validation split; docs/benchmarks.md)."
        },
    )
    num_train_epochs: float = field(
        default=2.0,
        metadata={
            "help": "Most passes over the training pairs; validation stops earlier once it stops improving."
        },
    )
    max_steps: int = field(
        default=-1, metadata={"help": "If > 0, train exactly this many steps (overrides epochs)."}
    )
    max_minutes: float = field(
        default=0.0,
        metadata={
            "help": "Stop training after this many minutes of steps (0 = no limit); the "
            "version is still evaluated and written, with the steps it got."
        },
    )
    per_device_train_batch_size: int = field(
        default=8,
        metadata={
            "help": "Prompts per step; each prompt brings all its answers and all its judged pairs."
        },
    )
    max_length: int = field(
        default=384,
        metadata={"help": "Tokens per (prompt, answer); longer prompts are cut from the left."},
    )
    warmup_ratio: float = field(
        default=0.1, metadata={"help": "Fraction of steps with a linear learning-rate warm-up."}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay."})
    use_margin: bool = field(
        default=True, metadata={"help": "Use the `margin` column (from ratings) in the loss."}
    )
    center_rewards_coefficient: float | None = field(
        default=0.01,
        metadata={
            "help": "Pull mean rewards towards 0 (Eisenstein et al., 2023) so scores stay comparable."
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Trade compute for memory (large backbones on a GPU)."}
    )
    train_top_layers: int = field(
        default=0,
        metadata={
            "help": "Partial fine-tuning: train only the top N transformer layers and the score "
            "head, the rest frozen (0 = all layers). Backward then stops at layer N from the "
            "top, so a step of a large backbone costs little more than its forward pass."
        },
    )
    lora_rank: int = field(
        default=0,
        metadata={
            "help": "Fine-tune low-rank adapters (LoRA, through peft) of this rank on every "
            "linear layer, with the score head, instead of all weights (0 = off); the "
            "adapters are merged into the saved version, so it serves like any other."
        },
    )
    grounding: bool = field(
        default=False,
        metadata={
            "help": "Offer the probe's cross-validation the answers' grounding features "
            "(training/grounding.py: how many of an answer's word n-grams occur in its "
            "prompt, unsupported sentences, repetition), kept only where they lower the "
            "cross-validated loss; for prompts that carry passages or documents (a warm "
            "start keeps its parent's choice). Off by "
            "default: on FineGrainedRLHF they won on validation and lost on the held-out "
            "questions (docs/benchmarks.md)."
        },
    )
    consensus: bool = field(
        default=True,
        metadata={
            "help": "Offer the probe's cross-validation each answer's consensus with the "
            "other answers to its prompt (training/consensus.py: self-consistency), kept "
            "only where it lowers the cross-validated loss; it ranks answers within a "
            "prompt that has three or more, and is 0 for a prompt with one or two (a warm "
            "start keeps its parent's choice). On FineGrainedRLHF it won by "
            "cross-validation and on the validation questions (docs/benchmarks.md)."
        },
    )
    validation_fraction: float = field(
        default=0.1,
        metadata={
            "help": "Share of the training prompts set aside to choose when to stop (never the "
            "held-out set); 0 trains to the end."
        },
    )
    evaluations_per_epoch: int = field(
        default=3,
        metadata={
            "help": "Validation evaluations per epoch (each scores every validation answer "
            "once; three cost about a tenth of the training time)."
        },
    )
    early_stopping_patience: int = field(
        default=2,
        metadata={
            "help": "Stop after this many validation evaluations without a lower validation "
            "loss; the best evaluated weights are kept either way."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "auto (bfloat16 autocast where the hardware has it), float32 or bfloat16."
        },
    )
    promote: str = field(
        default="if_not_worse",
        metadata={
            "help": "Make the new version current: if_not_worse (held-out accuracy vs the current), always, never."
        },
    )
    warm_start: bool = field(
        default=False, metadata={"help": "Start from the current reward version, not the backbone."}
    )
    logging_steps: int = field(
        default=5, metadata={"help": "Steps between logged losses (and curve points)."}
    )
    eval_steps: int | None = field(
        default=None,
        metadata={
            "help": "Steps between validation evaluations (None: from evaluations_per_epoch; "
            "0: no validation, train to the end)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if self.promote not in ("if_not_worse", "always", "never"):
            raise ValueError(f"promote must be if_not_worse, always or never, not {self.promote!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ValueError(
                f"validation_fraction must be in [0, 1), not {self.validation_fraction}"
            )
        if self.lora_rank < 0 or (self.lora_rank and self.train_top_layers):
            raise ValueError(
                "lora_rank must be 0 or more, and LoRA and train_top_layers exclude each other: "
                "set one of them"
            )
        # Settings that shape one method only: silently ignored, they would look applied.
        if self.method == "probe" and (self.lora_rank or self.train_top_layers):
            raise ValueError(
                "lora_rank and train_top_layers shape fine-tuning, and method 'probe' does "
                "not fine-tune: use method 'finetune' or 'auto', or drop them"
            )
        if self.method == "finetune" and self.grounding:
            raise ValueError(
                "grounding features are the linear probe's, and method 'finetune' fits no "
                "probe: use method 'probe' or 'auto', or drop grounding"
            )
        resolve_dtype(self.dtype)  # refuses an unknown name


@dataclass
class RewardTrainingResult:
    version: Version
    promoted: bool
    metrics: dict[str, Any]
    evaluation: RewardEvaluation | None  # None when there were no held-out pairs


# `length` (tokens of all a prompt's answers) is read by the length-grouped sampler.
GROUP_COLUMNS = ["ids", "chosen_index", "rejected_index", "margin", "length"]


def tokenize_groups(
    dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, use_margin: bool
) -> Dataset:
    """prompt/chosen/rejected(/margin) rows -> one row per prompt: the token ids of each
    distinct answer (`ids`) and the judged pairs as indices into them."""
    groups: dict[str, dict[str, Any]] = {}
    margins = dataset["margin"] if use_margin and "margin" in dataset.column_names else None
    for row, (prompt, chosen, rejected) in enumerate(
        zip(dataset["prompt"], dataset["chosen"], dataset["rejected"], strict=True)
    ):
        group = groups.setdefault(
            prompt, {"answers": {}, "chosen": [], "rejected": [], "margin": []}
        )
        for answer, column in ((chosen, "chosen"), (rejected, "rejected")):
            group[column].append(group["answers"].setdefault(answer, len(group["answers"])))
        group["margin"].append(float(margins[row] or 0.0) if margins else 0.0)
    ids = [
        [format_reward_input(tokenizer, prompt, a, max_length) for a in g["answers"]]
        for prompt, g in groups.items()
    ]
    return Dataset.from_dict(
        {
            "ids": ids,
            "length": [sum(len(answer) for answer in group) for group in ids],
            "chosen_index": [g["chosen"] for g in groups.values()],
            "rejected_index": [g["rejected"] for g in groups.values()],
            "margin": [g["margin"] for g in groups.values()],
        }
    )


def collate_groups(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Batches of prompt groups: all their answers padded into one tensor, pair indices
    shifted to rows of that tensor."""

    def collate(groups: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences: list[list[int]] = []
        chosen: list[int] = []
        rejected: list[int] = []
        margin: list[float] = []
        for group in groups:
            offset = len(sequences)
            sequences += group["ids"]
            chosen += [offset + i for i in group["chosen_index"]]
            rejected += [offset + i for i in group["rejected_index"]]
            margin += group["margin"]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "chosen_index": torch.tensor(chosen),
            "rejected_index": torch.tensor(rejected),
            "margin": torch.tensor(margin, dtype=torch.float),
        }

    return collate


class PairwiseRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer on prompt groups (see `tokenize_groups`), plus an optional extra
    loss term.

    The loss is TRL's: -log sigmoid(r_chosen - r_rejected - margin) averaged over the pairs,
    plus `center_rewards_coefficient` x the mean squared reward. `extra_loss(model) -> scalar
    tensor` is added to every training step's loss; the fairness penalty
    (training/fairness.py) uses it to push the scores of counterfactual variants of the same
    text together.
    """

    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenize_groups did the work

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = cast(Any, GROUP_COLUMNS)  # typed None in Trainer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        outputs = model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
        )
        rewards = outputs.logits.squeeze(-1)
        chosen = rewards[inputs["chosen_index"]]
        rejected = rewards[inputs["rejected_index"]]
        difference = chosen - rejected
        loss = -torch.nn.functional.logsigmoid(difference - inputs["margin"]).mean()
        center = cast(RewardConfig, self.args).center_rewards_coefficient
        if center is not None:
            loss = loss + center * torch.mean(rewards**2)
        if mode == "train" and self.extra_loss is not None:
            extra = self.extra_loss(model)
            self._metrics["train"]["extra_loss"].append(float(extra.detach()))
            loss = loss + extra
        if mode == "train":
            self._total_train_tokens += int(inputs["attention_mask"].sum())
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self._total_train_tokens]
        with torch.no_grad():
            metrics["min_reward"].append(rewards.min().item())
            metrics["mean_reward"].append(rewards.mean().item())
            metrics["max_reward"].append(rewards.max().item())
            # Per pair, not per batch: the logged mean then weighs every pair alike even when
            # the last evaluation batch holds only a few prompts.
            metrics["accuracy"].extend((difference > 0).float().tolist())
            metrics["margin"].extend(difference.tolist())
        return (loss, outputs) if return_outputs else loss


class _TimeBudget(TrainerCallback):
    """Stops training once the budget is spent, so a bounded run still yields a version."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self.started = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        # On the main process's clock: processes that stopped at different steps would
        # wait for each other's gradients for ever.
        if from_main_process(time.perf_counter() - self.started >= self.seconds):
            control.should_training_stop = True


class _KeepBest(TrainerCallback):
    """Early stopping on the validation loss, keeping the best evaluated weights in memory.

    transformers' `load_best_model_at_end` needs a checkpoint on disk at every evaluation;
    a copy of the weights in memory is cheaper and leaves nothing behind. The loss, not the
    accuracy, decides: on a few hundred validation pairs accuracy moves in steps of several
    points, while the Bradley-Terry loss also sees how confident each ranking is.
    """

    def __init__(self, patience: int) -> None:
        self.patience = max(1, patience)
        self.best_loss = math.inf
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.last_step: int | None = None
        self.worse = 0
        self.stopped = False

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        self.last_step = state.global_step
        loss = (metrics or {}).get("eval_loss")
        if loss is None or model is None:
            return
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.worse = loss, state.global_step, 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return
        self.worse += 1
        if self.worse >= self.patience and not control.should_training_stop:
            log.info(
                "validation loss has not improved for %d evaluations (best %.4f at step %d): stopping",
                self.worse,
                self.best_loss,
                self.best_step,
            )
            self.stopped = control.should_training_stop = True

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


class _Progress(TrainerCallback):
    def __init__(self, report: Callable[[float], None]) -> None:
        self.report = report

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps:
            self.report(state.global_step / state.max_steps)


def fingerprint(dataset: Dataset) -> str:
    digest = hashlib.sha256()
    for row in zip(dataset["prompt"], dataset["chosen"], dataset["rejected"], strict=True):
        digest.update(json.dumps(row).encode())
    return digest.hexdigest()[:16]


def train_reward(
    train: Dataset,
    eval: Dataset,
    registry: Registry,
    backbone: str,
    config: RewardTrainingConfig | None = None,
    extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    data_info: dict[str, Any] | None = None,
    progress: Callable[[float], None] | None = None,
    extra_evaluations: Mapping[str, Callable[[RewardModel], dict[str, Any]]] | None = None,
) -> RewardTrainingResult:
    """Fit a reward model on `train`, judge it on `eval`, write a version, maybe promote it.

    A share of `train`'s prompts (`validation_fraction`) is set aside to choose what the
    method leaves open: a linear probe's layer and regularization, a fine-tuning run's
    stopping point (training stops once the validation loss has not improved for
    `early_stopping_patience` evaluations and keeps the best evaluated weights). `eval` is
    only scored at the end, so nothing is chosen on it.

    `extra_loss` (fine-tuning only) is added to every step's loss; `extra_evaluations` name
    further figures of the trained model (as it will be served), e.g. {"fairness":
    counterfactual gaps}; each lands in the version's metadata under its name.
    """
    config = config or RewardTrainingConfig()
    if len(train) == 0:
        raise ValueError("no preference pairs to train on: annotate comparisons or rankings first")
    current = registry.current("reward")
    method = config.method
    if method == "auto" and config.warm_start and current is not None:
        # A warm start continues its parent's method: the loop's retrains stay cheap.
        method = "probe" if is_probe(current.path) else "finetune"
    # The counterfactual penalty has a form for both methods (a loss term on the backbone,
    # a term of the probe's objective); any other extra loss is a term on the backbone only.
    # `auto` fine-tunes under either: a probe's penalty flattens only the feature directions
    # of the variants it is given, so groups and templates it never saw keep their gaps
    # (bench/fairness.py: 0.55-1.21 of the plain held-out gap for the probe, 0.02-0.09 for
    # fine-tuning, at equal accuracy); `--method probe` still takes the penalty.
    counterfactual = extra_loss if isinstance(extra_loss, CounterfactualPenalty) else None
    if method == "auto" and extra_loss is not None:
        method = "finetune"
    if extra_loss is not None and counterfactual is None and method != "finetune":
        raise ValueError(
            "an extra loss term trains the backbone, a linear probe has none: "
            "use method finetune (--method finetune) with it"
        )
    # A probe cross-validates over every training pair; fine-tuning stops on a validation
    # split, and `auto` compares the two methods on that split.
    fit, validation = (train, None) if method == "probe" else _validation_split(train, config)
    if num_processes() > 1 and not is_main_process():
        return _beside_the_main_process(
            _Run(fit, validation, eval, Path(), backbone, current, config, None), method, extra_loss
        )
    with registry.stage("reward") as staged:
        run = _Run(fit, validation, eval, staged, backbone, current, config, progress)
        if method == "finetune":
            fitted = _fine_tune(run, extra_loss)
        else:
            fitted = _probe_or_fine_tune(run, method, counterfactual)
        # What this version learned from, so a warm start can tell new annotations from old.
        (staged / TRAINED_PAIRS_FILE).write_text(
            "".join(
                f"{pair_key(*row)}\n"
                for row in zip(train["prompt"], train["chosen"], train["rejected"], strict=True)
            )
        )
        # Judged as it will be served: reloaded from the folder, in the serving precision.
        served = RewardModel.load(staged, config.max_length, dtype=config.dtype)
        # A tiny project can leave no held-out pairs: the version is trained, but unjudged.
        difference = reward_differences(served.score, eval) if len(eval) else None
        evaluation = evaluation_of(difference, eval) if difference is not None else None
        accuracy_after = evaluation.accuracy if evaluation else float("nan")
        # The served version on the same pairs, pair by pair, for the promotion gate.
        current_right = None
        if current is not None and difference is not None:
            current_model = RewardModel.load(current.path, config.max_length, dtype=config.dtype)
            current_right = reward_differences(current_model.score, eval) > 0
        current_accuracy = None if current_right is None else float(current_right.mean())
        extra = {name: figures(served) for name, figures in (extra_evaluations or {}).items()}
        metrics = {
            "method": fitted.method,
            "accuracy_before": fitted.accuracy_before,
            "accuracy_after": accuracy_after,
            "current_accuracy": current_accuracy,
            "longer_answer_accuracy": longer_answer_accuracy(eval),
            "train_pairs": len(fit),
            "validation_pairs": 0 if validation is None else len(validation),
            "eval_pairs": len(eval),
            **fitted.metrics,
        }
        tolerance = (
            _paired_standard_error(difference > 0, current_right)
            if difference is not None and current_right is not None
            else 0.0
        )
        metrics["promotion_tolerance"] = round(tolerance, 4)
        promoted = _should_promote(config.promote, accuracy_after, current_accuracy, tolerance)
        version = registry.commit(
            "reward",
            staged,
            {
                "metrics": _finite(metrics),
                "evaluation": evaluation.to_dict() if evaluation else None,
                **extra,
                "parent": current.name if current else None,
                "started_from": fitted.started_from,
                "backbone": backbone,
                "config": asdict(config),
                "data": {"fingerprint": fingerprint(train), **(data_info or {})},
                "curves": fitted.curves,
            },
            promote=promoted,
        )
    log.info(
        "reward %s (%s): held-out accuracy %.3f (current %s), %s",
        version.label,
        fitted.method,
        accuracy_after,
        "none" if current_accuracy is None else f"{current_accuracy:.3f}",
        "promoted" if promoted else "not promoted",
    )
    return from_main_process(
        RewardTrainingResult(
            version=version, promoted=promoted, metrics=metrics, evaluation=evaluation
        )
    )


def _beside_the_main_process(
    run: _Run, method: str, extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None
) -> RewardTrainingResult:
    """A process of `accelerate launch` other than the main one: it takes its share of
    fine-tuning's batches (in a scratch folder of its own) and returns the version that the
    main process judges and commits. A linear probe is the main process's alone: it reads
    each answer once, with no gradient to share; so `auto` runs its probe there while the
    others wait at fine-tuning's first step, and fine-tunes with all of them."""
    import tempfile

    if method == "finetune" or (method == "auto" and run.validation is not None):
        with tempfile.TemporaryDirectory(prefix="ls-rlhf-rank-") as scratch:
            run.staged = Path(scratch)
            _fine_tune(run, extra_loss)
    return from_main_process(cast(RewardTrainingResult, None))


@dataclass
class _Fitted:
    """What a fitting method leaves in the staged folder besides the weights."""

    metrics: dict[str, Any]
    started_from: str
    method: str = "finetune"
    accuracy_before: float | None = None  # the untrained model, where there is one
    curves: str | None = None


@dataclass
class _Run:
    """What both fitting methods read: the data, the staged folder, the start point."""

    fit: Dataset
    validation: Dataset | None
    eval: Dataset
    staged: Path
    backbone: str
    current: Version | None
    config: RewardTrainingConfig
    progress: Callable[[float], None] | None


def _fine_tune(run: _Run, extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None) -> _Fitted:
    """Fine-tune a sequence classifier with TRL's RewardTrainer on prompt groups."""
    fit, validation, eval, staged = run.fit, run.validation, run.eval, run.staged
    backbone, current, config, progress = run.backbone, run.current, run.config, run.progress
    bf16 = resolve_dtype(config.dtype) == "bfloat16"
    warm = bool(config.warm_start and current and not is_probe(current.path))
    start_from = str(current.path) if warm and current else backbone
    model, tokenizer = load_sequence_classifier(start_from)
    if config.train_top_layers > 0:
        freeze_below_top_layers(model, config.train_top_layers)
    accuracy_before = (  # a figure for the version's metadata, which the main process writes
        pairwise_accuracy(
            RewardModel(model, tokenizer, "before", config.max_length, autocast=bf16), eval
        )
        if is_main_process()
        else None
    )
    if tokenizer.pad_token is None:  # decoders such as GPT-2 pad with their eos token
        tokenizer.pad_token = tokenizer.eos_token
    if config.lora_rank > 0:
        model = _with_lora(model, config.lora_rank)
    train_groups = tokenize_groups(fit, tokenizer, config.max_length, config.use_margin)
    validation_groups = (
        tokenize_groups(validation, tokenizer, config.max_length, config.use_margin)
        if validation is not None
        else None
    )
    trainer = PairwiseRewardTrainer(
        model=model,
        args=_trainer_args(config, staged / "trainer", len(train_groups), validation, bf16),
        data_collator=collate_groups(tokenizer.pad_token_id),
        train_dataset=train_groups,
        eval_dataset=validation_groups,
        processing_class=tokenizer,
    )
    trainer.extra_loss = extra_loss
    keep_best = _KeepBest(config.early_stopping_patience)
    if validation_groups is not None:
        trainer.add_callback(keep_best)
    if progress:
        trainer.add_callback(_Progress(progress))
    if config.max_minutes > 0:
        trainer.add_callback(_TimeBudget(config.max_minutes))
    started = time.perf_counter()
    output = trainer.train()
    if validation_groups is not None:
        if keep_best.last_step != trainer.state.global_step:
            trainer.evaluate()  # the weights training ended with are a candidate too
        keep_best.restore(model)
    seconds = time.perf_counter() - started
    if config.lora_rank > 0:
        model = cast(Any, model).merge_and_unload()  # a plain folder: serving needs no peft
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    shutil.rmtree(staged / "trainer", ignore_errors=True)
    return _Fitted(
        metrics={
            "train_loss": mean_over_processes(output.training_loss),  # every process's
            "steps": trainer.state.global_step,
            "best_step": keep_best.best_step,
            "best_validation_loss": keep_best.best_loss if keep_best.best_step else None,
            "stopped_early": keep_best.stopped,
            "epochs": round(trainer.state.epoch or 0, 3),
            "seconds": round(seconds, 2),
            "pairs_per_second": round(len(fit) * (trainer.state.epoch or 0) / seconds, 2),
            "precision": "bfloat16 autocast" if bf16 else "float32",
        },
        started_from="current version" if warm else backbone,
        accuracy_before=accuracy_before,
        curves=plot_curves(trainer.state.log_history, staged / "training_curves.png"),
    )


@dataclass
class _Probed:
    """A linear probe fitted in memory, with what it read, before anything is saved."""

    probe: LinearProbe
    model: Any
    tokenizer: PreTrainedTokenizerBase
    layers: list[int]
    features: torch.Tensor  # [layers, answers, hidden]
    answers: dict[tuple[str, str], int]
    started_from: str
    dtype: str
    seconds: float
    read: int = 0  # answers the backbone read (a warm start reuses its parent's features)
    variants: CounterfactualVariants | None = None  # the counterfactual penalty's texts
    grounding: int = 0  # trailing grounding columns of `features` (training/grounding.py)

    def pairs(self, dataset: Dataset, use_margin: bool) -> JudgedPairs:
        return _judged_pairs(self.answers, dataset, use_margin)

    def probe_features(self, with_consensus: bool = True) -> torch.Tensor:
        """[answers, columns]: the chosen layer's features, with the grounding columns only
        where the probe kept them, and its consensus column (over every answer read) where
        it kept that and `with_consensus`."""
        x = self.features[self.layers.index(self.probe.layer)]
        if self.grounding and not self.probe.grounding:
            x = x[:, : x.shape[1] - self.grounding]
        if with_consensus and self.probe.consensus:
            hidden = x[:, : self.features.shape[-1] - self.grounding]
            x = torch.cat([x, consensus([p for p, _ in self.answers], hidden)[:, None]], -1)
        return x

    def rewards(self, rows: torch.Tensor) -> torch.Tensor:
        """The probe's rewards of these answers (rows of `features`)."""
        return self.probe(self.probe_features()[rows])

    def prompts(self) -> list[str]:
        """The prompt of each row of `features`."""
        return [p for p, _ in self.answers]

    def refit(self, datasets: Sequence[Dataset], use_margin: bool) -> None:
        """The chosen layer and l2 again, on more pairs (the validation split's too)."""
        pairs = [self.pairs(d, use_margin) for d in datasets]
        joined = JudgedPairs(
            *(
                torch.cat([getattr(p, f) for p in pairs])
                for f in ("chosen", "rejected", "margin", "fold")
            )
        )
        selection = self.probe.selection
        refitted = fit_probe(
            self.features,
            self.layers,
            joined,
            [selection["l2"]],
            self.probe.layer,
            self.variants,
            self.grounding,
            self.probe.grounding,
            self.prompts() if self.probe.consensus else None,
            self.probe.consensus,
        )
        refitted.selection = {**selection, "refitted_on_pairs": len(joined)}
        self.probe = refitted

    def save(self, staged: Path, max_length: int) -> None:
        self.model.float().save_pretrained(staged)  # scoring casts to its own precision
        self.tokenizer.save_pretrained(staged)
        self.probe.save(staged)
        keys = [answer_key(p, a) for p, a in self.answers]
        # The columns the probe uses, so that a warm start (which keeps its choice) reuses them;
        # not consensus, which depends on every answer of a prompt and is computed anew.
        FeatureCache(
            dict(zip(keys, range(len(keys)), strict=True)), self.probe_features(False)
        ).save(staged, max_length)

    def metrics(self, fit_pairs: int) -> dict[str, Any]:
        return {
            "steps": 0,
            "epochs": 1,  # the backbone reads each answer once
            "best_step": None,
            "stopped_early": False,
            "probe_layer": self.probe.layer,
            "probe_l2": self.probe.selection["l2"],
            "probe_grounding": self.probe.grounding,
            "probe_consensus": self.probe.consensus,
            "probe_cross_validation_loss": self.probe.selection["cross_validation_loss"],
            "answers_read": self.read,
            "seconds": round(self.seconds, 2),
            "pairs_per_second": round(fit_pairs / max(self.seconds, 1e-9), 2),
            "precision": self.dtype,
        }


def _fit_linear_probe(
    datasets: Sequence[Dataset],
    backbone: str,
    current: Version | None,
    config: RewardTrainingConfig,
    counterfactual: CounterfactualPenalty | None = None,
) -> _Probed:
    """Read every distinct answer of `datasets` once with the frozen backbone; fit a linear
    probe (training/reward_probe.py) on the first dataset's pairs. A warm start keeps the
    current probe's backbone and layer and refits the weights: there is no optimizer state
    to carry over, and a fit takes seconds. With `counterfactual`, its variant pairs are
    read too and the probe's objective penalizes their reward differences."""
    dtype = resolve_dtype(config.dtype)  # features as scoring will compute them
    warm = bool(config.warm_start and current and is_probe(current.path))
    start_from = str(current.path) if warm and current else backbone
    model, tokenizer = load_backbone(start_from, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    parent = LinearProbe.load(Path(start_from)) if warm else None
    keep = parent.layer if parent is not None else None
    layers = [keep] if keep is not None else candidate_layers(model)
    started = time.perf_counter()
    answers: dict[tuple[str, str], int] = {}
    for dataset in datasets:
        for prompt, chosen, rejected in zip(
            dataset["prompt"], dataset["chosen"], dataset["rejected"], strict=True
        ):
            answers.setdefault((prompt, chosen), len(answers))
            answers.setdefault((prompt, rejected), len(answers))
    keys = [answer_key(p, a) for p, a in answers]
    # A warm start keeps its parent's choice, as it keeps its layer.
    grounded = parent.grounding if parent is not None else config.grounding
    grounding = len(GROUNDING_FEATURES) if grounded else 0
    offered = parent.consensus if parent is not None else config.consensus
    width = int(model.config.hidden_size) + grounding
    cached = FeatureCache.load(Path(start_from), config.max_length) if warm else None
    if cached is not None and cached.features.shape[-1] != width:
        cached = None  # a cache from another layout (older versions): read everything again
    missing = [i for i, key in enumerate(keys) if cached is None or key not in cached.rows]
    texts = list(answers)
    encoded = [format_reward_input(tokenizer, *texts[i], config.max_length) for i in missing]
    last = answer_token_counts(tokenizer, [texts[i][1] for i in missing], encoded)
    read = pooled_features(model, tokenizer, encoded, layers, last, desc="reading answers")
    features = torch.zeros((len(layers), len(keys), width), dtype=torch.float32)
    features[:, missing, : read.shape[-1]] = read
    if grounding:  # the same columns behind every layer's features
        features[:, :, -grounding:] = grounding_features(*zip(*texts, strict=True))
    if cached is not None:  # a warm start reads only the answers its parent had not read
        known = [i for i, key in enumerate(keys) if key in cached.rows]
        features[0, known] = cached.features[[cached.rows[keys[i]] for i in known]]
    variants = (
        _read_variants(model, tokenizer, layers, counterfactual, config.max_length, grounding)
        if counterfactual is not None
        else None
    )
    probe = fit_probe(
        features,
        layers,
        _judged_pairs(answers, datasets[0], config.use_margin),
        layer=keep,
        variants=variants,
        grounding=grounding,
        use_grounding=parent.grounding if parent is not None else None,
        prompts=[p for p, _ in answers] if offered else None,
        use_consensus=parent.consensus if parent is not None else None,
    )
    return _Probed(
        probe,
        model,
        tokenizer,
        layers,
        features,
        answers,
        "current version" if warm else backbone,
        dtype,
        seconds=time.perf_counter() - started,
        read=len(missing),
        variants=variants,
        grounding=grounding,
    )


# Variant pairs the probe's penalty reads per attribute, at most (drawn with a fixed seed):
# their features cost a forward pass each, and a few hundred pairs span the directions in
# which a group swap moves the features as well as thousands.
MAX_VARIANT_PAIRS = 512


def _read_variants(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    layers: list[int],
    counterfactual: CounterfactualPenalty,
    max_length: int,
    grounding: int = 0,
) -> CounterfactualVariants:
    """The counterfactual penalty's variant pairs as features of the probe's backbone:
    each distinct (prompt, text) read once, pooled over the text's tokens like an answer."""
    rng = np.random.default_rng(0)
    texts: dict[tuple[str, str], int] = {}
    first, second, attribute = [], [], []
    names = list(counterfactual.by_attribute)
    for index, name in enumerate(names):
        pairs = counterfactual.by_attribute[name]
        if len(pairs) > MAX_VARIANT_PAIRS:
            pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), MAX_VARIANT_PAIRS, False))]
        for prompt, a, b in pairs:
            first.append(texts.setdefault((prompt, a), len(texts)))
            second.append(texts.setdefault((prompt, b), len(texts)))
            attribute.append(index)
    keys = list(texts)
    encoded = [format_reward_input(tokenizer, p, t, max_length) for p, t in keys]
    last = answer_token_counts(tokenizer, [t for _, t in keys], encoded)
    features = pooled_features(model, tokenizer, encoded, layers, last, desc="reading variants")
    if grounding:  # the answers' columns, so that the penalty sees what the probe weighs
        columns = (
            grounding_features(*zip(*keys, strict=True)) if keys else torch.zeros(0, grounding)
        )
        features = torch.cat([features, columns.expand(len(layers), -1, -1)], -1)
    return CounterfactualVariants(
        features,
        torch.tensor(first),
        torch.tensor(second),
        torch.tensor(attribute),
        counterfactual.weight,
        names,
    )


def _judged_pairs(
    answers: dict[tuple[str, str], int], dataset: Dataset, use_margin: bool
) -> JudgedPairs:
    """`dataset`'s pairs as rows of the features of `answers` ((prompt, answer) -> row)."""
    margins = (
        dataset["margin"]
        if use_margin and "margin" in dataset.column_names
        else [0.0] * len(dataset)
    )
    rows = zip(dataset["prompt"], dataset["chosen"], dataset["rejected"], strict=True)
    chosen, rejected, folds = [], [], []
    for prompt, c, r in rows:
        chosen.append(answers[(prompt, c)])
        rejected.append(answers[(prompt, r)])
        folds.append(JudgedPairs.fold_of(prompt))
    return JudgedPairs(
        torch.tensor(chosen),
        torch.tensor(rejected),
        torch.tensor([float(m or 0.0) for m in margins]),
        torch.tensor(folds),
    )


def _probe_or_fine_tune(
    run: _Run, method: str, counterfactual: CounterfactualPenalty | None = None
) -> _Fitted:
    """`probe`: a linear probe. `auto`: a probe and a fine-tuned model, compared pair by
    pair on the validation split; fine-tuning is kept only when its Bradley-Terry loss there
    is lower by more than one standard error of the paired difference (the one-standard-error
    rule: otherwise the probe, which is deterministic, cheaper to retrain and has two settings
    to choose where fine-tuning has millions of weights, is refitted on the validation pairs
    too and kept). With too few pairs for a validation split, `auto` keeps the probe. The
    counterfactual penalty, where given, applies to both."""
    fit, validation, config = run.fit, run.validation, run.config
    sets = [fit] if validation is None else [fit, validation]
    probed = _fit_linear_probe(sets, run.backbone, run.current, config, counterfactual)
    comparison: dict[str, Any] = {}
    if method == "auto" and validation is not None:
        pairs = probed.pairs(validation, config.use_margin)
        probe_difference = probed.rewards(pairs.chosen) - probed.rewards(pairs.rejected)
        tuned = _fine_tune(run, counterfactual)
        # The fine-tuned model as it will be served, on the same validation pairs.
        served = RewardModel.load(run.staged, config.max_length, dtype=config.dtype)
        tuned_difference = torch.as_tensor(
            reward_differences(served.score, validation), dtype=torch.float32
        )
        gain, standard_error = _paired_loss_gain(
            probe_difference, tuned_difference, pairs.margin, list(validation["prompt"])
        )
        probe_loss, probe_accuracy = bradley_terry_figures(probe_difference, pairs.margin)
        tuned_loss, tuned_accuracy = bradley_terry_figures(tuned_difference, pairs.margin)
        comparison = {
            "probe_validation_loss": round(probe_loss, 5),
            "probe_validation_accuracy": round(probe_accuracy, 4),
            "finetune_validation_loss": round(tuned_loss, 5),
            "finetune_validation_accuracy": round(tuned_accuracy, 4),
            "finetune_loss_gain": round(gain, 5),
            "standard_error": round(standard_error, 5),
        }
        keep_tuned = gain > standard_error
        log.info(
            "auto: validation loss %.4f for the linear probe, %.4f for fine-tuning "
            "(gain %.4f, standard error %.4f): keeping %s",
            comparison["probe_validation_loss"],
            comparison["finetune_validation_loss"],
            gain,
            standard_error,
            "fine-tuning" if keep_tuned else "the probe",
        )
        if keep_tuned:
            tuned.metrics = {**tuned.metrics, "auto": {**comparison, "chosen": "finetune"}}
            return tuned
        for path in list(run.staged.iterdir()):  # the fine-tuned files give way to the probe's
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if validation is not None:
        probed.refit([fit, validation], config.use_margin)
    probed.save(run.staged, config.max_length)
    metrics = probed.metrics(len(fit) + (len(validation) if validation is not None else 0))
    if comparison:
        metrics["auto"] = {**comparison, "chosen": "probe"}
    return _Fitted(metrics=metrics, started_from=probed.started_from, method="probe")


def _paired_loss_gain(
    probe_difference: torch.Tensor,
    tuned_difference: torch.Tensor,
    margin: torch.Tensor,
    prompts: Sequence[str],
) -> tuple[float, float]:
    """(how much lower fine-tuning's Bradley-Terry loss is than the probe's, its standard
    error) on the same pairs. The pairs of one prompt share answers, so the error is taken
    over prompts: each prompt's mean per-pair difference is one observation."""
    per_pair = torch.nn.functional.softplus(-(probe_difference - margin)) - (
        torch.nn.functional.softplus(-(tuned_difference - margin))
    )
    by_prompt: dict[str, list[float]] = {}
    for prompt, value in zip(prompts, per_pair.tolist(), strict=True):
        by_prompt.setdefault(prompt, []).append(value)
    means = torch.tensor([sum(v) / len(v) for v in by_prompt.values()])
    if len(means) < 2:
        return float(means.mean()), float("inf")
    return float(means.mean()), float(means.std() / len(means) ** 0.5)


MIN_VALIDATION_PAIRS = 8


def _with_lora(model: PreTrainedModel, rank: int) -> PreTrainedModel:
    """`model` with LoRA adapters of `rank` on every linear layer; peft's sequence-
    classification task keeps the score head (`score` or `classifier`) fully trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    adapters = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules="all-linear",
    )
    return cast(PreTrainedModel, get_peft_model(model, adapters))


def freeze_below_top_layers(model: torch.nn.Module, top: int) -> None:
    """Freeze every parameter except the top `top` transformer layers, the final norm and
    the head: the layers are the longest ModuleList in the model (BERT's encoder.layer,
    Llama's model.layers, GPT-2's transformer.h)."""
    layer_lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not layer_lists:
        raise ValueError(f"{type(model).__name__} has no list of layers to freeze below")
    layers = max(layer_lists, key=len)
    trainable = {id(p) for layer in list(layers)[-top:] for p in layer.parameters()}
    inside_layers = {id(p) for p in layers.parameters()}
    embeddings = {id(p) for p in cast(Any, model).get_input_embeddings().parameters()}
    for name, parameter in model.named_parameters():
        # Outside the layer stack only the embeddings freeze (token, position and their
        # norm: BERT's `embeddings.*`, Llama's `embed_tokens`, GPT-2's `wte`/`wpe`); the final
        # norm, pooler and head train.
        if id(parameter) in inside_layers:
            parameter.requires_grad_(id(parameter) in trainable)
        elif (
            id(parameter) in embeddings
            or "embed" in name
            or name.split(".")[-2:-1] in (["wte"], ["wpe"])
        ):
            parameter.requires_grad_(False)


def _validation_split(
    train: Dataset, config: RewardTrainingConfig
) -> tuple[Dataset, Dataset | None]:
    """(pairs to fit, validation pairs or None): validation prompts are carved from the
    training prompts by hash, so the held-out set never chooses anything."""
    if config.eval_steps == 0 or config.validation_fraction == 0:
        return train, None
    from training.datasets import split_by_prompt

    split = split_by_prompt(train, config.validation_fraction, seed=config.seed + 1)
    if len(split["test"]) < MIN_VALIDATION_PAIRS or len(split["train"]) < MIN_VALIDATION_PAIRS:
        log.info("too few pairs for a validation split (%d): training to the end", len(train))
        return train, None
    return split["train"], split["test"]


def _trainer_args(
    config: RewardTrainingConfig,
    output_dir: Path,
    train_groups: int,
    validation: Dataset | None,
    bf16: bool,
) -> RewardConfig:
    steps_per_epoch = max(1, math.ceil(train_groups / config.per_device_train_batch_size))
    eval_steps = config.eval_steps or max(
        1, math.ceil(steps_per_epoch / max(1, config.evaluations_per_epoch))
    )
    total_steps = (
        config.max_steps
        if config.max_steps > 0
        else math.ceil(steps_per_epoch * config.num_train_epochs)
    )
    # At least two logged losses, so even a short run draws its curve.
    logging_steps = max(1, min(config.logging_steps, total_steps // 2))
    return RewardConfig(
        output_dir=str(output_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=32,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of all steps
        weight_decay=config.weight_decay,
        logging_steps=logging_steps,
        eval_strategy="steps" if validation is not None else "no",
        eval_steps=eval_steps,
        save_strategy="no",  # the best weights are kept in memory (_KeepBest)
        report_to=report_to(),
        seed=config.seed,
        center_rewards_coefficient=config.center_rewards_coefficient,
        max_length=None,  # already truncated by format_reward_input
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
        # Batches of prompts with similar lengths, so padding does not dominate a step.
        train_sampling_strategy="group_by_length",
        # bf16 autocast with float32 master weights; TRL's other CPU default, gradient
        # checkpointing, makes a step several times slower and stays off unless asked for.
        bf16=bf16,
        activation_checkpointing=config.gradient_checkpointing,
    )


def _paired_standard_error(new_right: np.ndarray, current_right: np.ndarray) -> float:
    """Standard error of (new accuracy - current accuracy) on the same pairs: only the pairs
    the two versions judge differently move it (McNemar), so two versions that agree on
    nearly every pair get a tight tolerance, and one annotation more cannot be blocked by
    the coin flips of a few held-out pairs."""
    n = len(new_right)
    discordant = int((new_right != current_right).sum())
    return math.sqrt(discordant) / n if n else 0.0


def _should_promote(
    policy: str, accuracy: float, current_accuracy: float | None, tolerance: float = 0.0
) -> bool:
    """if_not_worse: promote unless held-out accuracy fell by more than `tolerance` (one
    paired standard error: a fall the held-out set can tell from noise)."""
    if policy == "always":
        return True
    if policy == "never":
        return False
    if current_accuracy is None or math.isnan(current_accuracy) or math.isnan(accuracy):
        return True
    return accuracy >= current_accuracy - tolerance


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def plot_curves(log_history: list[dict[str, Any]], path: Path) -> str | None:
    """Training loss, held-out loss and accuracy per step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [
        (h["step"], h["eval_loss"], h.get("eval_accuracy")) for h in log_history if "eval_loss" in h
    ]
    if not train and not evals:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax_loss.plot(
            [e[0] for e in evals], [e[1] for e in evals], marker="o", label="held-out loss"
        )
        ax_acc.plot([e[0] for e in evals], [e[2] for e in evals], marker="o", color="tab:green")
    ax_loss.set(xlabel="step", ylabel="Bradley-Terry loss", title="Loss")
    ax_loss.legend()
    ax_acc.set(xlabel="step", ylabel="pairwise accuracy", title="Held-out accuracy", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
