"""Read a Label Studio labeling config and find the roles the RLHF loop needs.

Tags are found by type, not by name, so users may rename them:

* prompt: the Text tag that no answer control points at (prefer one reading `$prompt`);
* answers: the Text tags a Pairwise/Rating/critique TextArea points at, or the List a
  Ranker points at (its items are `{"id", "title", "body"}`);
* controls: Pairwise, Ranker (with optional Buckets), Choices between answers, Rating per
  answer and criterion, Choices on an answer that flag it ("biased", "unsafe"), a TextArea for demonstrations, critiques or rewrites, and an
  optional read-only TextArea whose name starts with "reward" where the backend writes
  the reward of each answer for the annotator to see.

`read_schema()` says exactly what is missing when a config does not fit.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

TIE_VALUES = frozenset({"tie", "both bad", "both good", "equal"})
KINDS = ("pairwise", "ranking", "rating", "demonstration", "critique")
_REWRITE_WORDS = ("rewrite", "refine", "refinement", "correct", "revision", "revise", "improve")


class LabelConfigError(ValueError):
    """The label config cannot serve this purpose; the message says what to add."""


@dataclass(frozen=True)
class RatingControl:
    """A Rating tag of the config (the feedback it yields is `training.feedback.Rating`)."""

    name: str  # the Rating control's name
    answer_tag: str  # the Text tag it rates
    criterion: str  # e.g. "helpfulness"
    max_rating: float = 5.0  # the tag's maxRating (Label Studio's default: 5)


@dataclass(frozen=True)
class Schema:
    kind: str
    prompt_tag: str
    prompt_field: str
    answer_tags: tuple[str, ...] = ()  # Text tags showing one answer each, in order
    answer_fields: tuple[str, ...] = ()  # their task data keys, same order
    list_tag: str | None = None  # ranking: the List tag ...
    list_field: str | None = None  # ... and the data key holding its items
    pairwise: str | None = None
    ranker: str | None = None
    buckets: tuple[str, ...] = ()
    choices: str | None = None  # Choices whose values name answers ("answer1", ...)
    choice_values: dict[str, str] = field(default_factory=dict)  # choice value -> answer tag
    ratings: tuple[RatingControl, ...] = ()
    flags: tuple[
        tuple[str, str], ...
    ] = ()  # (Choices name, answer tag): "biased", "unsafe" per answer
    answer_box: str | None = None  # demonstration: TextArea the model pre-fills
    critique: str | None = None  # TextArea of written feedback
    refinement: str | None = None  # TextArea of a rewritten answer
    reward_display: str | None = None  # TextArea where the backend shows rewards
    # Choices beside a Pairwise for what it cannot say ("tie", "both bad"): parsed as a tie.
    tie_choices: str | None = None


def read_schema(config_xml: str) -> Schema:
    """The roles of a labeling config; LabelConfigError if it fits no RLHF kind."""
    try:
        root = ET.fromstring(config_xml)
    except ET.ParseError as err:
        raise LabelConfigError(f"the label config is not valid XML: {err}") from None
    tags = [el for el in root.iter() if el.get("name")]
    by_name = {el.attrib["name"]: el for el in tags}
    texts = {n: el for n, el in by_name.items() if el.tag == "Text"}
    lists = {n: el for n, el in by_name.items() if el.tag == "List"}

    def of(kind: str) -> list[ET.Element]:
        return [el for el in tags if el.tag == kind]

    textareas = of("TextArea")
    reward_display = next(
        (t.get("name") for t in textareas if t.get("name", "").lower().startswith("reward")), None
    )
    textareas = [t for t in textareas if t.get("name") != reward_display]

    # The first control found decides the kind: Pairwise, Ranker, Rating, then TextArea.
    if of("Pairwise"):
        kind, answer_tags, extra = "pairwise", *_pairwise_roles(of("Pairwise")[0], texts)
    elif of("Ranker"):
        kind, answer_tags, extra = "ranking", [], _ranking_roles(of("Ranker")[0], lists)
    elif of("Rating"):
        kind, answer_tags, extra = "rating", *_rating_roles(of("Rating"), texts)
    elif textareas:
        kind, answer_tags, extra = _textarea_roles(textareas, texts)
    else:
        raise LabelConfigError(
            "the label config has no RLHF control: add <Pairwise> (two answers), <Ranker> over a "
            "<List> (K answers), <Rating> per answer, or a <TextArea> for demonstrations/critiques "
            "(see label_configs/ for complete examples)"
        )
    extra.update(_choice_roles(of("Choices"), answer_tags, extra.get("list_tag")))
    if kind == "pairwise":
        extra["tie_choices"] = next(
            (
                el.get("name")
                for el in of("Choices")
                if el.get("name") != extra.get("choices")
                and {c.get("value", "").lower() for c in el.iter("Choice")} & TIE_VALUES
            ),
            None,
        )
    if kind in ("pairwise", "ranking", "rating") and textareas:
        # An optional critique box next to a comparison, ranking or rating.
        extra["critique"] = textareas[0].get("name")

    prompt_tag = _prompt_tag(texts, answer_tags)
    return Schema(
        kind=kind,
        prompt_tag=prompt_tag,
        prompt_field=_value_field(texts[prompt_tag]),
        answer_tags=tuple(answer_tags),
        answer_fields=tuple(_value_field(texts[t]) for t in answer_tags),
        reward_display=reward_display,
        **extra,
    )


def _targets(el: ET.Element) -> list[str]:
    return [t.strip() for t in (el.get("toName") or "").split(",") if t.strip()]


def _value_field(el: ET.Element) -> str:
    value = el.get("value") or ""
    if not value.startswith("$"):
        raise LabelConfigError(
            f'<{el.tag} name="{el.get("name")}"> must read a task field, e.g. value="$prompt"'
        )
    return value[1:]


def _pairwise_roles(
    pairwise: ET.Element, texts: dict[str, ET.Element]
) -> tuple[list[str], dict[str, Any]]:
    answer_tags = _targets(pairwise)
    if len(answer_tags) != 2 or any(t not in texts for t in answer_tags):
        raise LabelConfigError(
            f'<Pairwise name="{pairwise.get("name")}"> needs toName with two Text tags, '
            f'e.g. toName="answer1,answer2"; it has {pairwise.get("toName")!r}'
        )
    return answer_tags, {"pairwise": pairwise.get("name")}


def _ranking_roles(ranker: ET.Element, lists: dict[str, ET.Element]) -> dict[str, Any]:
    list_tag = next((t for t in _targets(ranker) if t in lists), None)
    if list_tag is None:
        raise LabelConfigError(
            f'<Ranker name="{ranker.get("name")}"> must point at a <List> tag '
            f'(e.g. <List name="answers" value="$items" title="Answers"/>), '
            f"not {ranker.get('toName')!r}"
        )
    return {
        "ranker": ranker.get("name"),
        "list_tag": list_tag,
        "list_field": _value_field(lists[list_tag]),
        "buckets": tuple(b.get("name") for b in ranker.iter("Bucket") if b.get("name")),
    }


def _rating_roles(
    ratings: list[ET.Element], texts: dict[str, ET.Element]
) -> tuple[list[str], dict[str, Any]]:
    answer_tags: list[str] = []
    found = []
    for el in ratings:
        target = next((t for t in _targets(el) if t in texts), None)
        if target is None:
            raise LabelConfigError(
                f'<Rating name="{el.get("name")}"> must point at the Text tag of the answer it rates'
            )
        if target not in answer_tags:
            answer_tags.append(target)
        name = el.attrib["name"]  # read_schema keeps only named tags
        found.append(
            RatingControl(name, target, _criterion(name, target), float(el.get("maxRating") or 5))
        )
    return answer_tags, {"ratings": tuple(found)}


def _textarea_roles(
    textareas: list[ET.Element], texts: dict[str, ET.Element]
) -> tuple[str, list[str], dict[str, Any]]:
    """A critique (a TextArea on an answer, next to the prompt) or a demonstration."""
    targets_of_areas = {t for el in textareas for t in _targets(el)}
    answer_candidates = [
        t for t in targets_of_areas if t in texts and not _looks_like_prompt(texts[t])
    ]
    if not (answer_candidates and len(texts) >= 2):
        return "demonstration", [], {"answer_box": textareas[0].get("name")}
    rewrite = [el for el in textareas if _is_rewrite(el.get("name"))]
    feedback = [el for el in textareas if el not in rewrite]
    if not feedback:
        feedback, rewrite = textareas[:1], textareas[1:2]
    extra: dict[str, Any] = {"critique": feedback[0].get("name")}
    if rewrite:
        extra["refinement"] = rewrite[0].get("name")
    elif len(feedback) > 1:
        extra["refinement"] = feedback[1].get("name")
    return "critique", answer_candidates[:1], extra


def _choice_roles(
    choices: list[ET.Element], answer_tags: list[str], list_tag: str | None
) -> dict[str, Any]:
    """Choices that flag an answer ("biased", "unsafe"), and the first whose values name
    answers ("answer1", "answer2")."""
    roles: dict[str, Any] = {
        "flags": tuple(
            (el.get("name"), target)
            for el in choices
            for target in _targets(el)[:1]
            if target in answer_tags or target == list_tag
        )
    }
    for el in choices:
        values = {c.get("value"): c.get("value") for c in el.iter("Choice") if c.get("value")}
        mapped = {v: v for v in values if v in answer_tags}
        if len(mapped) >= 2:
            roles["choices"], roles["choice_values"] = el.get("name"), mapped
            break
    return roles


def _prompt_tag(texts: dict[str, ET.Element], answer_tags: list[str]) -> str:
    """The Text tag no answer control points at, preferring one that reads like a prompt."""
    candidates = [n for n in texts if n not in answer_tags]
    if not candidates:
        raise LabelConfigError(
            'the label config has no Text tag for the prompt: add <Text name="prompt" value="$prompt"/>'
        )
    return next((n for n in candidates if _looks_like_prompt(texts[n])), candidates[0])


def _looks_like_prompt(el: ET.Element) -> bool:
    text = f"{el.get('name', '')} {el.get('value', '')}".lower()
    return any(word in text for word in ("prompt", "question", "instruction", "query"))


def _is_rewrite(name: str | None) -> bool:
    return any(word in (name or "").lower() for word in _REWRITE_WORDS)


def _criterion(rating_name: str, answer_tag: str) -> str:
    """'helpfulness_answer1' rating answer1 -> 'helpfulness'; otherwise the name itself."""
    stripped = re.sub(rf"[_\-.]?{re.escape(answer_tag)}[_\-.]?", "", rating_name)
    stripped = re.sub(r"[_\-.]?\d+$", "", stripped)
    return stripped or rating_name
