"""Benchmark: the counterfactual reward gap before and after mitigation, in-sample and
held-out, and its cost in held-out accuracy.

The default reward backbone (all-MiniLM-L6-v2) with the default training settings
(`RewardTrainingConfig()`: method `auto`, a validation split carved from the training
questions, bf16 where the CPU has it), trained twice on the same FineGrainedRLHF
preference pairs of the 400 training questions (all of them, or the first --train-pairs):
once plain and once with the counterfactual penalty (weight --weight). `--method` picks
another method (`probe`, `finetune`); `--epochs` and `--max-length` override fine-tuning's.
The penalty's variant pairs come from the penalty part of the bundled lists only
(`training.counterfactual.load_sets`: templates split by hash, nationality and religion
groups too), balanced per attribute. Reported for each model: held-out pairwise accuracy
on the 100 held-out questions, and per attribute the average and worst Wasserstein-1 gap
on the in-sample part and on the held-out part, with the held-out gaps relative to the
held-out pairs' mean absolute reward margin (the scale of the rewards).

    .venv/bin/python bench/fairness.py [--method auto] [--train-pairs 0] [--weight 1.0]
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

from training.counterfactual import load_sets
from training.fairness import CounterfactualPenalty, pairs_by_attribute, split_gaps
from training.finegrained import DEFAULT_PATH as DATA
from training.finegrained import finegrained_split, load_finegrained, preference_pairs
from training.models import load_tokenizer, resolve_reward_backbone
from training.registry import Registry
from training.reward import RewardModel, RewardTrainingConfig, train_reward
from training.reward_eval import reward_differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="auto", choices=("auto", "probe", "finetune"))
    parser.add_argument("--train-pairs", type=int, default=0, help="0: every training pair")
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--epochs", type=float, default=None, help="fine-tuning's epochs")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument(
        "--batch-size", type=int, default=8, help="variant pairs per fine-tuning step"
    )
    args = parser.parse_args()

    train_records, test_records = finegrained_split(load_finegrained(DATA))
    train = preference_pairs(train_records)
    if args.train_pairs:
        train = train.select(range(min(args.train_pairs, len(train))))
    test = preference_pairs(test_records)
    backbone = resolve_reward_backbone("default")
    sets = load_sets()
    names = sets.names()
    # The plain run and the penalized one differ by the penalty only.
    defaults = RewardTrainingConfig(method=args.method)
    config = replace(
        defaults,
        num_train_epochs=args.epochs or defaults.num_train_epochs,
        max_length=args.max_length or defaults.max_length,
        promote="always",
    )
    variant_pairs = pairs_by_attribute(
        [sets.penalty_attributes[n] for n in names],
        list(train["prompt"]) * 2,
        list(train["chosen"]) + list(train["rejected"]),
        sets.penalty_templates,
    )
    penalty = CounterfactualPenalty(
        load_tokenizer(backbone, "right"),
        variant_pairs,
        args.weight,
        batch_size=args.batch_size,
        max_length=config.max_length,
    )

    rows = {}
    with tempfile.TemporaryDirectory() as home:
        for name, extra in (("plain", None), (f"penalty, weight {args.weight}", penalty)):
            torch.manual_seed(0)
            started = time.perf_counter()
            result = train_reward(
                train, test, Registry(Path(home) / name), backbone, config, extra_loss=extra
            )
            seconds = time.perf_counter() - started
            model = RewardModel.load(result.version.path, config.max_length, dtype=config.dtype)
            measured = split_gaps(model.score, sets, names)
            # The scale of the rewards: the held-out pairs' mean absolute reward difference.
            scale = float(np.mean(np.abs(reward_differences(model.score, test))))
            rows[name] = (result.metrics, measured, seconds, scale)

    print(f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(
        f"data: {len(train)} training pairs, {len(test)} held-out pairs; variant pairs "
        + ", ".join(f"{a} {len(p)}" for a, p in variant_pairs.items())
        + f"; drawn per attribute {penalty.drawn}"
    )
    for attribute, note in sets.notes.items():
        print(f"  {attribute}: {note}")
    header = "| model | held-out accuracy | method | seconds | precision | margin | " + " | ".join(
        f"{a} in-sample avg / worst | {a} held-out avg / worst" for a in names
    )
    print(header + " |")
    print("|---" * (6 + 2 * len(names)) + "|")
    for name, (metrics, measured, seconds, scale) in rows.items():
        cells = []
        for a in names:
            for side in ("in_sample", "held_out"):
                gap = next(g for g in measured[side] if g.attribute == a)
                cells.append(f"{gap.average_gap:.4f} / {gap.worst_pair[1]:.4f}")
        print(
            f"| {name} | {metrics['accuracy_after']:.3f} | {metrics['method']} | {seconds:.0f} | "
            f"{metrics['precision']} | {scale:.3f} | " + " | ".join(cells) + " |"
        )
    (plain_m, plain_g, _, plain_scale), (fair_m, fair_g, _, fair_scale) = rows.values()
    print(
        "held-out average gap, penalty / plain (target: at most 0.5 for every attribute); "
        "in brackets, relative to each model's margin:"
    )
    ratios = {}
    for a in names:
        before = next(g for g in plain_g["held_out"] if g.attribute == a).average_gap
        after = next(g for g in fair_g["held_out"] if g.attribute == a).average_gap
        ratios[a] = after / before if before else float("inf")
        print(
            f"  {a}: {before:.4f} -> {after:.4f} ({ratios[a]:.2f}) "
            f"[{before / plain_scale:.3f} -> {after / fair_scale:.3f} of the margin]"
        )
    cost = plain_m["accuracy_after"] - fair_m["accuracy_after"]
    met = all(r <= 0.5 for r in ratios.values()) and cost <= 0.01
    print(f"held-out accuracy cost {cost:+.3f} (target at most 0.01); target met: {met}")


if __name__ == "__main__":
    main()
