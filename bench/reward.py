"""Benchmark: reward models on real human preferences (FineGrainedRLHF qa-feedback).

Fixed split: the first 400 questions train, the last 100 are held out (ties excluded:
"no preference" judgments give no pair). The pairwise judgments go through the real path:
Label Studio tasks -> export JSON -> feedback records -> preference pairs. Each preset is
trained in the same run, one after the other, and reported with its held-out figures
(training/reward_eval.py), minutes, pairs/s and peak memory, beside "the longer answer wins".

    .venv/bin/python bench/reward.py                       # the default against the previous one
    .venv/bin/python bench/reward.py --presets default --passage-chars 2000
    .venv/bin/python bench/reward.py --validation          # choose settings on questions 321-400
    .venv/bin/python bench/reward.py --precision           # float32 vs bfloat16, scoring and a step

Presets: `default` is `RewardTrainingConfig()` as `ls-rlhf train reward` uses it; `previous`
is the default before validation-based stopping (lr 5e-5, 2 epochs to the end, max_length
384, float32), without its periodic held-out evaluations, so its time is a lower bound.
`trl` is the baseline the product must beat: TRL's `RewardTrainer` with `RewardConfig`'s
own defaults (lr 1e-4, 3 epochs, batch 8, max_length 1024, prompt + answer as one text)
on the same backbone and every training pair; `trl-short` the same with one epoch and 192
tokens. Neither goes through the registry; both are scored as TRL formats their input.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from memory import peak_memory_gb, reset_peak_memory  # bench/memory.py (the script's folder)

from training.finegrained import DEFAULT_PATH as DATA
from training.finegrained import finegrained_split, load_finegrained, preference_pairs
from training.models import load_sequence_classifier, resolve_reward_backbone
from training.precision import resolve_dtype
from training.registry import Registry
from training.reward import (
    RewardModel,
    RewardTrainingConfig,
    collate_groups,
    longer_answer_accuracy,
    tokenize_groups,
    train_reward,
)
from training.reward_eval import RewardEvaluation, evaluate_reward

PRESETS = {
    "default": RewardTrainingConfig(),
    "probe": RewardTrainingConfig(method="probe"),
    "finetune": RewardTrainingConfig(method="finetune"),
    "auto": RewardTrainingConfig(method="auto"),
    "previous": RewardTrainingConfig(
        learning_rate=5e-5,
        num_train_epochs=2,
        max_length=384,
        validation_fraction=0,
        dtype="float32",
    ),
}


# TRL's RewardConfig defaults, overridden only where the preset says so.
PLAIN_TRL = {"trl": {}, "trl-short": {"num_train_epochs": 1, "max_length": 192}}


def plain_trl(
    train: Dataset, test: Dataset, backbone: str, **overrides: float
) -> tuple[RewardEvaluation, float]:
    """TRL's RewardTrainer as a user would run it with its defaults; (held-out figures, s)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:  # TRL appends eos to every text; BERT ends on [SEP]
        tokenizer.eos_token = tokenizer.sep_token
    model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    with tempfile.TemporaryDirectory() as out:
        args = RewardConfig(
            output_dir=out, bf16=False, report_to="none", save_strategy="no", **overrides
        )
        columns = train.select_columns(["prompt", "chosen", "rejected"])
        trainer = RewardTrainer(
            model=model, args=args, train_dataset=columns, processing_class=tokenizer
        )
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    model.eval()
    limit = min(args.max_length or 512, tokenizer.model_max_length)

    @torch.no_grad()
    def score(prompts: list[str], answers: list[str]) -> np.ndarray:
        texts = [p + a + tokenizer.eos_token for p, a in zip(prompts, answers, strict=True)]
        out = []
        for i in range(0, len(texts), 32):
            batch = tokenizer(
                texts[i : i + 32],
                padding=True,
                truncation=True,
                max_length=limit,
                return_tensors="pt",
                add_special_tokens=True,
            )
            out.append(model(**batch).logits[:, 0].float().numpy())
        return np.concatenate(out)

    return evaluate_reward(score, test), seconds


def precision_ratios(backbone: str, pairs, max_length: int) -> None:
    """Seconds of scoring 256 answers and of one training step of 8 prompts, float32 against
    bfloat16 (weights for scoring, autocast for training), in this process one after the other."""
    texts = list(zip(pairs["prompt"], pairs["chosen"], strict=True))[:256]
    for dtype in ("float32", "bfloat16"):
        model, tokenizer = load_sequence_classifier(backbone, dtype=dtype)
        scorer = RewardModel(model, tokenizer, dtype, max_length)
        scorer.score(*zip(*texts[:32], strict=True))  # warm-up
        started = time.perf_counter()
        scorer.score(*zip(*texts, strict=True))
        scoring = time.perf_counter() - started
        model, tokenizer = load_sequence_classifier(backbone)
        model.train()
        groups = tokenize_groups(pairs.select(range(64)), tokenizer, max_length, True)
        batch = collate_groups(tokenizer.pad_token_id)([groups[i] for i in range(8)])
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                rewards = model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits.squeeze(-1)
                loss = -torch.nn.functional.logsigmoid(
                    rewards[batch["chosen_index"]] - rewards[batch["rejected_index"]]
                ).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            times.append(time.perf_counter() - started)
        print(
            f"{dtype:<9} scoring 256 answers {scoring:6.2f} s; training step of 8 prompts "
            f"({batch['input_ids'].shape[0]} answers x {batch['input_ids'].shape[1]} tokens) {min(times[1:]):6.2f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="default")
    parser.add_argument(
        "--presets",
        default="default,previous",
        help=f"comma-separated presets: {', '.join([*PRESETS, *PLAIN_TRL])}",
    )
    parser.add_argument(
        "--method", choices=("auto", "probe", "finetune"), help="override the presets' method"
    )
    parser.add_argument("--lr", type=float, help="override the presets' learning rate")
    parser.add_argument("--epochs", type=float, help="override the presets' most epochs")
    parser.add_argument("--batch-size", type=int, help="override: questions per step")
    parser.add_argument("--max-length", type=int, help="override: tokens per (prompt, answer)")
    parser.add_argument(
        "--train-top-layers", type=int, help="override: partial fine-tuning of the top N layers"
    )
    parser.add_argument("--lora-rank", type=int, help="override: LoRA adapters of this rank")
    parser.add_argument("--seed", type=int, help="override: the training seed (default 0)")
    parser.add_argument(
        "--grounding",
        action="store_true",
        default=None,
        help="override: offer the probe grounding features (training/grounding.py)",
    )
    parser.add_argument(
        "--consensus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override: offer the probe the consensus column (training/consensus.py)",
    )
    parser.add_argument(
        "--passage-chars",
        type=int,
        default=0,
        help="prompt = the retrieved passages cut to this many characters, then the question (0: question only)",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="train on questions 1-320 and evaluate on 321-400 (for choosing settings)",
    )
    parser.add_argument(
        "--max-minutes", type=float, default=0.0, help="stop each training after this many minutes"
    )
    parser.add_argument(
        "--precision", action="store_true", help="only the float32 / bfloat16 timing ratios"
    )
    args = parser.parse_args()

    train_records, test_records = finegrained_split(load_finegrained(DATA))
    if args.validation:  # choose settings without touching the 100 held-out questions
        train_records, test_records = finegrained_split(train_records, 320)
    train = preference_pairs(train_records, passage_chars=args.passage_chars)
    test = preference_pairs(test_records, passage_chars=args.passage_chars)
    backbone = resolve_reward_backbone(args.backbone)
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch "
        f"{torch.__version__}, bfloat16 by default: {resolve_dtype('auto') == 'bfloat16'}"
    )
    print(
        f"data: {len(train)} training pairs ({len(train_records)} questions), {len(test)} "
        f"{'validation' if args.validation else 'held-out'} pairs ({len(test_records)} questions), "
        f"passages {f'{args.passage_chars} characters' if args.passage_chars else 'no'}"
    )
    if args.precision:
        precision_ratios(backbone, train, args.max_length or 256)
        return
    print(f"longer answer wins: {longer_answer_accuracy(test):.3f}")
    overrides = {
        "method": args.method,
        "learning_rate": args.lr,
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "max_length": args.max_length,
        "train_top_layers": args.train_top_layers,
        "lora_rank": args.lora_rank,
        "seed": args.seed,
        "grounding": args.grounding,
        "consensus": args.consensus,
    }
    for name in args.presets.split(","):
        if name in PLAIN_TRL:
            reset_peak_memory()
            started = time.perf_counter()
            evaluation, seconds = plain_trl(train, test, backbone, **PLAIN_TRL[name])
            wall = time.perf_counter() - started
            print(f"{name}: TRL RewardTrainer, RewardConfig defaults {PLAIN_TRL[name] or ''}")
            print(f"  held-out: {evaluation.summary()}")
            print(
                f"  training: {seconds:.0f} s; wall time with evaluation {wall / 60:.1f} min; "
                f"peak memory {peak_memory_gb():.2f} GB"
            )
            continue
        config = replace(
            PRESETS[name],
            max_minutes=args.max_minutes,
            logging_steps=10,
            **{k: v for k, v in overrides.items() if v is not None},
        )
        with tempfile.TemporaryDirectory() as home:
            reset_peak_memory()
            started = time.perf_counter()
            result = train_reward(train, test, Registry(Path(home) / "registry"), backbone, config)
            wall = time.perf_counter() - started
        m = result.metrics
        print(
            f"{name}: method {m['method']} {m.get('auto', '')}, lr {config.learning_rate:g}, at most {config.num_train_epochs:g} epochs, batch "
            f"{config.per_device_train_batch_size}, max_length {config.max_length}, "
            f"validation {config.validation_fraction:g}, {m['precision']}"
        )
        print(
            f"  held-out: {result.evaluation.summary() if result.evaluation else 'no held-out pairs'}"
        )
        print(
            f"  training: {m['steps']} steps ({m['epochs']:.2f} epochs, best at step {m['best_step']}, "
            f"stopped early: {m['stopped_early']}, probe layer {m.get('probe_layer')} l2 {m.get('probe_l2')} grounding {m.get('probe_grounding')} consensus {m.get('probe_consensus')}), {m['seconds']:.0f} s, {m['pairs_per_second']:.1f} pairs/s; "
            f"wall time with evaluation {wall / 60:.1f} min; peak memory {peak_memory_gb():.2f} GB"
        )


if __name__ == "__main__":
    main()
