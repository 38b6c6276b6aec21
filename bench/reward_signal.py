"""Benchmark: how much of FineGrainedRLHF's judgments cheap signals explain, and a ceiling.

No backbone is read: each answer gets a few figures computed from text alone, and the
product's probe (`fit_probe`: Bradley-Terry logistic regression, L2 chosen by 5-fold
cross-validation over prompts) is fitted on the training questions (1-400) and scored on the
held-out ones (401-500), with a bootstrap interval over questions. The figures:

- `length`: log of the answer's word count ("the longer answer wins", fitted);
- `grounding`: the eight counts of training/grounding.py against the full passages;
- `word consensus`: the answer's mean word-unigram F1 with the other answers to its
  question, centered within the question (training/consensus.py does the same with the
  backbone's features);
- `gold`: word-unigram F1 with the human-written reference answer each record carries.
  No reward model has this; it is a ceiling: how far "agrees with a correct, complete
  answer" explains the judgments.

    .venv/bin/python bench/reward_signal.py
"""

from __future__ import annotations

import math
import platform
import re
from collections import Counter

import numpy as np
import torch

from training.finegrained import ANSWERS, PAIRS, finegrained_split, format_prompt, load_finegrained
from training.finegrained import DEFAULT_PATH as DATA
from training.grounding import answer_grounding
from training.reward_eval import evaluation_from_differences
from training.reward_probe import JudgedPairs, fit_probe

_WORD = re.compile(r"\w+")
ALL_PASSAGES = 10**6  # characters: format_prompt keeps every passage


def word_f1(a: str, b: str) -> float:
    ta, tb = Counter(_WORD.findall(a.lower())), Counter(_WORD.findall(b.lower()))
    common = sum((ta & tb).values())
    if not common:
        return 0.0
    precision, recall = common / sum(ta.values()), common / sum(tb.values())
    return 2 * precision * recall / (precision + recall)


def answer_figures(record: dict) -> dict[str, np.ndarray]:
    """[4, k] per signal for the record's four answers."""
    answers = [record[a] for a in ANSWERS]
    prompt = format_prompt(record, ALL_PASSAGES)
    agreement = np.array(
        [
            np.mean([word_f1(a, b) for j, b in enumerate(answers) if j != i])
            for i, a in enumerate(answers)
        ]
    )
    return {
        "length": np.array([[math.log1p(len(_WORD.findall(a)))] for a in answers]),
        "grounding": np.array([answer_grounding(prompt, a) for a in answers]),
        "word consensus": (agreement - agreement.mean())[:, None],
        "gold": np.array([[word_f1(a, record["gold"])] for a in answers]),
    }


def judged_pairs(records: list[dict], first_row: int) -> tuple[list[tuple[int, int]], list[str]]:
    """(chosen row, rejected row) per judged pair, rows numbered 4 per record from
    `first_row`, and each pair's question; "no preference" gives no pair."""
    pairs, questions = [], []
    for r, record in enumerate(records):
        for (a, b), judgment in zip(PAIRS, record["preference"], strict=True):
            if judgment:
                winner, loser = (a, b) if judgment == 1 else (b, a)
                pairs.append((first_row + 4 * r + winner, first_row + 4 * r + loser))
                questions.append(record["question"])
    return pairs, questions


def main() -> None:
    records = load_finegrained(DATA)
    train, held_out = finegrained_split(records)
    figures = [answer_figures(r) for r in records]
    train_pairs, train_questions = judged_pairs(train, 0)
    test_pairs, test_questions = judged_pairs(held_out, 4 * len(train))
    pairs = JudgedPairs(
        torch.tensor([c for c, _ in train_pairs]),
        torch.tensor([r for _, r in train_pairs]),
        torch.zeros(len(train_pairs)),
        torch.tensor([JudgedPairs.fold_of(q) for q in train_questions]),
    )
    words = [len(_WORD.findall(r[a])) for r in records for a in ANSWERS]
    print(
        f"FineGrainedRLHF qa-feedback: {len(train_pairs)} training pairs (questions 1-{len(train)}), "
        f"{len(test_pairs)} held-out pairs; {platform.machine()}, {torch.get_num_threads()} threads"
    )
    print("| signals | cross-validation (1-400) | held-out [95% interval] |\n|---|---|---|")
    for signals in (
        ["length"],
        ["grounding"],
        ["word consensus"],
        ["word consensus", "grounding"],
        ["gold"],
        ["gold", "word consensus", "grounding"],
    ):
        x = torch.tensor(
            np.concatenate([np.concatenate([f[s] for s in signals], 1) for f in figures]),
            dtype=torch.float32,
        )
        probe = fit_probe(x[None], [0], pairs)
        reward = probe(x).numpy()
        difference = np.array([reward[c] - reward[r] for c, r in test_pairs])
        evaluation = evaluation_from_differences(
            difference,
            test_questions,
            [words[c] for c, _ in test_pairs],
            [words[r] for _, r in test_pairs],
        )
        cross_validated = probe.selection["cross_validation_accuracy"]
        name = " + ".join(signals) + (" (ceiling)" if "gold" in signals else "")
        print(
            f"| {name} | {cross_validated:.3f} | {evaluation.accuracy:.3f} "
            f"[{evaluation.accuracy_low:.3f}, {evaluation.accuracy_high:.3f}] |"
        )


if __name__ == "__main__":
    main()
