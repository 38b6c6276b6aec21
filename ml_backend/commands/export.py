"""`ls-rlhf export`: pull a project's annotations, summarize the feedback, save datasets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ml_backend.commands._sources import add_source_arguments, load_feedback, print_problems
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="pull annotations from Label Studio; summary of feedback records; datasets",
        description="Pull a project's annotations through Label Studio's export API (a snapshot with "
        "full predictions), or read an export file, parse every annotation into feedback records "
        "(comparisons, rankings, ratings, flags, demonstrations, critiques), print a summary with any "
        "problems (task and annotation ids), and optionally save the raw export and the datasets "
        "(preference pairs, SFT, critique) in Hugging Face `save_to_disk` format.",
    )
    add_source_arguments(parser, dataset_help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the raw export JSON here")
    parser.add_argument(
        "--datasets", help="save non-empty datasets into this folder (preference/, sft/, critique/)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from training.datasets import critique_dataset, preference_dataset, sft_dataset

    settings = Settings.from_env()
    parsed, tasks, _config, source = load_feedback(args, settings)
    print(f"{source}: {len(tasks)} tasks")
    for key, value in parsed.summary().items():
        print(f"  {key:22} {value}")
    print_problems(parsed)
    if args.out:
        Path(args.out).write_text(json.dumps(tasks, indent=1, ensure_ascii=False))
        print(f"export written to {args.out}")
    if args.datasets:
        folder = Path(args.datasets)
        folder.mkdir(parents=True, exist_ok=True)
        datasets: dict[str, int] = {}
        summary = {"source": source, "records": parsed.summary(), "datasets": datasets}
        for name, build in (
            ("preference", preference_dataset),
            ("sft", sft_dataset),
            ("critique", critique_dataset),
        ):
            dataset = build(parsed.records)
            if len(dataset):
                dataset.save_to_disk(str(folder / name))
                datasets[name] = len(dataset)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2))
        print(
            f"datasets saved in {folder}: {summary['datasets'] or 'none (no usable feedback yet)'}"
        )
    return 0
