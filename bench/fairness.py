"""Benchmark: the counterfactual reward gap before and after mitigation, and its cost.

Default reward backbone (all-MiniLM-L6-v2) trained twice on the same FineGrainedRLHF
preference pairs (first --train-pairs pairs of the 400 training questions), once plain
and once with the counterfactual penalty (weight --weight, pairs from the bundled
templates and from training answers that mention an attribute). Reported for each: the
average and worst Wasserstein-1 gap per attribute on the bundled templates, and held-out
pairwise accuracy on the 100 held-out questions.

    .venv/bin/python bench/fairness.py [--train-pairs 800] [--weight 1.0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from training.counterfactual import expand, load_attributes, load_templates
from training.fairness import CounterfactualPenalty, counterfactual_pairs, template_gap
from training.finegrained import DEFAULT_PATH as DATA
from training.finegrained import finegrained_split, load_finegrained, preference_pairs
from training.models import load_tokenizer, resolve_reward_backbone
from training.registry import Registry
from training.reward import RewardModel, RewardTrainingConfig, train_reward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-pairs", type=int, default=800)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--epochs", type=float, default=1.0)
    args = parser.parse_args()

    train_records, test_records = finegrained_split(load_finegrained(DATA))
    train = preference_pairs(train_records).select(range(args.train_pairs))
    test = preference_pairs(test_records)
    backbone = resolve_reward_backbone("default")
    attributes, templates = load_attributes(), load_templates()
    groups = {name: expand(attributes[name], templates[name]) for name in attributes}
    config = RewardTrainingConfig(
        learning_rate=5e-5,
        num_train_epochs=args.epochs,
        max_length=256,
        eval_steps=0,
        promote="always",
    )
    variant_pairs = counterfactual_pairs(
        list(attributes.values()),
        list(train["prompt"]) * 2,
        list(train["chosen"]) + list(train["rejected"]),
        templates,
    )
    penalty = CounterfactualPenalty(
        load_tokenizer(backbone, "right"), variant_pairs, args.weight, batch_size=8
    )

    rows = {}
    with tempfile.TemporaryDirectory() as home:
        for name, extra in (("plain", None), (f"penalty w={args.weight}", penalty)):
            started = time.perf_counter()
            result = train_reward(
                train, test, Registry(Path(home) / name), backbone, config, extra_loss=extra
            )
            model = RewardModel.load(result.version.path)
            rows[name] = (
                result.metrics["accuracy_after"],
                {a: template_gap(model.score, g) for a, g in groups.items()},
                time.perf_counter() - started,
            )

    print(
        f"data: {len(train)} training pairs, {len(test)} held-out pairs; {len(variant_pairs)} counterfactual variant pairs"
    )
    print(
        f"{'model':<16}{'held-out acc':>13}{'seconds':>9}  "
        + "  ".join(f"{a + ' avg/worst':>22}" for a in attributes)
    )
    for name, (accuracy, gaps, seconds) in rows.items():
        cells = "  ".join(
            f"{g.average_gap:>10.4f} / {g.worst_pair[1]:<9.4f}" for g in gaps.values()
        )
        print(f"{name:<16}{accuracy:>13.3f}{seconds:>9.0f}  {cells}")


if __name__ == "__main__":
    main()
