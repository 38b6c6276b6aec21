"""`ls-rlhf train reward`: a Bradley-Terry reward model on the annotators' preferences."""

from __future__ import annotations

import argparse

from ml_backend.cli import UserError
from ml_backend.commands._sources import add_source_arguments, load_preference_pairs
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "reward",
        help="fit a Bradley-Terry reward model; a new reward version",
        description="Turn comparisons, rankings (every ordered pair), ratings and flags into preference "
        "pairs, split them by prompt, fit a reward model with TRL's RewardTrainer, report held-out "
        "pairwise accuracy before and after, and write a new version into the registry. It becomes "
        "the served version if its held-out accuracy is not worse than the current one's (--promote).",
    )
    add_source_arguments(
        parser,
        dataset_help="a preference dataset saved by `ls-rlhf export --datasets` (its preference/ folder)",
    )
    parser.add_argument(
        "--backbone", help="HF id or folder of the backbone (default: LS_RLHF_REWARD_BACKBONE)"
    )
    parser.add_argument(
        "--warm-start", action="store_true", help="start from the current reward version"
    )
    parser.add_argument(
        "--promote", choices=["if_not_worse", "always", "never"], default="if_not_worse"
    )
    parser.add_argument(
        "--test-fraction", type=float, help="share of prompts held out (default: a fifth)"
    )
    parser.add_argument(
        "--method",
        choices=["auto", "probe", "finetune"],
        help="probe: a linear model on the frozen backbone's features (fast); finetune: the "
        "whole backbone; auto: both, fine-tuning kept only when clearly better on "
        "validation, else the probe (default: "
        "LS_RLHF_REWARD_METHOD, auto)",
    )
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--epochs", type=float, help="passes over the pairs")
    parser.add_argument("--max-steps", type=int, help="exact number of steps (overrides --epochs)")
    parser.add_argument(
        "--batch-size", type=int, help="prompts per step (each with all its judged pairs)"
    )
    parser.add_argument("--max-length", type=int, help="tokens per (prompt, answer)")
    parser.add_argument(
        "--validation-fraction",
        type=float,
        help="share of the training prompts that chooses when to stop (default 0.1; 0: train "
        "to the end)",
    )
    parser.add_argument(
        "--train-top-layers",
        type=int,
        help="partial fine-tuning: train only the top N layers and the head (large backbones)",
    )
    parser.add_argument(
        "--lora-rank",
        type=int,
        help="fine-tune LoRA adapters of this rank (merged into the saved version) instead of all weights",
    )
    parser.add_argument(
        "--grounding",
        action="store_true",
        default=None,
        help="let the linear probe add grounding features (how much of each answer its prompt "
        "supports word for word), kept where cross-validation says they help: for prompts that "
        "carry passages or documents",
    )
    parser.add_argument(
        "--consensus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="let the linear probe add each answer's agreement with the other answers to its "
        "prompt (self-consistency), kept where cross-validation says it helps; it ranks only "
        "prompts with three or more answers (default: on)",
    )
    parser.add_argument(
        "--counterfactual-weight",
        type=float,
        default=0.0,
        help="weight of the counterfactual fairness penalty (0 = off) on r(text) - r(text with the attribute swapped): its mean absolute value when fine-tuning (what auto does with a penalty), per attribute its mean square for a linear probe",
    )
    parser.add_argument(
        "--counterfactual-attributes",
        default="gender,nationality,religion,age",
        help="attributes the penalty swaps and whose gaps are recorded",
    )
    parser.add_argument(
        "--counterfactual-attributes-file",
        help="your own attribute lists (JSON, the bundled format); split by hash into the "
        "penalty's part and a held-out part",
    )
    parser.add_argument(
        "--counterfactual-templates-file", help="your own templates (JSON); split likewise"
    )
    parser.add_argument(
        "--counterfactual-held-out-attributes-file",
        help="held-out attribute lists of your own: the penalty never swaps into them, the "
        "recorded held-out gaps use them",
    )
    parser.add_argument(
        "--counterfactual-held-out-templates-file",
        help="held-out templates of your own: the penalty never renders them",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.datasets import HELD_OUT_FRACTION, MIN_PAIRS, split_by_prompt
    from training.models import resolve_reward_backbone
    from training.registry import lineage
    from training.reward import RewardModel, RewardTrainingConfig, train_reward

    settings = Settings.from_env()
    pairs, source, flags = load_preference_pairs(args, settings)
    if len(pairs) < MIN_PAIRS:
        raise UserError(
            f"{source} gives {len(pairs)} preference pairs; annotate at least {MIN_PAIRS} comparisons or rankings first"
        )
    split = split_by_prompt(
        pairs,
        HELD_OUT_FRACTION if args.test_fraction is None else args.test_fraction,
        seed=settings.seed,
    )
    overrides = {
        "learning_rate": args.learning_rate,
        "num_train_epochs": args.epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.batch_size,
        "max_length": args.max_length,
        "validation_fraction": args.validation_fraction,
        "train_top_layers": args.train_top_layers,
        "lora_rank": args.lora_rank,
        "grounding": args.grounding,
        "consensus": args.consensus,
    }
    try:
        config = RewardTrainingConfig(
            method=args.method or settings.reward_method,
            promote=args.promote,
            warm_start=args.warm_start,
            seed=settings.seed,
            dtype=settings.dtype,
            **{k: v for k, v in overrides.items() if v is not None},
        )
    except ValueError as err:  # e.g. a validation fraction outside [0, 1)
        raise UserError(str(err)) from None
    backbone = resolve_reward_backbone(args.backbone or settings.reward_backbone)
    print(f"{source}: {len(split['train'])} training pairs, {len(split['test'])} held-out pairs")
    # Counterfactual fairness: the penalty trains on one part of the lists; the gaps of the
    # trained model are recorded on that part (in-sample) and on the held-out part, always
    # (scoring the templates takes seconds).
    from training.counterfactual import load_sets
    from training.fairness import gap_summary, pairs_by_attribute, split_gaps

    try:
        sets = load_sets(
            args.counterfactual_attributes_file,
            args.counterfactual_templates_file,
            args.counterfactual_held_out_attributes_file,
            args.counterfactual_held_out_templates_file,
        )
    except ValueError as error:
        raise UserError(str(error)) from None
    chosen = [a.strip() for a in args.counterfactual_attributes.split(",") if a.strip()]
    if unknown := [a for a in chosen if a not in sets.penalty_attributes]:
        raise UserError(
            f"unknown attributes {unknown}; known: {', '.join(sets.penalty_attributes)}"
        )
    extra_loss = None
    if args.counterfactual_weight > 0:
        from training.fairness import CounterfactualPenalty
        from training.models import load_tokenizer

        train = split["train"]
        variant_pairs = pairs_by_attribute(
            [sets.penalty_attributes[a] for a in chosen],
            list(train["prompt"]) * 2,
            list(train["chosen"]) + list(train["rejected"]),
            sets.penalty_templates,
            flags,
        )
        extra_loss = CounterfactualPenalty(
            load_tokenizer(backbone, padding_side="right"),
            variant_pairs,
            args.counterfactual_weight,
            max_length=config.max_length,
        )
        counts = ", ".join(f"{a} {len(p)}" for a, p in variant_pairs.items())
        print(
            f"counterfactual penalty: weight {args.counterfactual_weight}, variant pairs {counts}; "
            f"each batch takes equal numbers per attribute"
        )

    def fairness(served: RewardModel) -> dict:
        return gap_summary(split_gaps(served.score, sets, chosen), sets)

    result = train_reward(
        split["train"],
        split["test"],
        lineage(settings.registry_dir, getattr(args, "project", None)),
        backbone,
        config,
        extra_loss=extra_loss,
        data_info={
            "source": source,
            "pairs": len(pairs),
            "counterfactual_weight": args.counterfactual_weight,
        },
        extra_evaluations={"fairness": fairness},
    )
    m = result.metrics
    current = "none" if m["current_accuracy"] is None else f"{m['current_accuracy']:.3f}"
    print(
        f"{result.version.label}: held-out {result.evaluation.summary() if result.evaluation else 'no held-out pairs'}\n"
        f"  {describe_fit(m)}; current version {current}; "
        f"{'promoted' if result.promoted else 'not promoted'}"
    )
    if (result.version.path / "training_curves.png").is_file():
        print(f"curves: {result.version.path / 'training_curves.png'}")
    recorded = result.version.metadata.get("fairness", {})
    for side in ("in_sample", "held_out"):
        cells = [
            f"{a} {g['average_gap']:.3f}/{g['worst_gap']:.3f}"
            for a, g in recorded.get(side, {}).items()
        ]
        if cells:
            label = side.replace("_", "-")
            print(f"  counterfactual gap {label} (average/worst): {', '.join(cells)}")
    return 0


def describe_fit(m: dict) -> str:
    """One line on how a version was fitted, from its metrics."""
    chosen = ""
    if "auto" in m:
        a = m["auto"]
        chosen = (
            f"auto chose {a['chosen']} (validation loss: probe {_loss(a['probe_validation_loss'])}, "
            f"fine-tuning {_loss(a['finetune_validation_loss'])}; fine-tuning is kept only when "
            f"lower by more than its standard error, {_loss(a.get('standard_error'))}); "
        )
    if m.get("method") == "probe":
        return (
            f"{chosen}linear probe on layer {m['probe_layer']} (l2 {m['probe_l2']:g}, "
            f"cross-validated), {m['answers_read']} answers read in {m['seconds']:.0f} s, "
            f"{m['precision']}"
        )
    stop = f", best at step {m['best_step']}" if m.get("best_step") else ""
    return (
        f"{chosen}fine-tuned: untrained {m['accuracy_before']:.3f}; {m['steps']} steps "
        f"({m['epochs']:.2f} epochs{stop}) in {m['seconds']:.0f} s, {m['precision']}"
    )


def _loss(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"
