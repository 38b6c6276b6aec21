"""`ls-rlhf train dpo`: DPO on the annotators' preference pairs."""

from __future__ import annotations

import argparse

from ml_backend.cli import UserError
from ml_backend.commands._policy_args import add_policy_arguments, overrides, start_point
from ml_backend.commands._sources import add_source_arguments, load_feedback, print_problems
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "dpo",
        help="DPO on the preference pairs (TRL); a new policy version",
        description="Direct Preference Optimization on the pairs from comparisons, rankings, ratings and "
        "flags, with TRL's DPOTrainer; writes a new policy version.",
    )
    add_source_arguments(
        parser, dataset_help="a preference dataset saved by `ls-rlhf export --datasets`"
    )
    add_policy_arguments(parser)
    parser.add_argument("--beta", type=float, help="DPO beta (default 0.1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from datasets import load_from_disk

    from training.datasets import preference_dataset
    from training.preference import DPOSettings, train_dpo
    from training.registry import lineage

    settings = Settings.from_env()
    if args.dataset:
        pairs, source = load_from_disk(args.dataset), args.dataset
    else:
        parsed, _, _, source = load_feedback(args, settings)
        print_problems(parsed)
        pairs = preference_dataset(parsed.records)
    if len(pairs) == 0:
        raise UserError(
            f"{source} gives no preference pairs: annotate comparisons or rankings first"
        )
    start, parent = start_point(args, settings)
    extra = overrides(args) | ({"beta": args.beta} if args.beta is not None else {})
    version = train_dpo(
        pairs,
        lineage(settings.registry_dir, getattr(args, "project", None)),
        start,
        DPOSettings(**extra),
        promote=not args.no_promote,
        metadata={"source": source, "parent": parent},
    )
    print(
        f"{version.label}: DPO on {len(pairs)} pairs, loss {version.metadata['metrics']['train_loss']:.4f}"
    )
    return 0
