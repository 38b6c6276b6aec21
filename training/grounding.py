"""Grounding features of an answer: how much of it its prompt supports, word for word.

A reward model's input is (prompt, answer). Where the prompt carries the material an
answer should rest on (retrieved passages, a document, a conversation), whether the
answer's phrases occur in it says much about the errors annotators mark: an unsupported
sentence is often an invented one, a repeated phrase a redundant one. A small backbone
cannot read a few thousand characters of passages and the answer together (MiniLM reads
512 tokens; the prompt is cut from the left), and mean-pooled features dilute the one
sentence that differs between two near-identical answers; counting is exact, free and
reads the whole prompt.

Measured on FineGrainedRLHF's training questions (docs/benchmarks.md): the share of an
answer's word 4-grams found in its passages alone ranks 0.59 of the judged pairs right
(the probe on MiniLM's features: 0.56 by cross-validation). The probe offers these features
to its cross-validation (training/reward_probe.py `fit_probe`), which keeps them only where
they lower the cross-validated loss, so a dataset whose prompts say nothing about the answers
(a chat with no context) loses nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import lru_cache

import torch

GROUNDING_FEATURES = (
    "log answer words",
    "answer sentences",
    "answer word 3-grams in the prompt",
    "answer word 4-grams in the prompt",
    "least supported sentence (its 3-grams in the prompt)",
    "sentences with under half their 3-grams in the prompt",
    "answer 3-grams repeated within the answer",
    "answer words in the prompt",
)
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _grams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _share(items: Sequence[object], present: set) -> float:
    return sum(item in present for item in items) / len(items) if items else 0.0


@lru_cache(maxsize=256)  # the answers of one prompt share its n-gram sets
def _prompt_index(prompt: str) -> tuple[set, set, set]:
    words = _words(prompt)
    return set(words), set(_grams(words, 3)), set(_grams(words, 4))


def answer_grounding(prompt: str, answer: str) -> list[float]:
    """The `GROUNDING_FEATURES` of one (prompt, answer), in that order."""
    unigrams, trigrams, fourgrams = _prompt_index(prompt)
    words = _words(answer)
    answer_trigrams = _grams(words, 3)
    sentences = [_words(s) for s in _SENTENCE_END.split(answer.strip()) if s]
    support = [_share(_grams(s, 3), trigrams) for s in sentences if len(s) >= 3]
    return [
        math.log1p(len(words)),
        float(len(sentences)),
        _share(answer_trigrams, trigrams),
        _share(_grams(words, 4), fourgrams),
        min(support, default=0.0),
        float(sum(s < 0.5 for s in support)),
        1.0 - len(set(answer_trigrams)) / len(answer_trigrams) if answer_trigrams else 0.0,
        _share(words, unigrams),
    ]


def grounding_features(prompts: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """[answers, len(GROUNDING_FEATURES)] float32, one row per (prompt, answer)."""
    rows = [answer_grounding(p, a) for p, a in zip(prompts, answers, strict=True)]
    return torch.tensor(rows, dtype=torch.float32).reshape(len(rows), len(GROUNDING_FEATURES))
