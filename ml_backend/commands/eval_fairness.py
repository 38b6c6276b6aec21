"""`ls-rlhf eval fairness`: counterfactual gaps of a reward version and of the policy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ml_backend.cli import UserError
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "fairness",
        help="counterfactual evaluation: reward and sentiment gaps between groups (report + plots)",
        description="Swap a sensitive attribute (gender, nationality, religion, age, or your own lists) "
        "in otherwise identical texts and compare scores between groups with the Wasserstein-1 distance "
        "(Huang et al., 2020). For the reward version: the reward of template texts per group, "
        "on the part of the lists the counterfactual penalty trains on (in-sample) and on the "
        "held-out part it never sees. With "
        "--policy: completions sampled for each group's prompt, scored by VADER sentiment (or "
        "--sentiment-model) and by the reward model. Writes report.md, PNGs and gaps.json to --out.",
    )
    parser.add_argument(
        "--reward-version", help="reward version, e.g. v2 (default: the current one)"
    )
    parser.add_argument(
        "--policy", action="store_true", help="also sample and score the current policy"
    )
    parser.add_argument(
        "--attributes",
        default="gender,nationality,religion,age",
        help="comma-separated attribute names",
    )
    parser.add_argument(
        "--attributes-file",
        help="your own attribute lists (JSON, same format as the bundled file); split by hash "
        "into the penalty's part and a held-out part like the bundled ones",
    )
    parser.add_argument(
        "--templates-file", help="your own prompt templates (JSON); split like the attributes"
    )
    parser.add_argument(
        "--held-out-attributes-file",
        help="held-out attribute lists of your own (same JSON format): the held-out gaps swap "
        "these groups; give `train reward` the same file so its penalty swaps all the others",
    )
    parser.add_argument(
        "--held-out-templates-file",
        help="held-out templates of your own (same JSON format): the held-out gaps render these",
    )
    parser.add_argument(
        "--samples", type=int, default=4, help="completions per prompt with --policy"
    )
    parser.add_argument("--sentiment-model", help="an HF text classifier to use instead of VADER")
    parser.add_argument("--out", default="fairness-report", help="output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.counterfactual import expand, load_attributes, load_sets, load_templates
    from training.fairness import (
        gaps,
        policy_gap,
        split_gaps,
        vader_scorer,
        write_report,
    )
    from training.registry import Registry
    from training.reward_model import RewardModel

    settings = Settings.from_env()
    try:
        sets = load_sets(
            args.attributes_file,
            args.templates_file,
            args.held_out_attributes_file,
            args.held_out_templates_file,
        )
        attributes = load_attributes(args.attributes_file)
        templates = load_templates(args.templates_file)
    except ValueError as error:
        raise UserError(str(error)) from None
    names = [a.strip() for a in args.attributes.split(",") if a.strip()]
    unknown = [n for n in names if n not in attributes or n not in templates]
    if unknown:
        raise UserError(
            f"no attribute list or templates for {', '.join(unknown)}; known: {', '.join(sorted(attributes))}"
        )
    registry = Registry(settings.registry_dir)
    version = registry.named_or_current("reward", args.reward_version)
    if version is None:
        raise UserError("no reward version yet: train one with `ls-rlhf train reward`")
    reward = RewardModel.load(version.path)
    measured = split_gaps(reward.score, sets, names)
    results = {
        f"Reward ({version.label}), in-sample": measured["in_sample"],
        f"Reward ({version.label}), held-out": measured["held_out"],
    }
    # The policy is sampled on every template of the lists (the split concerns the
    # reward's penalty).
    groups = {n: expand(attributes[n], templates[n]) for n in names}
    samples = {}
    if args.policy:
        from ml_backend.serving import ModelHolder, policy_label
        from training.generation import generate_completions

        holder = ModelHolder(settings)
        holder.refresh()
        served = holder.get()
        sentiment = (
            vader_scorer() if not args.sentiment_model else _classifier(args.sentiment_model)
        )

        def complete(prompts: list[str]) -> list[list[str]]:
            return generate_completions(
                served.policy,
                served.tokenizer,
                prompts,
                num_completions=args.samples,
                max_new_tokens=settings.max_new_tokens,
                temperature=max(settings.temperature, 0.7),
                seed=settings.seed,
            )

        sentiment_gaps, reward_gaps = [], []
        for n in names:
            gap, samples[n] = policy_gap(complete, sentiment, groups[n])
            sentiment_gaps.append(gap)
            prompts = [
                cg.variants[g] for g in gap.scores for cg in groups[n] for _ in range(args.samples)
            ]
            texts = [t for g in gap.scores for t in samples[n][g]]
            scores = reward.score(prompts, texts)
            per_group, offset = {}, 0
            for g in gap.scores:
                per_group[g] = scores[offset : offset + len(samples[n][g])]
                offset += len(samples[n][g])
            reward_gaps.append(gaps(n, per_group))
        label = policy_label(served.policy_version)
        results[f"Policy sentiment ({label})"] = sentiment_gaps
        results[f"Policy reward ({label}, {version.label})"] = reward_gaps
    out = Path(args.out)
    report = write_report(results, out, "Counterfactual fairness", samples, sets=sets)
    (out / "gaps.json").write_text(
        json.dumps(
            {
                "measures": {m: [g.as_dict() for g in gs] for m, gs in results.items()},
                "split": sets.describe(),
            },
            indent=2,
        )
    )
    for measure, attribute_gaps in results.items():
        print(measure)
        for gap in attribute_gaps:
            (a, b), worst = gap.worst_pair
            print(
                f"  {gap.attribute:<12} average gap {gap.average_gap:.4f}   worst {a} / {b}: {worst:.4f}"
            )
    print(f"report: {report}")
    return 0


def _classifier(name: str):
    from transformers import pipeline

    classify = pipeline("text-classification", model=name)

    def score(prompts, texts):
        out = classify(list(texts), truncation=True)
        return [r["score"] if r["label"].lower().startswith("pos") else -r["score"] for r in out]

    return score
