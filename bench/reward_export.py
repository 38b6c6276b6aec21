"""Benchmark: `ls-rlhf train reward --export` on a dialogue-shaped export, timed as a user
runs it.

A public dialogue preference set has one pair per prompt and prompts of several hundred
tokens, so every pair costs two distinct (prompt, answer) reads. This script builds an
export of that shape from FineGrainedRLHF: each pairwise judgment (ties excluded) becomes
one task whose prompt is its question after the retrieved passages, rotated by the task's
index k within its question (n passages) and cut 100 characters shorter for each full turn
(k // n), so that nearly every task has a prompt of its own (1,398 of the default 1,500;
short passages and the two questions without any repeat). It writes the export and
runs the real command in a fresh `LS_RLHF_HOME`, with the defaults, and reports its wall
time and peak memory (the child's maximum resident set).

The stand-in is for time and memory only: the tasks of one question share its answers
across the command's held-out split, so the held-out accuracy it prints is not a held-out
figure (`bench/reward.py` holds the accuracy benchmark).

    .venv/bin/python bench/reward_export.py [--tasks 1500] [--passage-chars 1500] [-- ARGS]

ARGS after `--` go to `ls-rlhf train reward` (e.g. `-- --method probe`).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from training.finegrained import DEFAULT_PATH as DATA
from training.finegrained import format_prompt, load_finegrained, to_export, to_label_studio_tasks

ROOT = Path(__file__).resolve().parents[1]


def dialogue_shaped_tasks(tasks: int, passage_chars: int) -> list[dict]:
    """Up to `tasks` pairwise tasks, one pair per prompt (see the module docstring)."""
    records = load_finegrained(DATA)
    out: list[dict] = []
    for record in records:
        passages = (
            ast.literal_eval(record["passages"])
            if isinstance(record["passages"], str)
            else record["passages"]
        )
        n = max(len(passages), 1)  # two questions have no passages
        for k, task in enumerate(to_label_studio_tasks([record], "pairwise")):
            rotated = passages[k % n :] + passages[: k % n]
            cut = passage_chars - 100 * (k // n)
            task["data"]["prompt"] = format_prompt({**record, "passages": rotated}, cut)
            out.append(task)
    return out[:tasks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1500)
    parser.add_argument("--passage-chars", type=int, default=1500)
    parser.add_argument("args", nargs="*", help="after --: more `train reward` arguments")
    args = parser.parse_args()

    tasks = dialogue_shaped_tasks(args.tasks, args.passage_chars)
    prompts = {t["data"]["prompt"] for t in tasks}
    with tempfile.TemporaryDirectory(prefix="ls-rlhf-bench-") as home:
        export = Path(home) / "export.json"
        export.write_text(json.dumps(to_export(tasks)))
        command = [
            sys.executable,
            "-m",
            "ml_backend.cli",
            "train",
            "reward",
            "--export",
            str(export),
            "--config",
            str(ROOT / "label_configs" / "pairwise.xml"),
            *args.args,
        ]
        environment = {**os.environ, "LS_RLHF_HOME": str(Path(home) / "home")}
        print(f"{platform.machine()}, {os.cpu_count()} cores; {sys.executable}")
        print(
            f"export: {len(tasks)} pairwise tasks, {len(prompts)} distinct prompts, "
            f"passages cut at {args.passage_chars} characters"
        )
        print("command: ls-rlhf " + " ".join(command[3:]), flush=True)
        started = time.perf_counter()
        completed = subprocess.run(command, env=environment, cwd=ROOT, check=False)
        seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB -> GiB
    print(
        f"exit {completed.returncode}; wall time {seconds / 60:.1f} min ({seconds:.0f} s); "
        f"peak memory {peak:.2f} GB"
    )
    sys.exit(completed.returncode)


if __name__ == "__main__":
    main()
