"""Real human preferences (FineGrainedRLHF) through the real export parser."""

from __future__ import annotations

import json

import label_configs
from training.datasets import critique_dataset, preference_dataset, sft_dataset
from training.feedback import parse_export
from training.finegrained import (
    finegrained_split,
    format_prompt,
    load_finegrained,
    ranking_order,
    to_export,
    to_label_studio_tasks,
)


def test_ranking_order_from_six_judgments():
    # pairs (1,2) (1,3) (1,4) (2,3) (2,4) (3,4): answer 3 beats everyone, 1 beats 2 and 4.
    assert ranking_order([1, 2, 1, 2, 0, 1]) == [2, 0, 1, 3]
    assert ranking_order([0] * 6) is None


def test_every_kind_parses_with_counts_matching_the_raw_data(finegrained_path):
    records = load_finegrained(finegrained_path)
    raw = json.loads(finegrained_path.read_text())
    judged = sum(1 for r in raw for p in r["preference"] if p)
    all_zero = sum(1 for r in raw if not any(r["preference"]))

    pairwise = parse_export(
        to_export(to_label_studio_tasks(records, "pairwise")), label_configs.load("pairwise")
    )
    assert not pairwise.problems and len(pairwise.records) == judged
    ranking = parse_export(
        to_export(to_label_studio_tasks(records, "ranking")), label_configs.load("ranking")
    )
    assert not ranking.problems and len(ranking.records) == len(raw) - all_zero == 488
    pairs = preference_dataset(ranking.records)
    assert len(pairs) <= 6 * 488 and len(set(pairs["prompt"])) == 488

    demos = parse_export(
        to_export(to_label_studio_tasks(records, "demonstration")),
        label_configs.load("demonstration"),
    )
    sft = sft_dataset(demos.records)
    assert len(sft) > 400 and all(d.original for d in demos.records)
    critiques = parse_export(
        to_export(to_label_studio_tasks(records, "critique")), label_configs.load("critique")
    )
    feedback = critique_dataset(critiques.records)
    assert len(feedback) > 400 and all(f for f in feedback["feedback"])


def test_pairwise_pairs_agree_with_the_human_choice(finegrained_path):
    records = load_finegrained(finegrained_path)[:20]
    pairs = preference_dataset(
        parse_export(
            to_export(to_label_studio_tasks(records, "pairwise")), label_configs.load("pairwise")
        ).records
    )
    first = records[0]
    for (i, j), p in zip(
        [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)], first["preference"], strict=True
    ):
        if p and first[f"prediction {i}"] != first[f"prediction {j}"]:
            winner, loser = (i, j) if p == 1 else (j, i)
            assert any(
                c == first[f"prediction {winner}"] and r == first[f"prediction {loser}"]
                for c, r in zip(pairs["chosen"], pairs["rejected"], strict=True)
            )


def test_fixed_split_is_first_400_then_100(finegrained_path):
    train, test = finegrained_split(load_finegrained(finegrained_path))
    assert (
        len(train) == 400
        and len(test) == 100
        and not {r["question"] for r in train} & {r["question"] for r in test}
    )


def test_prompt_with_passages_puts_every_sentence_first_and_the_question_last(finegrained_path):
    record = load_finegrained(finegrained_path)[0]
    assert format_prompt(record) == record["question"]
    full = format_prompt(record, passage_chars=100_000)
    assert full.startswith("Passages:\n") and full.endswith(f"Question: {record['question']}")
    last_sentence = " ".join(record["passages"][-1][-1].split())
    assert last_sentence in full  # every sentence of every passage, not only the first
    cut = format_prompt(record, passage_chars=300)
    passages = cut.split("\n\nQuestion:")[0].removeprefix("Passages:\n")
    assert len(passages) <= 300 + len(" ...") and passages.endswith(" ...")
    assert cut.endswith(f"Question: {record['question']}")
