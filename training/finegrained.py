"""FineGrainedRLHF qa-feedback (allenai, Apache-2.0) as Label Studio tasks with annotations.

Real human judgments for development, tests and benchmarks: each of the 500 records has
a question, passages, four model answers, six pairwise preferences over the answers, error
spans and missing-information notes on answer 1, and a human correction of answer 1.
The converters produce tasks exactly as Label Studio stores them for this project's label
configs, so the real export parser runs on real preferences.

Fixed split: the first 400 records (file order) train, the last 100 are held out; nothing
is tuned on the held-out part.
"""

from __future__ import annotations

import ast
import json
from itertools import combinations
from pathlib import Path
from typing import Any

# Where the data set lives in a checkout: ../shared beside the project (it is never copied in).
DEFAULT_PATH = (
    Path(__file__).resolve().parents[2]
    / "shared"
    / "data"
    / "finegrainedrlhf"
    / "qa_feedback_dev.json"
)
PAIRS = list(combinations(range(4), 2))  # the order of the six `preference` judgments
ANSWERS = [f"prediction {i}" for i in range(1, 5)]


def load_finegrained(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: it lives in ../shared/data/finegrainedrlhf/ beside the project"
        )
    return json.loads(path.read_text())


def finegrained_split(records: list[dict], n_train: int = 400) -> tuple[list[dict], list[dict]]:
    return records[:n_train], records[n_train:]


def format_prompt(record: dict, passage_chars: int = 0) -> str:
    """The question, after its retrieved passages cut to `passage_chars` (0: no passages).

    Passages come first and the question last ("context, then question", as the answers
    were generated): a reward model that cuts an over-long prompt from the left then loses
    the tail of the passage text, never the question.
    """
    if passage_chars <= 0:
        return record["question"]
    passages = (
        ast.literal_eval(record["passages"])
        if isinstance(record["passages"], str)
        else record["passages"]
    )
    text = "\n".join(
        f"{title}: {' '.join(' '.join(sentences).split())}" for title, *sentences in passages
    )
    if len(text) > passage_chars:
        text = text[:passage_chars].rsplit(" ", 1)[0] + " ..."
    return f"Passages:\n{text}\n\nQuestion: {record['question']}"


def ranking_order(preference: list[int]) -> list[int] | None:
    """Order of the four answers from the six judgments (Copeland: wins minus losses;
    ties broken by answer number); None when every judgment is "no preference"."""
    if not any(preference):
        return None
    score = [0] * 4
    for (i, j), p in zip(PAIRS, preference, strict=True):
        if p == 1:
            score[i], score[j] = score[i] + 1, score[j] - 1
        elif p == 2:
            score[i], score[j] = score[i] - 1, score[j] + 1
    return sorted(range(4), key=lambda i: (-score[i], i))


def critique_text(record: dict) -> str:
    """The annotators' error spans and missing information as written feedback."""
    feedback = _feedback(record)
    answer = record["prediction 1"]
    lines = []
    for error in feedback.get("errors", []):
        span = answer[error["start"] : error["end"]].strip()
        note = f" ({error['explanation']})" if error.get("explanation") else ""
        lines.append(f'{error["error type"]}: "{span}"{note}')
    for missing in feedback.get("missing-info", []):
        lines.append(f"Missing information: {missing.get('error type', 'missing')}")
    return "\n".join(lines)


def to_label_studio_tasks(records: list[dict], kind: str, passage_chars: int = 0) -> list[dict]:
    """Import-ready tasks with the human annotation, for label_configs/<kind>.xml."""
    tasks = []
    for index, record in enumerate(records):
        prompt = format_prompt(record, passage_chars)
        meta = {"source": "finegrainedrlhf", "record": index}
        if kind == "pairwise":
            for (i, j), p in zip(PAIRS, record["preference"], strict=True):
                if p == 0:
                    continue
                data = {
                    "prompt": prompt,
                    "answer1": record[ANSWERS[i]],
                    "answer2": record[ANSWERS[j]],
                    **meta,
                }
                result = {
                    "from_name": "comparison",
                    "to_name": "comparison",
                    "type": "pairwise",
                    "value": {"selected": "left" if p == 1 else "right"},
                }
                tasks.append(_task(data, [result]))
        elif kind == "ranking":
            order = ranking_order(record["preference"])
            if order is None:
                continue
            items = [
                {"id": f"a{i + 1}", "title": f"Answer {i + 1}", "body": record[ANSWERS[i]]}
                for i in range(4)
            ]
            result = {
                "from_name": "rank",
                "to_name": "answers",
                "type": "ranker",
                "value": {"ranker": {"rank": [f"a{i + 1}" for i in order]}},
            }
            tasks.append(_task({"prompt": prompt, "items": items, **meta}, [result]))
        elif kind == "demonstration":
            corrected = _feedback(record).get("corrected-prediction")
            if not corrected:
                continue
            data = {"prompt": prompt, "draft": record["prediction 1"], **meta}
            tasks.append(_task(data, [_textarea("answer", "prompt", corrected)]))
        elif kind == "critique":
            feedback = critique_text(record)
            corrected = _feedback(record).get("corrected-prediction")
            if not feedback:
                continue
            results = [_textarea("feedback", "answer", feedback)]
            if corrected:
                results.append(_textarea("rewrite", "answer", corrected))
            tasks.append(
                _task({"prompt": prompt, "answer": record["prediction 1"], **meta}, results)
            )
        else:
            raise ValueError(
                f"unknown kind {kind!r}: use pairwise, ranking, demonstration or critique"
            )
    return tasks


def to_export(tasks: list[dict], first_task_id: int = 1) -> list[dict]:
    """The same tasks shaped like Label Studio's JSON export (ids, annotators, ...)."""
    exported = []
    annotation_id = 1
    for offset, task in enumerate(tasks):
        annotations = []
        for annotation in task.get("annotations", []):
            annotations.append(
                {
                    "id": annotation_id,
                    "completed_by": 1,
                    "was_cancelled": False,
                    "ground_truth": False,
                    "result": annotation["result"],
                }
            )
            annotation_id += 1
        exported.append(
            {
                "id": first_task_id + offset,
                "data": task["data"],
                "annotations": annotations,
                "predictions": task.get("predictions", []),
            }
        )
    return exported


def preference_pairs(records: list[dict], kind: str = "pairwise", passage_chars: int = 0):
    """The records' human judgments as preference pairs, through the real path:
    Label Studio tasks -> export JSON -> feedback records -> `preference_dataset`."""
    import label_configs
    from training.datasets import preference_dataset
    from training.feedback import parse_export

    tasks = to_label_studio_tasks(records, kind, passage_chars=passage_chars)
    return preference_dataset(parse_export(to_export(tasks), label_configs.load(kind)).records)


def _task(data: dict, results: list[dict]) -> dict:
    return {
        "data": data,
        "annotations": [
            {"result": [{**r, "origin": "manual"} for r in results], "ground_truth": False}
        ],
    }


def _textarea(from_name: str, to_name: str, text: str) -> dict:
    return {
        "from_name": from_name,
        "to_name": to_name,
        "type": "textarea",
        "value": {"text": [text]},
    }


def _feedback(record: dict) -> dict:
    feedback = record.get("feedback") or {}
    return ast.literal_eval(feedback) if isinstance(feedback, str) else feedback
