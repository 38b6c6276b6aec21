"""Where training commands get feedback from: a project, an export file, or a saved dataset."""

from __future__ import annotations

import argparse
from pathlib import Path

from ml_backend.cli import UserError
from training.export import pull_export, read_export_file
from training.feedback import ParsedExport, parse_export
from training.settings import Settings


def add_source_arguments(parser: argparse.ArgumentParser, dataset_help: str) -> None:
    group = parser.add_argument_group("data (one of)")
    group.add_argument(
        "--project", type=int, help="pull annotations from this Label Studio project"
    )
    group.add_argument(
        "--export", help="a JSON export file downloaded from Label Studio (needs --config)"
    )
    group.add_argument("--dataset", help=dataset_help)
    parser.add_argument(
        "--config", help="label config of --export: a name in label_configs/ or an .xml file"
    )
    parser.add_argument("--url", help="Label Studio URL (default: LS_RLHF_LABEL_STUDIO_URL)")
    parser.add_argument(
        "--api-key", help="Label Studio API key (default: LS_RLHF_LABEL_STUDIO_API_KEY)"
    )


def load_feedback(
    args: argparse.Namespace, settings: Settings
) -> tuple[ParsedExport, list[dict], str, str]:
    """(parsed records, raw tasks, label config, a description of the source)."""
    import label_configs

    if args.project is not None:
        tasks, config = pull_export(
            args.url or settings.label_studio_url,
            args.api_key or settings.label_studio_api_key,
            args.project,
        )
        source = f"project {args.project}"
    elif args.export:
        if not args.config:
            raise UserError(
                "--export needs --config (pairwise, ranking, ... or the project's .xml)"
            )
        try:
            config = label_configs.load(args.config)
        except ValueError as err:
            raise UserError(str(err)) from None
        tasks, source = read_export_file(args.export), Path(args.export).name
    else:
        raise UserError(
            "say where the feedback is: --project ID, --export FILE --config NAME, or --dataset DIR"
        )
    return parse_export(tasks, config), tasks, config, source


def print_problems(parsed: ParsedExport, limit: int = 10) -> None:
    for problem in parsed.problems[:limit]:
        print(f"  problem: {problem}")
    if len(parsed.problems) > limit:
        print(f"  ... and {len(parsed.problems) - limit} more problems")
