"""Prompts in, Label Studio tasks out: the "generate" step of the loop.

The current policy writes completions for each prompt (batched across prompts), they are
laid into the task fields the project's label config reads, and the backend's own
predictions (suggested choice or ranking, reward scores, drafts) are attached, so
annotators see the model's view the moment they open a task.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ml_backend.backend import RLHFBackend
from ml_backend.serving import Served, policy_label
from training.engine import engine_from_settings
from training.generation import cut_field, cut_note, generate_completions
from training.label_config import Schema
from training.models import resolve_policy
from training.settings import Settings

log = logging.getLogger(__name__)


class PromptFileError(ValueError):
    """A prompts file that cannot be read; the message says the expected format."""


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from JSONL (key "prompt"), CSV (column "prompt") or plain text (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompts file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    prompts: list[str] = []
    if path.suffix in (".jsonl", ".json"):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(
                    f"{path}:{number}: not JSON ({err.msg}); write one object per line"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise PromptFileError(
                    f'{path}:{number}: each line needs a "prompt" string, e.g. {{"prompt": "..."}}'
                )
            prompts.append(row["prompt"])
    elif path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if "prompt" not in (reader.fieldnames or []):
            raise PromptFileError(
                f"{path}: the CSV needs a header with a 'prompt' column; it has {reader.fieldnames}"
            )
        prompts = [row["prompt"] for row in reader if row.get("prompt")]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    return prompts


def completions_needed(schema: Schema, num_completions: int) -> int:
    """How many completions a task of this config shows."""
    if schema.kind == "demonstration":
        return 0  # the backend's prediction pre-fills the answer box instead
    if schema.list_field:
        return max(2, num_completions)
    return len(schema.answer_fields)


def task_data(
    schema: Schema,
    prompt: str,
    completions: list[str],
    policy_label: str,
    truncated: list[bool] | None = None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """A task's data. With `truncated` (per completion: did generation stop at
    `max_new_tokens` without ending?) the data carries it as "truncated", in answer order,
    and each answer its note: "<field>_cut" (the configs show `$answer1_cut` under the
    answer; empty when not cut) or, for a List, the item's flag and title."""
    data: dict[str, Any] = {schema.prompt_field: prompt, "policy_version": policy_label}
    notes = [
        cut_note(max_new_tokens) if cut else "" for cut in (truncated or [False] * len(completions))
    ]
    if schema.list_field:
        data[schema.list_field] = [
            {"id": f"a{i + 1}", "title": f"Answer {i + 1}", "body": text}
            for i, text in enumerate(completions)
        ]
        if truncated is not None:
            for item, cut, note in zip(data[schema.list_field], truncated, notes, strict=True):
                item["truncated"] = cut
                if cut:
                    item["title"] += f" {note}"
    else:
        for name, text in zip(schema.answer_fields, completions, strict=True):
            data[name] = text
        if truncated is not None:
            for name, note in zip(schema.answer_fields, notes, strict=True):
                data[cut_field(name)] = note
    if truncated is not None:
        data["truncated"] = list(truncated)
    return data


def make_tasks(
    prompts: list[str],
    schema: Schema,
    served: Served,
    settings: Settings,
    on_progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Task data for each prompt with fresh completions from the served policy."""
    k = completions_needed(schema, settings.num_completions)
    label = policy_label(served.policy_version)
    if k == 0:
        return [task_data(schema, p, [], label) for p in prompts]
    truncated: list[list[bool]] = []  # filled by the in-process generation
    engine = engine_from_settings(settings)
    if engine is not None:  # the served version's own folder, reloaded once per version
        engine.serve_folder(
            served.policy_version.path
            if served.policy_version
            else resolve_policy(settings.policy_model, settings.models_cache_dir)
        )
    completions = generate_completions(
        served.policy,
        served.tokenizer,
        prompts,
        num_completions=k,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        batch_size=settings.generation_batch_size,
        seed=settings.seed,
        on_batch=on_progress,
        truncated=truncated,
        engine=engine,
    )
    cuts: list[list[bool] | None] = (
        list(truncated) if len(truncated) == len(prompts) else [None] * len(prompts)
    )
    return [
        task_data(schema, p, c, label, cut, settings.max_new_tokens)
        for p, c, cut in zip(prompts, completions, cuts, strict=True)
    ]


def attach_predictions(
    tasks: list[dict[str, Any]], backend: RLHFBackend, label_config: str
) -> None:
    """Add the backend's prediction to each task (import format: "predictions": [...])."""
    items = backend.predict(
        [{"id": i, "data": t["data"]} for i, t in enumerate(tasks)],
        label_config,
        budget_seconds=float("inf"),
    )
    for task, item in zip(tasks, items, strict=True):
        if item.get("result"):
            task["predictions"] = [item]
