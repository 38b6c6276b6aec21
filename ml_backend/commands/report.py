"""`ls-rlhf report`: annotation quality of a project (agreement, annotators, suggestions)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ml_backend.cli import UserError
from training.quality import REPORTS_DIR
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report",
        help="annotation quality: agreement, annotators, suggestion acceptance, live accuracy",
        description="Markdown with PNG plots, and JSON, on a project's annotations: Krippendorff's "
        "alpha and pairwise agreement per control, each annotator's agreement with the "
        "leave-one-out majority and position bias, how often annotators take the model's "
        "suggestion and how that follows its confidence, agreement with and without the "
        "suggestion shown (the anchoring guard), and each reward version's accuracy on the "
        "labels made after it. What cannot be computed is listed with the reason. The "
        "backend's /metrics shows the headline figures of the latest report in its folder.",
    )
    group = parser.add_argument_group("data (one of)")
    group.add_argument("--project", type=int, help="pull this Label Studio project's export")
    group.add_argument("--export", help="a JSON export file from Label Studio (needs --config)")
    parser.add_argument(
        "--config", help="label config of --export: a name in label_configs/ or an .xml file"
    )
    parser.add_argument(
        "--out",
        help="folder for report.md, report.json and the plots (default: "
        "LS_RLHF_HOME/state/reports/project-ID, where /metrics reads it)",
    )
    parser.add_argument("--url", help="Label Studio URL (default: LS_RLHF_LABEL_STUDIO_URL)")
    parser.add_argument(
        "--api-key", help="Label Studio API key (default: LS_RLHF_LABEL_STUDIO_API_KEY)"
    )
    parser.set_defaults(func=run)


def reports_dir(settings: Settings) -> Path:
    return settings.state_dir / REPORTS_DIR


def run(args: argparse.Namespace) -> int:
    from ml_backend.commands._sources import export_tasks
    from training.quality import quality_report, write_report
    from training.registry import lineage

    settings = Settings.from_env()
    found = export_tasks(args, settings)
    if found is None:
        raise UserError("say what to report on: --project ID, or --export FILE --config NAME")
    tasks, config, _ = found
    name = (
        f"project-{args.project}"
        if args.project is not None
        else f"export-{Path(args.export).stem}"
    )
    # Live accuracy judges the project's own reward versions (its lineage), not another
    # project's that share a version name.
    registry = lineage(settings.registry_dir, args.project)
    report = quality_report(tasks, config, args.project, registry)
    folder = Path(args.out) if args.out else reports_dir(settings) / name
    written = write_report(report, folder)
    print(f"{report.tasks} tasks, {report.annotations} annotations, {report.annotators} annotators")
    for key, value in report.headline().items():
        print(f"  {key:48} {value:.3f}")
    for reason in report.cannot:
        print(f"  not computed: {reason}")
    print(f"report written to {written['markdown']} (and {written['json'].name}, plots beside it)")
    return 0
