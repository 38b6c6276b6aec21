"""`ls-rlhf train sft`: supervised fine-tuning on demonstrations and corrections."""

from __future__ import annotations

import argparse

from ml_backend.cli import UserError
from ml_backend.commands._policy_args import add_policy_arguments, overrides, start_point
from ml_backend.commands._sources import add_source_arguments, load_feedback, print_problems
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "sft",
        help="fine-tune the policy on demonstrations and corrections (TRL); a new policy version",
        description="Supervised fine-tuning with TRL's SFTTrainer on what annotators wrote in the "
        "demonstration config and the rewrites of the critique config; writes a new policy version.",
    )
    add_source_arguments(
        parser, dataset_help="an SFT dataset saved by `ls-rlhf export --datasets` (its sft/ folder)"
    )
    add_policy_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from datasets import load_from_disk

    from training.datasets import sft_dataset
    from training.registry import lineage
    from training.sft import SFTSettings, train_sft

    settings = Settings.from_env()
    if args.dataset:
        examples, source = load_from_disk(args.dataset), args.dataset
    else:
        parsed, _, _, source = load_feedback(args, settings)
        print_problems(parsed)
        examples = sft_dataset(parsed.records)
    if len(examples) == 0:
        raise UserError(
            f"{source} has no demonstrations or corrections: use the demonstration or critique config"
        )
    start, parent = start_point(args, settings)
    version = train_sft(
        examples,
        lineage(settings.registry_dir, getattr(args, "project", None)),
        start,
        SFTSettings(**overrides(args)),
        promote=not args.no_promote,
        metadata={"source": source, "parent": parent},
    )
    print(
        f"{version.label}: SFT on {len(examples)} examples, loss {version.metadata['metrics']['train_loss']:.4f}"
    )
    return 0
