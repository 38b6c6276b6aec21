"""Records -> TRL datasets: pair counts, majority rule, margins, prompt-level splits."""

from __future__ import annotations

from math import comb

import pytest

from training.datasets import critique_dataset, preference_dataset, sft_dataset, split_by_prompt
from training.feedback import Comparison, Critique, Demonstration, Flag, Ranking, Rating, Source


def src(annotation, task=1, user=1):
    return Source(task, annotation, user)


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_a_ranking_of_k_gives_every_ordered_pair(k):
    answers = tuple(f"answer {i}" for i in range(k))
    ds = preference_dataset([Ranking("Q", answers, (), src(1))])
    assert len(ds) == comb(k, 2)
    position = {a: i for i, a in enumerate(answers)}
    assert all(position[c] < position[r] for c, r in zip(ds["chosen"], ds["rejected"], strict=True))


def test_majority_wins_with_agreement_and_even_splits_are_dropped():
    records = [
        Comparison("Q", ("A", "B"), 0, src(1, user=1)),
        Comparison("Q", ("B", "A"), 1, src(2, user=2)),  # same preference, answers swapped
        Comparison("Q", ("A", "B"), 1, src(3, user=3)),
        Comparison("P", ("C", "D"), 0, src(4, user=1)),
        Comparison("P", ("C", "D"), 1, src(5, user=2)),  # contradiction 1:1
        Comparison("R", ("E", "F"), None, src(6)),  # a tie is no pair
    ]
    ds = preference_dataset(records)
    assert ds.to_list() == [
        {
            "prompt": "Q",
            "chosen": "A",
            "rejected": "B",
            "margin": 0.0,
            "agreement": pytest.approx(2 / 3),
            "votes": 3,
        }
    ]


def test_ratings_give_pairs_with_margins_and_flags_give_rejections():
    records = [
        Rating("Q", "A", "helpfulness", 5, 5, src(1)),
        Rating("Q", "A", "truthfulness", 3, 5, src(1)),
        Rating("Q", "B", "helpfulness", 2, 5, src(1)),
        Rating("Q", "B", "truthfulness", 2, 5, src(1)),
        Rating("Q", "C", "helpfulness", 2, 5, src(1)),
        Rating("Q", "C", "truthfulness", 2, 5, src(1)),
        Flag("Q", "C", "biased", src(1)),
    ]
    rows = {
        (r["chosen"], r["rejected"]): r["margin"] for r in preference_dataset(records).to_list()
    }
    assert rows[("A", "B")] == pytest.approx((4 - 2) / 5)
    # A beats C twice (ratings, and C's flag): the winners' mean margin.
    assert rows[("A", "C")] == pytest.approx(((4 - 2) / 5 + 0.0) / 2)
    # B and C rate the same, but C is flagged biased: B wins.
    assert ("B", "C") in rows


def test_sft_and_critique_datasets():
    records = [
        Demonstration("Q", "fixed", "draft", src(1)),
        Demonstration("Q", "fixed", "draft", src(2)),  # duplicate
        Critique("Q", "answer", "too vague", "better answer", src(3)),
        Critique("Q", None, "comparison note", None, src(4)),  # not about one answer
    ]
    assert sft_dataset(records).to_list() == [{"prompt": "Q", "completion": "fixed"}]
    assert critique_dataset(records).to_list() == [
        {
            "prompt": "Q",
            "completion": "answer",
            "feedback": "too vague",
            "refinement": "better answer",
        }
    ]


def test_split_never_puts_a_prompt_on_both_sides():
    answers = tuple("abcd")
    records = [Ranking(f"prompt {i}", answers, (), src(i, task=i)) for i in range(200)]
    split = split_by_prompt(preference_dataset(records), test_fraction=0.25, seed=3)
    train, test = set(split["train"]["prompt"]), set(split["test"]["prompt"])
    assert not train & test and len(train) + len(test) == 200
    assert 30 <= len(test) <= 70
    assert (
        split_by_prompt(preference_dataset(records), 0.25, seed=3)["test"]["prompt"]
        == split["test"]["prompt"]
    )
