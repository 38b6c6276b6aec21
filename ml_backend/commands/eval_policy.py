"""`ls-rlhf eval policy`: reward, KL, win rate and samples of a policy version on held-out prompts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ml_backend.cli import UserError
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "policy",
        help="a policy version against its reference on held-out prompts (report + plot)",
        description="Answers held-out prompts with a policy version and with a reference (the base policy "
        "or --reference-version), scores both with a reward version, and reports mean reward, the win "
        "rate judged by the reward model, KL to the reference, and samples side by side (report.md, "
        "rewards.png, summary.json in --out).",
    )
    parser.add_argument("--prompts", required=True, help="held-out prompts (.jsonl, .csv or .txt)")
    parser.add_argument("--policy-version", help="policy version (default: the current one)")
    parser.add_argument(
        "--reference-version", help="reference policy version (default: the base policy)"
    )
    parser.add_argument(
        "--reward-version", help="reward version judging (default: the current one)"
    )
    parser.add_argument("--out", default="policy-report", help="output folder")
    parser.add_argument(
        "--project",
        type=int,
        help="also import the answers into this Label Studio project (a pairwise or rating "
        "config) for people to judge: the policy on a side drawn at random per task (seeded by "
        "LS_RLHF_SEED), recorded as answer_sources; `ls-rlhf report` counts the verdicts",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ml_backend.serving import BASE_POLICY_LABEL
    from ml_backend.tasks import PromptFileError, read_prompts
    from training.engine import engine_from_settings
    from training.models import load_causal_lm, resolve_policy
    from training.policy_eval import evaluate_policy, write_policy_report
    from training.registry import Registry
    from training.reward_model import RewardModel

    settings = Settings.from_env()
    try:
        prompts = read_prompts(args.prompts)
    except PromptFileError as err:
        raise UserError(str(err)) from None
    registry = Registry(settings.registry_dir)
    policy_version = registry.named_or_current("policy", args.policy_version)
    if policy_version is None:
        raise UserError(
            "no policy version to evaluate: train one with `ls-rlhf train ppo|dpo|sft|ilf`"
        )
    reward_version = registry.named_or_current("reward", args.reward_version)
    if reward_version is None:
        raise UserError("no reward version to judge with: train one with `ls-rlhf train reward`")
    if args.reference_version:
        reference_version = registry.get("policy", args.reference_version)
        reference_path, reference_label = str(reference_version.path), reference_version.label
    else:
        reference_path, reference_label = (
            resolve_policy(settings.policy_model, settings.models_cache_dir),
            BASE_POLICY_LABEL,
        )
    schema = None
    if args.project is not None:  # before the slow part: a wrong project fails fast
        from training.label_config import LabelConfigError, read_schema
        from training.label_studio_client import LabelStudioError, client, get_project

        try:
            ls = client(settings)
            project = get_project(ls, args.project)
            schema = read_schema(project.label_config)
        except (LabelStudioError, LabelConfigError) as err:
            raise UserError(str(err)) from None
        if schema.list_field or len(schema.answer_fields) != 2:
            raise UserError(
                f"project {args.project}'s label config shows {len(schema.answer_fields) or 'a list of'}"
                " answers: policy-against-reference tasks need two answer fields (pairwise or rating)"
            )
    policy, tokenizer = load_causal_lm(str(policy_version.path))
    reference, _ = load_causal_lm(reference_path)
    evaluation = evaluate_policy(
        policy,
        reference,
        tokenizer,
        RewardModel.load(reward_version.path).score,
        prompts,
        settings.max_new_tokens,
        settings.seed,
        engine=engine_from_settings(settings),
    )
    out = Path(args.out)
    report = write_policy_report(
        evaluation, out, policy_version.label, reference_label, reward_version.label
    )
    (out / "summary.json").write_text(json.dumps(evaluation.summary(), indent=2))
    s = evaluation.summary()
    print(
        f"{policy_version.label} vs {reference_label} on {s['prompts']} prompts ({reward_version.label}): mean reward "
        f"{s['mean_reward']:+.4f} vs {s['reference_mean_reward']:+.4f}, win rate {s['win_rate']:.3f}, KL {s['kl_to_reference']:.4f}\n"
        f"report: {report}"
    )
    if schema is not None:
        from training.policy_eval import comparison_tasks

        tasks = comparison_tasks(
            evaluation, schema, policy_version.label, reference_label, settings.seed
        )
        ls.projects.import_tasks(
            id=args.project,
            request=[{"data": t} for t in tasks],  # type: ignore[misc]
        )
        print(
            f"imported {len(tasks)} tasks into project {args.project}: {policy_version.label} "
            f"against {reference_label}, sides drawn at random (answer_sources)"
        )
    return 0
