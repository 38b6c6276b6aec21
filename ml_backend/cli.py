"""The `ls-rlhf` command: one subcommand per job, each defined in its own module.

Every module in `ml_backend/commands/` is a command: it has `register(subparsers)`,
which adds its parser and sets `func(args) -> int` on it. Modules named `train_*` and
`eval_*` register under `ls-rlhf train` and `ls-rlhf eval`. Errors that the user can fix are raised as `UserError`
(or the library's own ...Error types) and printed as one line, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from ml_backend import commands
from training.distributed import leave_process_group
from training.export import ExportError
from training.label_config import LabelConfigError
from training.models import ModelNotFoundError
from training.registry import RegistryError
from training.settings import SettingsError


class UserError(Exception):
    """A mistake the user can fix; printed as one line."""


USER_ERRORS = (
    UserError,
    SettingsError,
    LabelConfigError,
    ModelNotFoundError,
    RegistryError,
    ExportError,
    FileNotFoundError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ls-rlhf",
        description="RLHF with Label Studio: generate completions into tasks, serve pre-annotations, "
        "pull annotations, train reward models and policies. Settings come from LS_RLHF_* "
        "environment variables (`ls-rlhf settings` lists them); flags override them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    group_help = {
        "train": "train a reward model or the policy; a new version in the registry",
        "eval": "evaluate a policy or reward version",
    }
    groups: dict[str, argparse._SubParsersAction] = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):  # shared helpers, not commands
            continue
        module = importlib.import_module(f"ml_backend.commands.{info.name}")
        group = info.name.split("_", 1)[0]
        if group in group_help and group not in groups:
            groups[group] = sub.add_parser(group, help=group_help[group]).add_subparsers(
                dest="what", metavar="WHAT", required=True
            )
        module.register(groups.get(group, sub))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet = _another_training_process()
    if quiet:
        _quiet()
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # One line per HTTP call to Label Studio drowns what matters.
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"ls-rlhf {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        leave_process_group()


def _another_training_process() -> bool:
    """Whether this is a process of `accelerate launch` other than the main one (RANK is set
    by torchrun and MPI launchers alike, before any process group exists)."""
    return os.environ.get("RANK", "0") != "0"


def _quiet() -> None:
    """The main process speaks for the run: the others print nothing to stdout, show no
    progress bars and log warnings only (errors still reach stderr)."""
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the life of the process)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
