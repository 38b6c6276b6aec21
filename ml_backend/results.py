"""Turn completions and reward scores into Label Studio prediction results.

One function per control tag, all driven by the project's `Schema`, so renamed tags
work. The prediction `score` is what Label Studio's uncertainty sampling sorts by
(lowest first), so it is the model's probability of being right about its suggestion:

* pairwise: the Bradley-Terry probability sigmoid(r_chosen - r_other) of the suggested
  choice (0.5 = a coin flip; those tasks are shown first);
* ranking: the probability of the least certain adjacent pair in the suggested order,
  i.e. min_i sigmoid(r_(i) - r_(i+1)): a ranking is as uncertain as its closest call;
* demonstration: no score (the draft is a starting point, not a judgment).

Without a trained reward model there is no suggested choice or ranking and no score:
nothing is made up, and the reward box says so.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from training.label_config import Schema


class InputError(ValueError):
    """A request field the backend cannot use: `field` names it (a JSON path such as
    "tasks[0].data.prompt"), the message says what is wrong and what to send instead."""

    status = 400

    def __init__(self, message: str, field: str, status: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        if status is not None:
            self.status = status


class TaskDataError(InputError):
    """A task lacks what the label config reads, or holds it with the wrong type; the
    message names the task and field, and `field` is its path in the task."""

    status = 422

    def __init__(self, task_id: Any, message: str, field: str = "data") -> None:
        super().__init__(f"task {task_id}: {message}", field)
        self.task_id = task_id


def describe_type(value: Any) -> str:
    """A JSON value's type in words, for messages about wrong types."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a string" if isinstance(value, str) else "null"


def task_data(task: dict) -> dict:
    """A task's "data" object; TaskDataError if it is missing or not an object."""
    data = task.get("data")
    if not isinstance(data, dict):
        what = "missing" if data is None else f"{describe_type(data)}, not an object"
        raise TaskDataError(
            task.get("id"),
            f'"data" is {what}; a task\'s data is an object of fields, e.g. {{"prompt": "..."}}',
        )
    return data


def _text(task: dict, data: dict, name: str, what: str) -> str:
    """A text field of the task's data: TaskDataError for a missing one or a wrong type."""
    value = data.get(name)
    field = f"data.{name}"
    if value is None:
        raise TaskDataError(
            task.get("id"), f"has no field {name!r}; the label config reads ${name}{what}", field
        )
    if not isinstance(value, str):
        raise TaskDataError(
            task.get("id"),
            f"field {name!r} is {describe_type(value)}, not text; the label config shows ${name} as text",
            field,
        )
    if not _encodable(value):
        raise TaskDataError(
            task.get("id"),
            f"field {name!r} holds invalid Unicode (a lone surrogate); send UTF-8 text",
            field,
        )
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass(frozen=True)
class Answer:
    key: str  # the tag name (pairwise/rating) or List item id (ranking)
    text: str


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def task_prompt(task: dict, schema: Schema, max_chars: int) -> str:
    data = task_data(task)
    prompt = _text(task, data, schema.prompt_field, "")
    field = f"data.{schema.prompt_field}"
    if not prompt.strip():
        raise TaskDataError(
            task.get("id"),
            f"field {schema.prompt_field!r} is empty; the label config reads ${schema.prompt_field}",
            field,
        )
    if len(prompt) > max_chars:
        raise TaskDataError(
            task.get("id"),
            f"prompt is {len(prompt)} characters, over the limit of {max_chars} "
            f"(LS_RLHF_MAX_PROMPT_CHARS); shorten it or raise the limit",
            field,
        )
    return prompt


def task_answers(task: dict, schema: Schema) -> list[Answer]:
    """The answers a task shows, in display order; empty for demonstration configs."""
    data = task_data(task)
    tid = task.get("id")
    if schema.list_field:
        items = data.get(schema.list_field)
        field = f"data.{schema.list_field}"
        if not isinstance(items, list) or not items:
            what = (
                "has no list"
                if items is None or items == []
                else f"has {describe_type(items)}, not a list,"
            )
            raise TaskDataError(
                tid,
                f"{what} {schema.list_field!r} of answers; the label config reads ${schema.list_field} "
                f'(items like {{"id": "a1", "title": "Answer 1", "body": "..."}}); '
                f"`ls-rlhf generate` fills it",
                field,
            )
        answers = []
        for i, item in enumerate(items):
            body = item.get("body") if isinstance(item, dict) else None
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("id"), (str, int))
                or isinstance(item.get("id"), bool)
                or not isinstance(body, str)
                or not _encodable(body)
                or not _encodable(str(item["id"]))
            ):
                raise TaskDataError(
                    tid,
                    f"item {i} of {schema.list_field!r} needs an 'id' (text or a number) and a "
                    "text 'body'",
                    f"{field}[{i}]",
                )
            answers.append(Answer(str(item["id"]), body))
        return answers
    answers = []
    for tag, name in zip(schema.answer_tags, schema.answer_fields, strict=True):
        text = _text(task, data, name, " (`ls-rlhf generate` fills it)")
        answers.append(Answer(tag, text))
    return answers


def reward_text(
    answers: list[Answer], rewards: list[float], schema: Schema, reward_label: str
) -> str:
    if schema.list_field:
        names = [f"{a.key}" for a in answers]
    else:
        names = [f"answer {i + 1}" for i in range(len(answers))]
    parts = [f"{name}: {reward:+.3f}" for name, reward in zip(names, rewards, strict=True)]
    return f"Reward ({reward_label}): " + " | ".join(parts)


WITHHELD_TEXT = (
    "No suggestion on this task: it is one of the tasks where the suggestion is withheld, to "
    "measure whether suggestions sway annotators. Please judge the answers on your own."
)


def suggestion_withheld(task_id: Any, share: float, seed: int) -> bool:
    """Whether the anchoring guard withholds the suggestion on this task: a draw seeded by the
    task id, so a task stays on its side when it is predicted again."""
    if share <= 0 or task_id is None:
        return False
    return random.Random(f"anchoring:{seed}:{task_id}").random() < share


def build_prediction(
    schema: Schema,
    answers: list[Answer],
    rewards: list[float] | None,
    model_version: str,
    reward_label: str | None,
    draft: str | None = None,
    withhold: bool = False,
) -> dict[str, Any]:
    """One prediction item for one task: {"result": [...], "score": p, "model_version": v}.

    `withhold` (the anchoring guard): no choice, ranking, confidence or reward scores, only a
    note where the config shows rewards. The prediction itself is the record: a reward version
    made it (the same version suggests on other tasks) and it suggests nothing
    (training/quality.py)."""
    result: list[dict[str, Any]] = []
    if withhold and rewards is not None:
        if schema.answer_box and draft is not None:
            result.append(_textarea(schema.answer_box, schema.prompt_tag, draft))
        if schema.reward_display:
            result.append(_textarea(schema.reward_display, schema.prompt_tag, WITHHELD_TEXT))
        return {"result": result, "model_version": model_version}
    score: float | None = None

    if schema.answer_box and draft is not None:
        result.append(_textarea(schema.answer_box, schema.prompt_tag, draft))

    if rewards is not None and len(answers) >= 2:
        order = sorted(range(len(answers)), key=lambda i: rewards[i], reverse=True)
        if schema.pairwise:
            best, other = order[0], order[1]
            result.append(
                {
                    "from_name": schema.pairwise,
                    "to_name": schema.pairwise,
                    "type": "pairwise",
                    "value": {"selected": "left" if best == 0 else "right"},
                }
            )
            score = sigmoid(rewards[best] - rewards[other])
        elif schema.ranker and schema.list_tag and not schema.buckets:
            # With buckets (best/bad/biased...) an order says nothing about bucket membership,
            # so only the rewards are shown.
            ranked = [answers[i].key for i in order]
            result.append(
                {
                    "from_name": schema.ranker,
                    "to_name": schema.list_tag,
                    "type": "ranker",
                    "value": {"ranker": {schema.ranker: ranked}},
                }
            )
            score = min(
                sigmoid(rewards[a] - rewards[b]) for a, b in zip(order, order[1:], strict=False)
            )
        elif schema.choices and schema.choice_values:
            best_tag = answers[order[0]].key
            value = next((v for v, tag in schema.choice_values.items() if tag == best_tag), None)
            if value is not None:
                result.append(
                    {
                        "from_name": schema.choices,
                        "to_name": schema.prompt_tag,
                        "type": "choices",
                        "value": {"choices": [value]},
                    }
                )
                score = sigmoid(rewards[order[0]] - rewards[order[1]])

    if schema.reward_display:
        if rewards is not None:
            text = reward_text(answers, rewards, schema, reward_label or "reward model")
        else:
            text = "No reward model yet: the suggestions appear once one is trained on your comparisons."
        result.append(_textarea(schema.reward_display, schema.prompt_tag, text))

    item: dict[str, Any] = {"result": result, "model_version": model_version}
    if score is not None:
        item["score"] = round(score, 6)
    return item


def _textarea(from_name: str, to_name: str, text: str) -> dict[str, Any]:
    return {
        "from_name": from_name,
        "to_name": to_name,
        "type": "textarea",
        "value": {"text": [text]},
    }
