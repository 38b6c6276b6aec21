"""Where training commands get feedback from: a project, an export file, or a saved dataset."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ml_backend.cli import UserError
from training.export import pull_export, read_export_file
from training.feedback import ParsedExport, parse_export
from training.settings import Settings

if TYPE_CHECKING:  # datasets loads in the functions: `ls-rlhf --help` imports every command
    from datasets import Dataset


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


def export_tasks(
    args: argparse.Namespace, settings: Settings
) -> tuple[list[dict], str, str] | None:
    """(raw tasks, label config, a description of the source) from --project (pulled from
    Label Studio) or --export with --config; None when neither is given."""
    import label_configs

    if args.project is not None:
        tasks, config = pull_export(
            args.url or settings.label_studio_url,
            args.api_key or settings.label_studio_api_key,
            args.project,
        )
        return tasks, config, f"project {args.project}"
    if args.export:
        if not args.config:
            raise UserError(
                "--export needs --config (pairwise, ranking, ... or the project's .xml)"
            )
        try:
            config = label_configs.load(args.config)
        except ValueError as err:
            raise UserError(str(err)) from None
        return read_export_file(args.export), config, Path(args.export).name
    return None


def load_feedback(
    args: argparse.Namespace, settings: Settings
) -> tuple[ParsedExport, list[dict], str, str]:
    """(parsed records, raw tasks, label config, a description of the source)."""
    found = export_tasks(args, settings)
    if found is None:
        raise UserError(
            "say where the feedback is: --project ID, --export FILE --config NAME, or --dataset DIR"
        )
    tasks, config, source = found
    return parse_export(tasks, config), tasks, config, source


def print_problems(parsed: ParsedExport, limit: int = 10) -> None:
    for problem in parsed.problems[:limit]:
        print(f"  problem: {problem}")
    if len(parsed.problems) > limit:
        print(f"  ... and {len(parsed.problems) - limit} more problems")


def load_preference_pairs(
    args: argparse.Namespace, settings: Settings
) -> tuple[Dataset, str, list]:
    """(prompt/chosen/rejected pairs, a description of the source, the Flag records) from
    --pairs JSONL, --dataset, --project or --export; one line of what to fix if unusable."""
    from datasets import Dataset, load_from_disk

    from training.datasets import preference_dataset
    from training.feedback import Flag
    from training.reward_eval import PreferenceDataError, check_pairs

    flags: list = []
    if getattr(args, "pairs", None):
        pairs, source = _read_pairs_jsonl(Path(args.pairs)), Path(args.pairs).name
    elif args.dataset:
        try:
            pairs = load_from_disk(args.dataset)
        except FileNotFoundError:
            raise UserError(
                f"{args.dataset} is not a saved dataset (use the preference/ folder of `ls-rlhf export --datasets`)"
            ) from None
        if not isinstance(pairs, Dataset):
            raise UserError(f"{args.dataset} holds several splits: name one split's folder")
        source = args.dataset
    else:
        parsed, _tasks, _config, source = load_feedback(args, settings)
        print_problems(parsed)
        pairs = preference_dataset(parsed.records)
        flags = parsed.of_type(Flag)
        if len(pairs) == 0:
            raise UserError(
                f"{source} gives no preference pairs: it needs comparisons, rankings, ratings or "
                "flags made with its label config (check --config)"
            )
    try:
        check_pairs(pairs)
    except PreferenceDataError as err:
        raise UserError(f"{source}: {err}") from None
    return pairs, source, flags


def _read_pairs_jsonl(path: Path) -> Dataset:
    import json

    from datasets import Dataset

    if not path.is_file():
        raise UserError(f"{path} not found")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number} is not JSON ({err.msg})") from None
        missing = (
            [key for key in ("prompt", "chosen", "rejected") if not isinstance(row.get(key), str)]
            if isinstance(row, dict)
            else ["prompt", "chosen", "rejected"]
        )
        if missing:
            raise UserError(
                f"{path}:{number} needs string fields prompt, chosen and rejected (missing or not text: {', '.join(missing)})"
            )
        rows.append({key: row[key] for key in ("prompt", "chosen", "rejected")})
    if not rows:
        raise UserError(f"{path} holds no preference pairs")
    return Dataset.from_list(rows)
