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
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
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
    parser.add_argument("--presets", default="default,previous", help="comma-separated presets")
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
    parser.add_argument("--seed", type=int, help="override: the training seed (default 0)")
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
        "seed": args.seed,
    }
    for name in args.presets.split(","):
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
            f"stopped early: {m['stopped_early']}, probe layer {m.get('probe_layer')} l2 {m.get('probe_l2')}), {m['seconds']:.0f} s, {m['pairs_per_second']:.1f} pairs/s; "
            f"wall time with evaluation {wall / 60:.1f} min; peak memory {peak_memory_gb():.2f} GB"
        )


if __name__ == "__main__":
    main()
