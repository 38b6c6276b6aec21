"""`ls-rlhf train ppo`: PPO on the policy against a reward version."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ml_backend.cli import UserError
from ml_backend.commands._policy_args import add_from_current, start_point
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "ppo",
        help="PPO on the policy against a reward version; a new policy version",
        description="Fine-tune the policy with PPO (training/ppo.py): responses to the prompts are scored "
        "by a reward version on their decoded text, with a per-token KL penalty to a frozen reference "
        "(the base policy, also when starting from the current version, so that runs in a row do not "
        "drift from it without bound; --reference names another). Logs reward, KL, entropy, clip fraction, value loss and explained variance every update, "
        "plots them, and writes a new policy version into the registry.",
    )
    source = parser.add_argument_group("prompts (one of)")
    source.add_argument(
        "--prompts",
        help='file of prompts (.jsonl with "prompt", .csv with a prompt column, or .txt)',
    )
    source.add_argument(
        "--project", type=int, help="the prompts of this Label Studio project's tasks"
    )
    parser.add_argument("--url", help="Label Studio URL (default: LS_RLHF_LABEL_STUDIO_URL)")
    parser.add_argument(
        "--api-key", help="Label Studio API key (default: LS_RLHF_LABEL_STUDIO_API_KEY)"
    )
    parser.add_argument(
        "--reward-version", help="reward version to optimize, e.g. v3 (default: the current one)"
    )
    add_from_current(parser)
    parser.add_argument(
        "--reference",
        help="model (folder or hub id) the KL terms hold the policy to (default: the base policy)",
    )
    # Each of these sets the PPOConfig field of its dest; left out, the field's default holds
    # (listed in training/ppo.py, not repeated here).
    ppo = parser.add_argument_group("PPO (default: PPOConfig's in training/ppo.py)")
    ppo.add_argument("--updates", type=int, help="rollout + optimization rounds")
    ppo.add_argument("--batch-size", type=int, help="responses per rollout")
    ppo.add_argument(
        "--samples-per-prompt",
        type=int,
        help="responses per prompt in a rollout; above 1 each score counts relative to its "
        "siblings' mean (leave-one-out baseline); must divide --batch-size",
    )
    ppo.add_argument("--mini-batch-size", type=int, help="responses per gradient step")
    ppo.add_argument("--ppo-epochs", type=int, help="passes over each rollout")
    ppo.add_argument(
        "--lam",
        type=float,
        help="GAE lambda: 1 gives every token the whole score, less leans on the value head",
    )
    ppo.add_argument("--learning-rate", type=float)
    ppo.add_argument("--max-new-tokens", type=int)
    ppo.add_argument(
        "--kl-coef",
        dest="init_kl_coef",
        type=float,
        help="initial per-token KL penalty coefficient (in the reward)",
    )
    ppo.add_argument(
        "--kl-loss-coef",
        type=float,
        help="weight of a per-token KL-to-reference term in the policy loss (as GRPO's beta); "
        "it holds the policy closer than the reward penalty alone; 0 turns it off",
    )
    ppo.add_argument("--target-kl", type=float, help="target KL of the adaptive controller")
    ppo.add_argument(
        "--kl-estimator",
        choices=["k3", "k2"],
        help="estimator in the loss's KL term: k3 (GRPO's; its gradient is that of KL(ref || "
        "policy)) or k2 (the gradient of KL(policy || ref))",
    )
    ppo.add_argument("--max-grad-norm", type=float, help="gradient norm clip; 0 turns it off")
    ppo.add_argument("--lora-r", type=int, help="train LoRA adapters of this rank, not all weights")
    ppo.add_argument(
        "--bf16",
        action="store_true",
        default=None,
        help="compute in bfloat16 under autocast (float32 weights and optimizer state)",
    )
    parser.add_argument(
        "--no-promote", action="store_true", help="write the version without serving it"
    )
    parser.add_argument(
        "--counterfactual-weight",
        type=float,
        default=0.0,
        help="fairness penalty: subtract weight x |reward - reward with the attribute swapped| (0 = off)",
    )
    parser.add_argument("--counterfactual-attributes", default="gender,nationality,religion,age")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ml_backend.tasks import PromptFileError, read_prompts
    from training.engine import engine_from_settings
    from training.export import prompts_from_tasks, pull_export
    from training.models import resolve_policy
    from training.ppo import PPOConfig, RewardFn, train_policy_version
    from training.registry import lineage
    from training.reward_model import RewardModel

    settings = Settings.from_env()
    given = {
        f.name: getattr(args, f.name)
        for f in fields(PPOConfig)
        if getattr(args, f.name, None) is not None
    }
    try:  # checked before anything slow runs
        config = PPOConfig(**given, seed=settings.seed)
    except ValueError as err:
        raise UserError(str(err)) from None
    engine = engine_from_settings(settings)  # a vLLM server asked for must answer now
    if args.prompts:
        try:
            prompts = read_prompts(args.prompts)
        except PromptFileError as err:
            raise UserError(str(err)) from None
    elif args.project is not None:
        tasks, label_config = pull_export(
            args.url or settings.label_studio_url,
            args.api_key or settings.label_studio_api_key,
            args.project,
        )
        prompts = prompts_from_tasks(tasks, label_config)
    else:
        raise UserError("say where the prompts are: --prompts FILE or --project ID")
    if not prompts:
        raise UserError("no prompts found")
    registry = lineage(settings.registry_dir, getattr(args, "project", None))
    reward_version = registry.named_or_current("reward", args.reward_version)
    if reward_version is None:
        raise UserError(
            "no reward version to optimize: train one with `ls-rlhf train reward` first"
        )
    reward = RewardModel.load(reward_version.path)
    start, parent = start_point(args, settings)
    reference = args.reference or resolve_policy(settings.policy_model, settings.models_cache_dir)
    reward_fn: RewardFn = reward.score
    if args.counterfactual_weight > 0:
        from training.counterfactual import load_attributes
        from training.fairness import counterfactual_reward_fn

        attributes = load_attributes()
        names = [a.strip() for a in args.counterfactual_attributes.split(",") if a.strip()]
        if unknown := [a for a in names if a not in attributes]:
            raise UserError(f"unknown attributes {unknown}; known: {', '.join(attributes)}")
        reward_fn = counterfactual_reward_fn(
            reward.score, [attributes[a] for a in names], args.counterfactual_weight
        )
    version, history = train_policy_version(
        registry,
        start,
        prompts,
        reward_fn,
        config,
        {"reward_version": reward_version.label, "parent": parent, "prompts": len(prompts)},
        reference=reference,
        promote=not args.no_promote,
        engine=engine,
    )
    first, last = history[0], history[-1]
    print(
        f"{version.label}: score {first['objective/score']:.3f} -> {last['objective/score']:.3f}, "
        f"KL to the reference {last['objective/kl']:.3f} after {len(history)} updates; "
        f"{'not promoted' if args.no_promote else 'promoted'}\ncurves: {version.path / 'training_curves.png'}"
    )
    return 0
