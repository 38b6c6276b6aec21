"""`ls-rlhf eval reward`: a reward version or any HF model on held-out preference pairs."""

from __future__ import annotations

import argparse
from pathlib import Path

from ml_backend.cli import UserError
from ml_backend.commands._sources import add_source_arguments, load_preference_pairs
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "reward",
        help="a reward version or HF model on held-out preference pairs (report + plot)",
        description="Scores every pair of a held-out preference set and reports pairwise accuracy "
        "with a bootstrap 95% interval (resampling prompts), the calibration of the confidence "
        "the backend shows (sigmoid of the reward difference: expected calibration error and a "
        "reliability diagram), accuracy on pairs whose chosen answer is the shorter one beside "
        "the 'longer answer wins' baseline, and accuracy by agreement or margin where the data "
        "has them. Writes report.md, report.json and reliability.png into --out. Every pair "
        "given is evaluated: give data the model was not trained on.",
    )
    add_source_arguments(
        parser,
        dataset_help="a preference dataset saved by `ls-rlhf export --datasets` (its preference/ folder)",
    )
    parser.add_argument(
        "--pairs", help="a JSONL file with one {prompt, chosen, rejected} object per line"
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--reward-version", help="reward version (default: the current one)")
    model.add_argument("--model", help="any HF sequence-classification model: a hub id or folder")
    parser.add_argument(
        "--max-length", type=int, help="tokens per (prompt, answer) (default: the version's)"
    )
    parser.add_argument("--out", default="reward-report", help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.registry import Registry
    from training.reward_eval import evaluate_reward
    from training.reward_model import RewardModel

    settings = Settings.from_env()
    pairs, source, _flags = load_preference_pairs(args, settings)
    if args.model:
        reward = RewardModel.load(args.model, args.max_length, dtype=settings.dtype)
    else:
        version = Registry(settings.registry_dir).named_or_current("reward", args.reward_version)
        if version is None:
            raise UserError(
                "no reward version to evaluate: train one with `ls-rlhf train reward`, or give --model"
            )
        reward = RewardModel.load(version.path, args.max_length, dtype=settings.dtype)
    try:
        evaluation = evaluate_reward(reward.score, pairs)
    except ValueError as err:  # e.g. a model whose head gives no single score
        raise UserError(f"{reward.name} cannot score these pairs: {err}") from None
    markdown, data, png = evaluation.write(
        Path(args.out), f"Reward model {reward.name} on {source}"
    )
    print(f"{reward.name} on {source}: {evaluation.summary()}")
    print(f"report: {markdown}, {data}, {png}")
    return 0
