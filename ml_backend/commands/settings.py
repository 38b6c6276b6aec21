"""`ls-rlhf settings`: every setting, its variable, default, current value and meaning."""

from __future__ import annotations

import argparse

from training.settings import Settings, describe


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "settings",
        help="list every LS_RLHF_* setting with its current value (secrets masked)",
        description="List every setting: the environment variable, its default, the value in force "
        "here (secrets masked) and what it does.",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="print a Markdown table (as in the README)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    current = Settings.from_env().public()
    if args.markdown:
        print("| variable | default | meaning |\n|---|---|---|")
        for name, default, help_text in describe():
            shown = f"`{default}`" if default else ""
            print(f"| `{name}` | {shown} | {_cell(help_text)} |")
        return 0
    for name, default, help_text in describe():
        value = current[name.removeprefix("LS_RLHF_").lower()]
        print(f"{name}={value}\n    {help_text} (default: {default})")
    return 0


def _cell(text: str) -> str:
    """Text as a Markdown table cell: a `|` would split it, a `<...>` would read as HTML."""
    return text.replace("|", "\\|").replace("<", "&lt;")
