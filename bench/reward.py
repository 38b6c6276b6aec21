"""Benchmark: a reward model on real human preferences (FineGrainedRLHF qa-feedback).

Fixed split: the first 400 questions train, the last 100 are held out (ties excluded:
"no preference" judgments give no pair). The pairwise judgments go through the real path:
Label Studio tasks -> export JSON -> feedback records -> preference pairs. Reports
held-out pairwise accuracy, wall time, pairs/s and peak memory for the trained model,
beside two baselines in the same run: the untrained backbone and "the longer answer wins".

    .venv/bin/python bench/reward.py [--epochs 1] [--lr 5e-5] [--passage-chars 1000]
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from pathlib import Path

import torch

from training.finegrained import DEFAULT_PATH as DATA
from training.finegrained import finegrained_split, load_finegrained, preference_pairs
from training.models import load_sequence_classifier, resolve_reward_backbone
from training.registry import Registry
from training.reward import (
    RewardModel,
    RewardTrainingConfig,
    longer_answer_accuracy,
    pairwise_accuracy,
    train_reward,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="questions per step, each with all its judged pairs",
    )
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument(
        "--passage-chars",
        type=int,
        default=0,
        help="prompt = the retrieved passages cut to this many characters, then the question (0: question only)",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="train on questions 1-320 and evaluate on 321-400 (for choosing epochs and rates)",
    )
    parser.add_argument(
        "--eval-steps",
        type=int,
        default=0,
        help="held-out evaluation every N steps (0: only at the end)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=14.0,
        help="stop training after this many minutes (the model is still evaluated)",
    )
    args = parser.parse_args()

    train_records, test_records = finegrained_split(load_finegrained(DATA))
    if args.validation:  # choose settings without touching the 100 held-out questions
        train_records, test_records = finegrained_split(train_records, 320)
    train = preference_pairs(train_records, passage_chars=args.passage_chars)
    test = preference_pairs(test_records, passage_chars=args.passage_chars)
    backbone = resolve_reward_backbone(args.backbone)
    model, tokenizer = load_sequence_classifier(backbone)
    untrained = pairwise_accuracy(RewardModel(model, tokenizer, "untrained", args.max_length), test)
    config = RewardTrainingConfig(
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        logging_steps=10,
        eval_steps=args.eval_steps,
        max_minutes=args.max_minutes,
    )
    with tempfile.TemporaryDirectory() as home:
        started = time.perf_counter()
        result = train_reward(train, test, Registry(Path(home) / "registry"), backbone, config)
        wall = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    m = result.metrics
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )
    print(
        f"data: {len(train)} training pairs ({len(train_records)} questions), {len(test)} "
        f"{'validation' if args.validation else 'held-out'} pairs ({len(test_records)} questions)"
    )
    print(
        f"config: epochs {args.epochs}, lr {args.lr}, batch {args.batch_size}, max_length {args.max_length}, "
        f"passages {f'{args.passage_chars} characters' if args.passage_chars else 'no'}"
    )
    print(f"{'model':<28}{'held-out accuracy':>18}")
    print(f"{'longer answer wins':<28}{longer_answer_accuracy(test):>18.3f}")
    print(f"{'untrained backbone':<28}{untrained:>18.3f}")
    print(f"{'trained reward model':<28}{m['accuracy_after']:>18.3f}")
    print(
        f"training: {m['steps']} steps (budget {args.max_minutes:g} min), {m['seconds']:.0f} s ({m['pairs_per_second']:.1f} pairs/s); "
        f"wall time with evaluation {wall:.0f} s; peak memory {peak_gb:.2f} GB"
    )


if __name__ == "__main__":
    main()
