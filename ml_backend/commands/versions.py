"""`ls-rlhf versions`: list model versions, promote one (serve it), roll back."""

from __future__ import annotations

import argparse

from ml_backend.cli import UserError
from training.registry import Registry, lineage, lineages
from training.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "versions",
        help="list, promote or roll back model versions (the backend serves the change within seconds)",
        description="Versions live in the registry under LS_RLHF_HOME/registry. `promote` makes a version "
        "the one served (`pin` is the old name, still accepted); `rollback` promotes the version that "
        "was current before the current one (its parent). "
        "A running backend picks the change up without a restart. Each Label Studio project has its "
        "own lineage of versions (docs/deployment.md): --project chooses it; `list` without it shows "
        "every lineage. A damaged version or pointer is listed with what is wrong.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every version with its metrics")
    listing.add_argument("--kind", choices=["reward", "policy"], help="only this kind")
    # "pin" was this action's name before; kept so that scripts written for it still work.
    promote = actions.add_parser("promote", aliases=["pin"], help="serve this version")
    promote.add_argument("kind", choices=["reward", "policy"])
    promote.add_argument("version", help="e.g. v2")
    rollback = actions.add_parser("rollback", help="serve the version before the current one")
    rollback.add_argument("kind", choices=["reward", "policy"])
    for action in (listing, promote, rollback):
        action.add_argument(
            "--project", type=int, help="the Label Studio project whose lineage to use"
        )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = Settings.from_env().registry_dir
    if args.project is not None and args.project < 1:
        raise UserError(f"--project must be a project id (a positive integer), not {args.project}")
    if args.action == "list":
        chosen = (
            {args.project: lineage(root, args.project)}
            if args.project is not None
            else lineages(root)
        )
        for project, registry in chosen.items():
            if len(chosen) > 1 or project is not None:
                print(f"project {project}:" if project is not None else "(no project yet):")
            _list(registry, [args.kind] if args.kind else ["reward", "policy"])
        return 0
    registry = lineage(root, args.project)
    if args.action in ("promote", "pin"):
        print(f"promoted {registry.promote(args.kind, args.version).label}")
        return 0
    current = registry.current(args.kind)
    if current is None:
        raise UserError(f"no {args.kind} version is served yet: nothing to roll back")
    parent = current.metadata.get("parent")
    if not parent:
        raise UserError(f"{current.label} has no previous version to roll back to")
    promoted = registry.promote(args.kind, parent)
    print(f"promoted {promoted.label} (rolled back from {current.label})")
    return 0


def _list(registry: Registry, kinds: list[str]) -> None:
    for kind in kinds:
        current = registry.current(kind)
        versions = registry.versions(kind)
        damaged = registry.damaged(kind)
        if not versions and not damaged:
            print(f"{kind}: no versions yet")
        for v in versions:
            shown = _held_out(v.metadata)
            marker = "*" if current and current.name == v.name else " "
            print(
                f"{marker} {v.label:<12} {v.metadata.get('created_at', '')}  parent {v.metadata.get('parent')}  {shown}"
            )
        for name, problem in damaged.items():
            print(f"! {kind}-{name:<5}      damaged: {problem}; never served")
    for problem in registry.problems():
        if "CURRENT" in problem and problem.split("/")[0] in kinds:
            print(f"! {problem}")


def _held_out(metadata: dict) -> str:
    """A reward version's held-out figures (training/reward_eval.py), as one short text."""
    evaluation = metadata.get("evaluation") or {}
    if isinstance(evaluation.get("accuracy"), float):
        text = (
            f"held-out accuracy {evaluation['accuracy']:.3f} "
            f"[{evaluation['accuracy_low']:.3f}, {evaluation['accuracy_high']:.3f}], "
            f"ECE {evaluation['expected_calibration_error']:.3f}"
        )
        if isinstance(evaluation.get("shorter_chosen_accuracy"), float):
            text += f", {evaluation['shorter_chosen_accuracy']:.3f} when the shorter answer won"
        return text
    accuracy = metadata.get("metrics", {}).get("accuracy_after")
    return f"held-out accuracy {accuracy:.3f}" if isinstance(accuracy, float) else ""
