"""`ls-rlhf generate`: the current policy writes K completions per prompt into Label Studio tasks."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from tqdm import tqdm

from ml_backend.cli import UserError
from training.label_config import read_schema
from training.label_studio_client import LabelStudioError, client, describe, get_project
from training.settings import Settings

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "generate",
        help="generate completions with the current policy into Label Studio tasks",
        description="Write K completions per prompt with the current policy version and import them as "
        "tasks laid out for the project's label config (pairwise: two answers, ranking: a list of K, "
        "rating, critique; demonstration: prompt only, the draft comes as a prediction), with the "
        'backend\'s predictions attached. Prompts come from --prompts (JSONL with a "prompt" key, '
        "CSV with a prompt column, or one per line), or, without it, from the project's tasks that "
        "have a prompt but no answers yet (those tasks are updated in place).",
    )
    parser.add_argument("--project", type=int, required=True, help="Label Studio project id")
    parser.add_argument("--prompts", help="file of prompts (.jsonl, .csv or .txt)")
    parser.add_argument(
        "-k",
        "--num-completions",
        type=int,
        help="completions per prompt for ranking (default: setting)",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, help="new tokens per completion (default: setting)"
    )
    parser.add_argument("--limit", type=int, help="use at most this many prompts")
    parser.add_argument("--url", help="Label Studio URL (default: LS_RLHF_LABEL_STUDIO_URL)")
    parser.add_argument(
        "--api-key", help="Label Studio API key (default: LS_RLHF_LABEL_STUDIO_API_KEY)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ml_backend.backend import RLHFBackend
    from ml_backend.serving import ModelHolder
    from ml_backend.tasks import PromptFileError, attach_predictions, make_tasks, read_prompts

    settings = Settings.from_env(
        num_completions=args.num_completions, max_new_tokens=args.max_new_tokens
    )
    prompts_from_file: list[str] = []
    if args.prompts:  # before any network call: a typo in the path fails fast
        try:
            prompts_from_file = read_prompts(args.prompts)
        except PromptFileError as err:
            raise UserError(str(err)) from None
    try:
        ls = client(settings, args.url, args.api_key)
        project = get_project(ls, args.project)
    except LabelStudioError as err:
        raise UserError(str(err)) from None
    schema = read_schema(project.label_config)

    existing: list[Any] = []
    if args.prompts:
        prompts = prompts_from_file
    else:
        listed: list[Any] = list(ls.tasks.list(project=args.project))
        existing = [t for t in listed if _needs_answers(t.data or {}, schema)]
        prompts = [t.data[schema.prompt_field] for t in existing]
        if not prompts:
            raise UserError(
                f"project {args.project} has no tasks with a {schema.prompt_field!r} field and no answers yet: "
                "import prompt-only tasks or pass --prompts FILE"
            )
    if args.limit:
        prompts, existing = prompts[: args.limit], existing[: args.limit]

    holder = ModelHolder(settings)
    holder.refresh()
    served = holder.get()
    log.info("generating with %s for %d prompts", served.model_version, len(prompts))
    with tqdm(total=len(prompts), desc="generate", unit="prompt") as bar:
        tasks: list[dict[str, Any]] = [
            {"data": data}
            for data in make_tasks(
                prompts, schema, served, settings, on_progress=lambda n: bar.update(n - bar.n)
            )
        ]
    attach_predictions(tasks, RLHFBackend(settings, holder), project.label_config)

    try:
        if existing:
            for task, new in zip(existing, tasks, strict=True):
                ls.tasks.update(id=task.id, data={**task.data, **new["data"]})
                for item in new.get("predictions", []):
                    ls.predictions.create(
                        task=task.id,
                        result=item["result"],
                        score=item.get("score"),
                        model_version=item["model_version"],
                    )
            print(
                f"updated {len(existing)} tasks in project {args.project} with {served.model_version}"
            )
        else:
            # The SDK types the request as its own models; it sends plain task dicts as they
            # are. Its response model does not declare the task_ids it returns.
            response = ls.projects.import_tasks(
                id=args.project,
                request=tasks,  # type: ignore[arg-type]
                return_task_ids=True,
            )
            print(
                f"imported {len(getattr(response, 'task_ids', None) or tasks)} tasks into project {args.project} with {served.model_version}"
            )
    except Exception as err:  # noqa: BLE001 - SDK/HTTP errors become one clear line
        raise UserError(describe(err, f"project {args.project}")) from None
    return 0


def _needs_answers(data: dict, schema) -> bool:
    if not isinstance(data.get(schema.prompt_field), str):
        return False
    if schema.kind == "demonstration":
        return False
    if schema.list_field:
        return not data.get(schema.list_field)
    return any(not data.get(name) for name in schema.answer_fields)
