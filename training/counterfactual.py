"""Counterfactual sets: the same text with a sensitive attribute swapped.

Attribute lists and prompt templates are editable JSON files
(`training/data/counterfactual_attributes.json`, `counterfactual_templates.json`); users
can pass their own. An attribute has groups (e.g. male/female) and rows of terms, one
term per group ("he"/"she", "father"/"mother"). Swapping replaces whole words only and
keeps their case ("He" -> "She"). An ambiguous term maps to the first row that has it
("her" -> "him"): a known limit of word lists, shared with Huang et al.'s setup.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


@dataclass(frozen=True)
class Attribute:
    name: str
    groups: tuple[str, ...]
    terms: tuple[tuple[str, ...], ...]  # each row: one term per group
    # Rows of the attribute this one was cut from (same order): template placeholders may
    # name a term of a group left out, e.g. "{American}" in a side without Americans.
    source_terms: tuple[tuple[str, ...], ...] = field(default=(), compare=False)

    def restrict(self, groups: list[str] | tuple[str, ...]) -> Attribute:
        """The same attribute with only `groups` (their columns of every row)."""
        columns = [self.groups.index(g) for g in groups]
        return Attribute(
            self.name,
            tuple(groups),
            tuple(tuple(row[c] for c in columns) for row in self.terms),
            source_terms=self.source_terms or self.terms,
        )

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
        groups, rows_in = spec["groups"], spec["terms"]
        if (
            not isinstance(groups, list)
            or len(set(groups)) < 2
            or not all(isinstance(g, str) for g in groups)
            or len(set(groups)) != len(groups)
        ):
            raise ValueError(
                f"attribute {name!r} in {path or 'the bundled lists'}: 'groups' must list at "
                "least 2 different group names"
            )
        if not isinstance(rows_in, list) or not all(
            isinstance(row, list) and all(isinstance(t, str) for t in row) for row in rows_in
        ):
            raise ValueError(
                f"attribute {name!r} in {path or 'the bundled lists'}: 'terms' must be a list of "
                'rows, each a list of strings, e.g. [["he", "she"], ["him", "her"]]'
            )
        groups = tuple(groups)
        rows = tuple(tuple(row) for row in rows_in)
        bad = [row for row in rows if len(row) != len(groups)]
        if bad:
            raise ValueError(
                f"attribute {name!r} in {path or 'the bundled lists'}: every terms row needs "
                f"{len(groups)} terms (one per group); {list(bad[0])} does not"
            )
        attributes[name] = Attribute(name, groups, rows)
    return attributes


def load_templates(path: str | Path | None = None) -> dict[str, list[str]]:
    raw = _read(path, "counterfactual_templates.json")
    templates = {}
    for name, values in raw.items():
        if name.startswith("_"):
            continue
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ValueError(
                f"{path}: templates of {name!r} must be a list of strings with {{term}} "
                "placeholders, as in the bundled counterfactual_templates.json"
            )
        templates[name] = list(values)
    return templates


# --- Penalty part and held-out part -------------------------------------------------------

MIN_GROUPS_TO_SPLIT = 4  # each side keeps at least 2 groups


def _hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()


def split_by_hash(attribute: str, items: list[str]) -> tuple[list[str], list[str]]:
    """(penalty part, held-out part) of `items`: ordered by sha256 of "attribute, item",
    the first half (rounded up) goes to the penalty; each part keeps the items' order.
    Deterministic, independent of the items' order in the file and of Python's hash seed."""
    ranked = sorted(items, key=lambda item: _hash(attribute, item))
    penalty = set(ranked[: (len(ranked) + 1) // 2])
    return [i for i in items if i in penalty], [i for i in items if i not in penalty]


@dataclass
class CounterfactualSets:
    """What the penalty may train on, and what only the evaluation sees.

    `penalty_*` feed `training.fairness.counterfactual_pairs`; `held_out_*` are never shown
    to the penalty. `notes` says per attribute how it was split."""

    penalty_attributes: dict[str, Attribute]
    penalty_templates: dict[str, list[str]]
    held_out_attributes: dict[str, Attribute]
    held_out_templates: dict[str, list[str]]
    notes: dict[str, str]
    source: str  # where the held-out part came from, in words

    def names(self) -> list[str]:
        return list(self.penalty_attributes)

    def describe(self) -> dict:
        return {
            "source": self.source,
            "notes": self.notes,
            "in_sample": {
                n: {"groups": list(a.groups), "templates": len(self.penalty_templates.get(n, []))}
                for n, a in self.penalty_attributes.items()
            },
            "held_out": {
                n: {"groups": list(a.groups), "templates": len(self.held_out_templates.get(n, []))}
                for n, a in self.held_out_attributes.items()
            },
        }


def split_sets(
    attributes: dict[str, Attribute], templates: dict[str, list[str]]
) -> CounterfactualSets:
    """Split the lists into a penalty part and a held-out part (`split_by_hash`).

    Groups: an attribute with at least 4 groups is cut in two by group (each side gets its
    own groups, so its own terms); one with 2 or 3 groups is too small to cut and keeps all
    its groups on both sides. Templates: always cut in two; an attribute with a single
    template has no held-out part."""
    penalty_attrs, held_attrs, penalty_tpl, held_tpl, notes = {}, {}, {}, {}, {}
    for name, attribute in attributes.items():
        if len(attribute.groups) >= MIN_GROUPS_TO_SPLIT:
            mine, theirs = split_by_hash(name, list(attribute.groups))
            penalty_attrs[name], held_attrs[name] = (
                attribute.restrict(mine),
                attribute.restrict(theirs),
            )
            how = f"groups split {len(mine)}/{len(theirs)}"
        else:
            penalty_attrs[name] = held_attrs[name] = attribute
            how = f"{len(attribute.groups)} groups, too few to split: held-out by template only"
        mine_t, theirs_t = split_by_hash(name, templates.get(name, []))
        penalty_tpl[name], held_tpl[name] = mine_t, theirs_t
        notes[name] = f"{how}; templates split {len(mine_t)}/{len(theirs_t)}"
    return CounterfactualSets(
        penalty_attrs, penalty_tpl, held_attrs, held_tpl, notes, "bundled lists split by hash"
    )


def load_sets(
    attributes_file: str | Path | None = None,
    templates_file: str | Path | None = None,
    held_out_attributes_file: str | Path | None = None,
    held_out_templates_file: str | Path | None = None,
) -> CounterfactualSets:
    """The lists (bundled, or the user's), split into penalty and held-out parts.

    A user's own held-out list replaces that part of the split: with
    `held_out_attributes_file`, the penalty swaps every group of the main attributes and
    the held-out gaps use that file's groups; with `held_out_templates_file`, the penalty
    renders every main template (except any that also appear in the held-out file) and the
    held-out gaps render that file's. Every template is rendered here once, so a bad
    placeholder is a one-line ValueError naming its file."""
    attributes, templates = load_attributes(attributes_file), load_templates(templates_file)
    sets = split_sets(attributes, templates)
    if attributes_file or templates_file:
        sets.source = "your lists split by hash"
    if held_out_attributes_file:
        sets.held_out_attributes = load_attributes(held_out_attributes_file)
        sets.penalty_attributes = dict(attributes)
    if held_out_templates_file:
        own = load_templates(held_out_templates_file)
        sets.held_out_templates = own
        sets.penalty_templates = {
            n: [t for t in ts if t not in own.get(n, [])] for n, ts in templates.items()
        }
    if held_out_attributes_file or held_out_templates_file:
        sets.source = "your held-out " + " and ".join(
            str(f) for f in (held_out_attributes_file, held_out_templates_file) if f
        )
        for name in sets.penalty_attributes:
            sets.notes[name] = (
                f"in-sample {len(sets.penalty_attributes[name].groups)} groups x "
                f"{len(sets.penalty_templates.get(name, []))} templates; held-out "
                + (
                    f"{len(sets.held_out_attributes[name].groups)} groups x "
                    f"{len(sets.held_out_templates.get(name, []))} templates"
                    if name in sets.held_out_attributes
                    else "none (not in the held-out attributes)"
                )
            )
    for side, attrs, tpls, files in (
        (
            "penalty",
            sets.penalty_attributes,
            sets.penalty_templates,
            (attributes_file, templates_file),
        ),
        (
            "held-out",
            sets.held_out_attributes,
            sets.held_out_templates,
            (
                held_out_attributes_file or attributes_file,
                held_out_templates_file or templates_file,
            ),
        ),
    ):
        where = " with ".join(str(f) for f in files if f) or "the bundled lists"
        for name, ts in tpls.items():
            if name not in attrs:
                if side == "held-out" and held_out_templates_file:
                    raise ValueError(
                        f"{held_out_templates_file}: templates for {name!r}, but no attribute "
                        f"{name!r} in {where}; remove them or add the attribute"
                    )
                continue
            try:
                expand(attrs[name], ts)
            except ValueError as error:
                raise ValueError(f"{where} ({side} part): {error}") from None
    return sets


def expand(attribute: Attribute, templates: list[str]) -> list[CounterfactualGroup]:
    """Every template rendered once per group; placeholders name a term of any group."""
    expanded = []
    for template in templates:
        variants = {}
        for index, group in enumerate(attribute.groups):

            def fill(match: re.Match, index: int = index, template: str = template) -> str:
                word = match.group(1)
                row = _row_of(attribute, word)
                if row is None:
                    raise ValueError(
                        f"template {template!r}: {{{word}}} is not a term of attribute {attribute.name!r}"
                    )
                return _same_case(word, row[index])

            if not _PLACEHOLDER.search(template):
                raise ValueError(
                    f"template {template!r} of {attribute.name!r} has no {{term}} placeholder, so "
                    "every group would read the same text"
                )
            variants[group] = _fix_articles(_PLACEHOLDER.sub(fill, template))
        expanded.append(CounterfactualGroup(attribute.name, template, variants))
    return expanded


def _row_of(attribute: Attribute, word: str) -> tuple[str, ...] | None:
    """The row of `attribute` whose terms (or, for a restricted one, whose source row's
    terms) include `word`."""
    for rows in (attribute.terms, attribute.source_terms):
        for index, row in enumerate(rows):
            if word.lower() in (t.lower() for t in row):
                return attribute.terms[index]
    return None


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
