"""Feedback records -> `datasets.Dataset` in TRL's column formats.

* `preference_dataset`: `prompt`/`chosen`/`rejected` plus `margin`, `agreement`, `votes`
  (RewardTrainer and DPOTrainer read the first three; RewardTrainer uses `margin`).
* `sft_dataset`: `prompt`/`completion` (SFTTrainer's prompt-completion format).
* `critique_dataset`: `prompt`/`completion`/`feedback`/`refinement` (learning from
  language feedback).

How preference votes become pairs:

1. Every record votes on ordered pairs of answers to one prompt: a Comparison gives one
   vote; a Ranking of K answers gives K(K-1)/2 (each answer beats every answer below
   it); Ratings of one annotation give a vote for each two answers whose mean rating over
   the criteria differs, with margin = difference / max rating; a Flag ("biased",
   "unsafe") makes the flagged answer lose to every unflagged answer the same annotation
   saw. Ties and "no preference" give no vote.
2. Votes are pooled per unordered (prompt, answer, answer) across annotators. The side
   with more votes wins; an even split is dropped as a contradiction. `votes` counts all
   votes, `agreement` is the winning share (1.0 = unanimous), `margin` is the winners'
   mean margin.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from itertools import combinations
from typing import Any

from datasets import Dataset, DatasetDict

from training.feedback import Comparison, Critique, Demonstration, Flag, Ranking, Rating, Record

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "margin", "agreement", "votes")


def preference_votes(records: Iterable[Record]) -> list[tuple[str, str, str, float]]:
    """(prompt, winner, loser, margin) for every vote the records cast."""
    votes: list[tuple[str, str, str, float]] = []
    ratings: dict[tuple, list[Rating]] = defaultdict(list)
    flags: dict[tuple, set[str]] = defaultdict(set)
    seen_answers: dict[tuple, set[str]] = defaultdict(set)
    for record in records:
        key = (record.source.task_id, record.source.annotation_id, record.prompt)
        if isinstance(record, Comparison):
            seen_answers[key].update(record.answers)
            if record.preferred is not None and record.answers[0] != record.answers[1]:
                winner = record.answers[record.preferred]
                votes.append((record.prompt, winner, record.answers[1 - record.preferred], 0.0))
        elif isinstance(record, Ranking):
            seen_answers[key].update(record.answers)
            for better, worse in combinations(record.answers, 2):
                if better != worse:
                    votes.append((record.prompt, better, worse, 0.0))
        elif isinstance(record, Rating):
            ratings[key].append(record)
            seen_answers[key].add(record.answer)
        elif isinstance(record, Flag):
            flags[key].add(record.answer)
    for key, group in ratings.items():
        means: dict[str, list[float]] = defaultdict(list)
        top = max(r.max_value for r in group)
        for r in group:
            means[r.answer].append(r.value)
        averaged = {a: sum(v) / len(v) for a, v in means.items()}
        for a, b in combinations(averaged, 2):
            if averaged[a] != averaged[b]:
                win, lose = (a, b) if averaged[a] > averaged[b] else (b, a)
                votes.append((key[2], win, lose, abs(averaged[a] - averaged[b]) / top))
    for key, flagged in flags.items():
        for bad in flagged:
            for good in seen_answers[key] - flagged:
                votes.append((key[2], good, bad, 0.0))
    return votes


def preference_dataset(records: Iterable[Record]) -> Dataset:
    """Majority-voted preference pairs; see the module docstring for the rule."""
    pooled: dict[tuple[str, str, str], list[tuple[str, float]]] = defaultdict(list)
    for prompt, winner, loser, margin in preference_votes(records):
        a, b = sorted((winner, loser))
        pooled[(prompt, a, b)].append((winner, margin))
    rows: dict[str, list[Any]] = {c: [] for c in PREFERENCE_COLUMNS}
    for (prompt, a, b), votes in pooled.items():
        for_a = [m for w, m in votes if w == a]
        for_b = [m for w, m in votes if w == b]
        if len(for_a) == len(for_b):
            continue  # an even split is a contradiction, not a preference
        chosen, rejected, margins = (a, b, for_a) if len(for_a) > len(for_b) else (b, a, for_b)
        rows["prompt"].append(prompt)
        rows["chosen"].append(chosen)
        rows["rejected"].append(rejected)
        rows["margin"].append(sum(margins) / len(margins))
        rows["agreement"].append(len(margins) / len(votes))
        rows["votes"].append(len(votes))
    return Dataset.from_dict(rows)


def sft_dataset(records: Iterable[Record]) -> Dataset:
    """Demonstrations and corrections as prompt/completion."""
    rows: dict[str, list] = {"prompt": [], "completion": []}
    seen = set()
    for record in records:
        if isinstance(record, Demonstration) and record.completion.strip():
            pair = (record.prompt, record.completion.strip())
            if pair not in seen:
                seen.add(pair)
                rows["prompt"].append(pair[0])
                rows["completion"].append(pair[1])
    return Dataset.from_dict(rows)


def critique_dataset(records: Iterable[Record]) -> Dataset:
    """Language feedback: the answer (completion), the critique, and a rewrite if given."""
    rows: dict[str, list] = {"prompt": [], "completion": [], "feedback": [], "refinement": []}
    for record in records:
        if isinstance(record, Critique) and record.answer is not None and record.feedback.strip():
            rows["prompt"].append(record.prompt)
            rows["completion"].append(record.answer)
            rows["feedback"].append(record.feedback.strip())
            rows["refinement"].append(record.refinement or "")
    return Dataset.from_dict(rows)


# The share of prompts a training run holds out to judge its version, and the fewest pairs
# worth training on: one rule for `ls-rlhf train reward` and the loop's jobs.
HELD_OUT_FRACTION = 0.2
MIN_PAIRS = 8


def split_by_prompt(
    dataset: Dataset, test_fraction: float = HELD_OUT_FRACTION, seed: int = 0
) -> DatasetDict:
    """Train/test by a hash of the prompt, so no prompt is on both sides."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), not {test_fraction}")

    def in_test(prompt: str) -> bool:
        digest = hashlib.sha256(f"{seed}\x00{prompt}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < test_fraction

    flags = [in_test(p) for p in dataset["prompt"]]
    test_rows = [i for i, f in enumerate(flags) if f]
    train_rows = [i for i, f in enumerate(flags) if not f]
    return DatasetDict(train=dataset.select(train_rows), test=dataset.select(test_rows))
