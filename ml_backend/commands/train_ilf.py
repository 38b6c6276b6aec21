"""`ls-rlhf train ilf`: learning from language feedback (refine, select, fine-tune)."""

from __future__ import annotations

import argparse

from ml_backend.cli import UserError
from ml_backend.commands._policy_args import add_policy_arguments, overrides, start_point
from ml_backend.commands._sources import add_source_arguments, load_feedback, print_problems
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ilf",
        help="learn from written feedback: refine answers, keep the best, fine-tune; a new policy version",
        description="ILF (Scheurer et al., 2022): for each critique the policy writes refinements "
        "conditioned on the feedback; the one that moved furthest toward the feedback (embedding "
        "similarity, see training/ilf.py) is kept, or the annotator's own rewrite when there is one; "
        "the policy is fine-tuned on the kept refinements.",
    )
    add_source_arguments(
        parser,
        dataset_help="a critique dataset saved by `ls-rlhf export --datasets` (its critique/ folder)",
    )
    add_policy_arguments(parser)
    parser.add_argument(
        "--refinements", type=int, default=4, help="candidates sampled per critique"
    )
    parser.add_argument(
        "--embedder", help="encoder for the selection (default: LS_RLHF_REWARD_BACKBONE)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from datasets import load_from_disk

    from training.datasets import critique_dataset
    from training.ilf import Embedder, refinements
    from training.models import load_causal_lm, resolve_reward_backbone
    from training.registry import lineage
    from training.sft import SFTSettings, train_sft

    settings = Settings.from_env()
    if args.dataset:
        critiques, source = load_from_disk(args.dataset), args.dataset
    else:
        parsed, _, _, source = load_feedback(args, settings)
        print_problems(parsed)
        critiques = critique_dataset(parsed.records)
    if len(critiques) == 0:
        raise UserError(f"{source} has no written feedback on answers: use the critique config")
    start, parent = start_point(args, settings)
    policy, tokenizer = load_causal_lm(start)
    embed = Embedder.load(resolve_reward_backbone(args.embedder or settings.reward_backbone))
    kept = refinements(
        critiques,
        policy,
        tokenizer,
        embed,
        args.refinements,
        settings.max_new_tokens,
        settings.seed,
    )
    by_annotator = sum(1 for how in kept["chosen_by"] if how == "annotator")
    print(
        f"{len(kept)} refinements kept ({by_annotator} written by annotators, {len(kept) - by_annotator} selected)"
    )
    version = train_sft(
        kept,
        lineage(settings.registry_dir, getattr(args, "project", None)),
        start,
        SFTSettings(**overrides(args)),
        promote=not args.no_promote,
        metadata={
            "algorithm": "ilf",
            "source": source,
            "parent": parent,
            "refinements": len(kept),
            "by_annotator": by_annotator,
        },
    )
    print(f"{version.label}: fine-tuned on the kept refinements")
    return 0
