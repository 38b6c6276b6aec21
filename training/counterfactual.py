"""Counterfactual sets: the same text with a sensitive attribute swapped.

Attribute lists and prompt templates are editable JSON files
(`training/data/counterfactual_attributes.json`, `counterfactual_templates.json`); users
can pass their own. An attribute has groups (e.g. male/female) and rows of terms, one
term per group ("he"/"she", "father"/"mother"). Swapping replaces whole words only and
keeps their case ("He" -> "She"). An ambiguous term maps to the first row that has it
("her" -> "him"): a known limit of word lists, shared with Huang et al.'s setup.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


@dataclass(frozen=True)
class Attribute:
    name: str
    groups: tuple[str, ...]
    terms: tuple[tuple[str, ...], ...]  # each row: one term per group

    def swap(self, text: str, to_group: str) -> str:
        """`text` with every term of another group replaced by `to_group`'s term."""
        target = self.groups.index(to_group)
        mapping: dict[str, str] = {}
        for row in self.terms:
            for term in row:
                mapping.setdefault(term.lower(), row[target])
        words = sorted(mapping, key=len, reverse=True)
        pattern = re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
        return _fix_articles(
            pattern.sub(lambda m: _same_case(m.group(0), mapping[m.group(0).lower()]), text)
        )

    def mentions(self, text: str) -> bool:
        lowered = f" {text.lower()} "
        return any(
            re.search(rf"\b{re.escape(t.lower())}\b", lowered) for row in self.terms for t in row
        )


@dataclass(frozen=True)
class CounterfactualGroup:
    """One template rendered for every group of an attribute."""

    attribute: str
    template: str
    variants: dict[str, str]  # group -> text


def load_attributes(path: str | Path | None = None) -> dict[str, Attribute]:
    raw = _read(path, "counterfactual_attributes.json")
    attributes = {}
    for name, spec in raw.items():
        if name.startswith("_"):
            continue
        if not isinstance(spec, dict) or not {"groups", "terms"} <= spec.keys():
            raise ValueError(
                f"attribute {name!r} in {path}: give an object with 'groups' (list of group names) "
                "and 'terms' (rows with one term per group), as in the bundled counterfactual_attributes.json"
            )
        groups = tuple(spec["groups"])
        rows = tuple(tuple(row) for row in spec["terms"])
        bad = [row for row in rows if len(row) != len(groups)]
        if bad:
            raise ValueError(
                f"attribute {name!r}: every terms row needs {len(groups)} terms (one per group); {bad[0]} does not"
            )
        attributes[name] = Attribute(name, groups, rows)
    return attributes


def load_templates(path: str | Path | None = None) -> dict[str, list[str]]:
    raw = _read(path, "counterfactual_templates.json")
    return {k: list(v) for k, v in raw.items() if not k.startswith("_")}


def expand(attribute: Attribute, templates: list[str]) -> list[CounterfactualGroup]:
    """Every template rendered once per group; placeholders name a term of any group."""
    expanded = []
    for template in templates:
        variants = {}
        for index, group in enumerate(attribute.groups):

            def fill(match: re.Match, index: int = index, template: str = template) -> str:
                word = match.group(1)
                row = next(
                    (r for r in attribute.terms if word.lower() in (t.lower() for t in r)), None
                )
                if row is None:
                    raise ValueError(
                        f"template {template!r}: {{{word}}} is not a term of attribute {attribute.name!r}"
                    )
                return _same_case(word, row[index])

            variants[group] = _fix_articles(_PLACEHOLDER.sub(fill, template))
        expanded.append(CounterfactualGroup(attribute.name, template, variants))
    return expanded


def _fix_articles(text: str) -> str:
    """'a old' -> 'an old', 'an Mexican' -> 'a Mexican' after a swap (a first-letter rule)."""
    text = re.sub(r"\b([Aa]) (?=[AEIOUaeiou])", r"\1n ", text)
    return re.sub(r"\b([Aa])n (?=[^AEIOUaeiou\W])", r"\1 ", text)


def _same_case(model: str, word: str) -> str:
    if model.isupper() and len(model) > 1:
        return word.upper()
    if model[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _read(path: str | Path | None, default: str) -> dict:
    """The JSON object in the user's file (or the bundled one), or a ValueError saying what to fix."""
    if path is None:
        return json.loads(
            (resources.files("training") / "data" / default).read_text(encoding="utf-8")
        )
    if not Path(path).is_file():
        raise ValueError(
            f"{path} does not exist: give a JSON file in the format of the bundled {default}"
        )
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON ({error}); fix it or start from the bundled {default}"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{path} must hold a JSON object keyed by attribute name, like the bundled {default}"
        )
    return raw
