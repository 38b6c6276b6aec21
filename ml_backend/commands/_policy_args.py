"""Arguments shared by the policy trainers: where to start (all), and the TRL trainers'
overrides (DPO, SFT)."""

from __future__ import annotations

import argparse

from ml_backend.cli import UserError
from training.registry import lineage
from training.settings import Settings


def add_from_current(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from-current",
        action="store_true",
        help="start from the current policy version, not the base",
    )


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    add_from_current(parser)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument(
        "--no-promote", action="store_true", help="write the version without serving it"
    )


def start_point(args: argparse.Namespace, settings: Settings) -> tuple[str, str | None]:
    """(model path to start from, parent version name or None)."""
    from training.models import resolve_policy

    if args.from_current:
        current = lineage(settings.registry_dir, getattr(args, "project", None)).current("policy")
        if current is None:
            raise UserError(
                "no policy version yet: drop --from-current to start from the base policy"
            )
        return str(current.path), current.name
    return resolve_policy(settings.policy_model, settings.models_cache_dir), None


def overrides(args: argparse.Namespace) -> dict:
    values = {
        "learning_rate": args.learning_rate,
        "num_train_epochs": args.epochs,
        "max_steps": args.max_steps,
        "per_device_train_batch_size": args.batch_size,
    }
    return {k: v for k, v in values.items() if v is not None}
