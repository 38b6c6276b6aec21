"""Label Studio export JSON -> typed feedback records.

One parser covers every result type of the project's label configs. Which task field
holds the prompt and which the answers, and what each control means, comes from the
label config (`training.label_config.read_schema`), so renamed tags work.

Rules:
* cancelled annotations are skipped (and counted);
* every annotator's annotation on a task is kept, with its id and annotator;
* ties and "no preference" stay ties (`Comparison.preferred is None`): they are not pairs;
* an annotation whose results all carry `origin: "prediction"` accepted the model's
  suggestion unchanged (`Source.from_prediction`), which measures how often people agree
  with the backend;
* a malformed or unknown result becomes a `Problem` naming task and annotation, and the
  rest of the export is still parsed;
* a task whose data names the model behind each answer ("answer_sources") gives
  comparisons that carry those names (`Comparison.sources`, `preferred_source`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from training.label_config import LabelConfigError, Schema, read_schema


@dataclass(frozen=True)
class Source:
    task_id: int | None
    annotation_id: int | None
    annotator: int | str | None
    from_prediction: bool = False


@dataclass(frozen=True)
class Comparison:
    """A choice between two answers (Pairwise, or Choices naming answers).

    `sources` names the model that wrote each answer, in the same order, when the task
    records it (its data's "answer_sources", as policy-against-base tasks do: their sides
    are drawn at random, so the side says nothing about the model)."""

    prompt: str
    answers: tuple[str, str]
    preferred: int | None  # 0 or 1; None = tie / no preference
    source: Source
    sources: tuple[str, str] | None = None

    @property
    def preferred_source(self) -> str | None:
        """The model whose answer was preferred (None for a tie or unknown sources)."""
        if self.sources is None or self.preferred is None:
            return None
        return self.sources[self.preferred]


@dataclass(frozen=True)
class Ranking:
    """An order of K answers, best first (with buckets: bucket order, then order inside)."""

    prompt: str
    answers: tuple[str, ...]
    buckets: tuple[tuple[str, tuple[str, ...]], ...]
    source: Source


@dataclass(frozen=True)
class Rating:
    prompt: str
    answer: str
    criterion: str
    value: float
    max_value: float
    source: Source


@dataclass(frozen=True)
class Flag:
    """An answer flagged as e.g. "biased" or "unsafe"."""

    prompt: str
    answer: str
    flag: str
    source: Source


@dataclass(frozen=True)
class Demonstration:
    """What the annotator wrote or corrected as the answer to a prompt."""

    prompt: str
    completion: str
    original: str | None  # the model's draft, when known
    source: Source


@dataclass(frozen=True)
class Critique:
    """Written feedback on an answer (or on a comparison as a whole: answer None)."""

    prompt: str
    answer: str | None
    feedback: str
    refinement: str | None
    source: Source


Record = Comparison | Ranking | Rating | Flag | Demonstration | Critique

FLAG_BUCKETS = frozenset({"biased", "unsafe", "harmful"})
# The task data field naming the model behind each answer, in answer order.
ANSWER_SOURCES = "answer_sources"


@dataclass(frozen=True)
class Problem:
    task_id: int | None
    annotation_id: int | None
    message: str

    def __str__(self) -> str:
        return f"task {self.task_id}, annotation {self.annotation_id}: {self.message}"


@dataclass
class ParsedExport:
    records: list[Record] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    cancelled: int = 0
    annotations: int = 0

    def of_type(self, cls: type) -> list:
        return [r for r in self.records if isinstance(r, cls)]

    def summary(self) -> dict[str, int]:
        counts = Counter(type(r).__name__ for r in self.records)
        return {
            "annotations": self.annotations,
            "cancelled": self.cancelled,
            **{
                name: counts.get(name, 0)
                for name in ("Comparison", "Ranking", "Rating", "Flag", "Demonstration", "Critique")
            },
            "accepted_predictions": sum(1 for r in self.records if r.source.from_prediction),
            "problems": len(self.problems),
        }


def parse_export(tasks: list[dict[str, Any]], label_config: str) -> ParsedExport:
    """Every annotation of every task; problems are collected, not raised."""
    schema = read_schema(label_config)
    parsed = ParsedExport()
    if not isinstance(tasks, list):
        raise LabelConfigError("an export is a JSON list of tasks")
    for task in tasks:
        if not isinstance(task, dict):
            parsed.problems.append(
                Problem(None, None, "an export item is not a task object; skipped")
            )
            continue
        annotations = task.get("annotations", task.get("completions")) or []
        for annotation in annotations:
            if not isinstance(annotation, dict):
                parsed.problems.append(
                    Problem(task.get("id"), None, "an annotation is not an object; skipped")
                )
                continue
            parsed.annotations += 1
            if annotation.get("was_cancelled"):
                parsed.cancelled += 1
                continue
            records, problems = parse_annotation(task, annotation, schema)
            parsed.records.extend(records)
            parsed.problems.extend(problems)
    return parsed


def parse_annotation(
    task: dict, annotation: dict, schema: Schema
) -> tuple[list[Record], list[Problem]]:
    tid, aid = task.get("id"), annotation.get("id")
    data = task.get("data") or {}
    results = annotation.get("result") or []
    problems: list[Problem] = []
    prompt = data.get(schema.prompt_field)
    if not isinstance(prompt, str):
        return [], [
            Problem(
                tid,
                aid,
                f"task data has no {schema.prompt_field!r} (the config reads ${schema.prompt_field})",
            )
        ]
    origins = [r.get("origin") for r in results if isinstance(r, dict)]
    source = Source(
        tid,
        aid,
        annotation.get("completed_by"),
        from_prediction=bool(origins) and all(o == "prediction" for o in origins),
    )
    answer_text = {
        tag: data.get(name)
        for tag, name in zip(schema.answer_tags, schema.answer_fields, strict=True)
    }
    items = {}
    if schema.list_field:
        for item in data.get(schema.list_field) or []:
            if isinstance(item, dict) and "id" in item:
                items[str(item["id"])] = item.get("body")

    records: list[Record] = []
    texts: dict[str, str] = {}
    for result in results:
        try:
            record, text = _parse_result(result, schema, prompt, answer_text, items, source)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            problems.append(
                Problem(tid, aid, f"result {_describe(result)} is malformed ({err}); skipped")
            )
            continue
        if record is not None:
            records.extend(record if isinstance(record, list) else [record])
        if text is not None:
            texts[result["from_name"]] = text

    sources = _answer_sources(data, schema)
    if sources is not None:
        records = [replace(r, sources=sources) if isinstance(r, Comparison) else r for r in records]
    # A tie ("tie", "both bad") overrides a side clicked in the same annotation.
    if any(isinstance(r, Comparison) and r.preferred is None for r in records):
        records = [
            r for r in records if not (isinstance(r, Comparison) and r.preferred is not None)
        ]
    # Text boxes combine into one record per annotation.
    if schema.answer_box and texts.get(schema.answer_box):
        original = data.get("draft") or _predicted_text(task, schema.answer_box)
        records.append(Demonstration(prompt, texts[schema.answer_box], original, source))
    if schema.kind == "critique":
        answer = answer_text.get(schema.answer_tags[0])
        refinement = texts.get(schema.refinement) if schema.refinement else None
        feedback = texts.get(schema.critique) if schema.critique else None
        if feedback:
            records.append(Critique(prompt, answer, feedback, refinement or None, source))
        if refinement:  # a rewrite is also a demonstration, with the model's answer as original
            records.append(Demonstration(prompt, refinement, answer, source))
    elif schema.critique and texts.get(schema.critique):
        # The optional critique box beside a comparison, ranking or rating.
        records.append(Critique(prompt, None, texts[schema.critique], None, source))
    return records, problems


def _parse_result(result, schema, prompt, answer_text, items, source):
    """(record or list of records or None, text or None) for one result item."""
    if not isinstance(result, dict) or "value" not in result or "from_name" not in result:
        raise ValueError("needs from_name and value")
    name, kind, value = result["from_name"], result.get("type"), result["value"]
    if name == schema.reward_display:
        return None, None
    if kind == "pairwise" and name == schema.pairwise:
        selected = value.get("selected")
        if selected not in ("left", "right", None):
            raise ValueError(f"selected must be left or right, not {selected!r}")
        a, b = (_answer(answer_text, t) for t in schema.answer_tags)
        return Comparison(
            prompt, (a, b), None if selected is None else ("left", "right").index(selected), source
        ), None
    if kind == "ranker" and name == schema.ranker:
        ranker = value["ranker"]
        if not isinstance(ranker, dict):
            raise ValueError("ranker value must map a list or buckets to item ids")
        keys = [k for k in schema.buckets if k in ranker] if schema.buckets else list(ranker)
        if not schema.buckets and len(keys) != 1:
            keys = keys[:1]
        buckets = tuple((k, tuple(_item(items, i) for i in ranker[k])) for k in keys)
        flags = [
            Flag(prompt, text, k, source)
            for k, answers in buckets
            if k.lower() in FLAG_BUCKETS
            for text in answers
        ]
        ordered = tuple(
            text for k, answers in buckets if k.lower() not in FLAG_BUCKETS for text in answers
        )
        records: list = (
            [Ranking(prompt, ordered, buckets if schema.buckets else (), source)]
            if len(ordered) >= 2
            else []
        )
        return records + flags, None
    if kind == "rating":
        control = next((r for r in schema.ratings if r.name == name), None)
        if control is None:
            raise ValueError(f"no Rating tag named {name!r} in the config")
        score = float(value["rating"])
        answer = _answer(answer_text, control.answer_tag)
        return Rating(prompt, answer, control.criterion, score, control.max_rating, source), None
    if kind == "choices":
        chosen = value["choices"]
        if not isinstance(chosen, list):
            raise ValueError("choices must be a list")
        if name == schema.tie_choices:
            if not chosen:
                return None, None
            a, b = (_answer(answer_text, t) for t in schema.answer_tags[:2])
            return Comparison(prompt, (a, b), None, source), None  # a tie, whatever the side
        if name == schema.choices:
            tags = [schema.choice_values.get(c) for c in chosen]
            if len(tags) != 1 or tags[0] is None:
                a, b = (_answer(answer_text, t) for t in schema.answer_tags[:2])
                return Comparison(prompt, (a, b), None, source), None  # "tie" or both
            index = list(schema.answer_tags).index(tags[0])
            a, b = (_answer(answer_text, t) for t in schema.answer_tags[:2])
            return Comparison(prompt, (a, b), index if index < 2 else None, source), None
        flag_target = dict(schema.flags).get(name)
        if flag_target is not None:
            return [
                Flag(prompt, _answer(answer_text, flag_target), c, source) for c in chosen
            ], None
        raise ValueError(f"Choices {name!r} is neither a choice between answers nor a flag on one")
    if kind == "textarea":
        text = value["text"]
        text = "\n".join(text) if isinstance(text, list) else str(text)
        return None, text.strip()
    raise ValueError(f"unknown result type {kind!r} for control {name!r}")


@dataclass(frozen=True)
class ModelComparison:
    """People's verdicts between the answers of two models (tasks recording their sources)."""

    first: str  # the model whose win rate this is
    second: str
    comparisons: int
    first_wins: int
    ties: int
    second_wins: int

    @property
    def first_win_rate(self) -> float:
        """The first model's share of wins, a tie counting half."""
        return (self.first_wins + self.ties / 2) / self.comparisons


def model_comparisons(comparisons: list[Comparison]) -> list[ModelComparison]:
    """Per pair of models, over the comparisons whose answers came from two different
    recorded sources: who was preferred. The first of a pair is the later name in sort
    order ("policy-v3" before "policy-base")."""
    verdicts: dict[tuple[str, str], list[str | None]] = {}
    for c in comparisons:
        if c.sources and c.sources[0] != c.sources[1]:
            pair = (max(c.sources), min(c.sources))
            verdicts.setdefault(pair, []).append(c.preferred_source)
    return [
        ModelComparison(
            first,
            second,
            len(chosen),
            chosen.count(first),
            chosen.count(None),
            chosen.count(second),
        )
        for (first, second), chosen in sorted(verdicts.items())
    ]


def _answer_sources(data: dict[str, Any], schema: Schema) -> tuple[str, str] | None:
    """The task's "answer_sources" for its first two answers (what a Comparison compares),
    if the task records them as text, one per answer field."""
    listed = data.get(ANSWER_SOURCES)
    if (
        isinstance(listed, list)
        and len(listed) == len(schema.answer_fields) >= 2
        and all(isinstance(x, str) for x in listed)
    ):
        return (listed[0], listed[1])
    return None


def _answer(answer_text: dict[str, Any], tag: str) -> str:
    text = answer_text.get(tag)
    if not isinstance(text, str):
        raise KeyError(f"task data has no text for answer {tag!r}")
    return text


def _item(items: dict[str, Any], item_id: Any) -> str:
    text = items.get(str(item_id))
    if not isinstance(text, str):
        raise KeyError(f"ranked item {item_id!r} is not in the task's list")
    return text


def _predicted_text(task: dict, control: str) -> str | None:
    for prediction in task.get("predictions") or []:
        if not isinstance(prediction, dict):
            continue
        for result in prediction.get("result") or []:
            if isinstance(result, dict) and result.get("from_name") == control:
                text = (result.get("value") or {}).get("text")
                return "\n".join(text) if isinstance(text, list) else text
    return None


def _describe(result: Any) -> str:
    if isinstance(result, dict):
        return f"{result.get('from_name')!r} ({result.get('type')})"
    return repr(result)[:40]
