"""Grounding features, and the probe that keeps them only where they rank better."""

from __future__ import annotations

import random

import pytest
from datasets import Dataset

from training.grounding import GROUNDING_FEATURES, answer_grounding, grounding_features
from training.registry import Registry
from training.reward import RewardModel, RewardTrainingConfig, pairwise_accuracy, train_reward
from training.reward_probe import FeatureCache

PROMPT = (
    "Passages:\nEiffel Tower: The tower is on the Champ de Mars in Paris. It was built in 1889."
    "\n\nQuestion: Where is the Eiffel Tower?"
)


def feature(values: list[float], name: str) -> float:
    return values[GROUNDING_FEATURES.index(name)]


def test_grounding_counts_what_the_prompt_supports():
    copied = answer_grounding(PROMPT, "The tower is on the Champ de Mars in Paris.")
    invented = answer_grounding(PROMPT, "Visitors climb seven hundred steps to reach a cafe.")
    mixed = answer_grounding(PROMPT, "It was built in 1889. Visitors climb seven hundred steps.")
    assert feature(copied, "answer word 4-grams in the prompt") == 1.0
    assert feature(invented, "answer word 4-grams in the prompt") == 0.0
    assert feature(copied, "sentences with under half their 3-grams in the prompt") == 0.0
    assert feature(mixed, "sentences with under half their 3-grams in the prompt") == 1.0
    assert feature(mixed, "answer sentences") == 2.0
    assert feature(mixed, "least supported sentence (its 3-grams in the prompt)") == 0.0
    assert feature(copied, "answer 3-grams repeated within the answer") == 0.0
    repeated = answer_grounding(PROMPT, "it is big, it is big, it is big")
    assert feature(repeated, "answer 3-grams repeated within the answer") > 0.5
    # Case and punctuation do not matter; an empty answer has features, not an error.
    assert answer_grounding(PROMPT.upper(), "the TOWER is on the champ de mars!") == (
        answer_grounding(PROMPT, "The tower is on the Champ de Mars!")
    )
    assert grounding_features([PROMPT, PROMPT], ["", "x"]).shape == (2, len(GROUNDING_FEATURES))


def grounded_pairs(n: int, seed: int) -> Dataset:
    """Each prompt carries two facts; the better answer repeats one of them, the worse one a
    fact from another prompt. Both come from the same pool of sentences, so what an answer
    says cannot tell them apart, only whether its prompt supports it."""
    rng = random.Random(seed)
    subjects = ["the river", "a doctor", "the city", "an engineer", "the album", "a teacher"]
    verbs = ["opened", "visited", "described", "replaced", "measured", "answered"]
    objects = ["the bridge", "a novel", "the station", "a song", "the garden", "a question"]

    def fact() -> str:
        year = rng.randint(1800, 2020)
        return f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)} in {year}."

    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        own, other = [fact(), fact()], fact()
        rows["prompt"].append(f"Passages:\n{' '.join(own)}\n\nQuestion: what happened? ({i})")
        rows["chosen"].append(rng.choice(own))
        rows["rejected"].append(other)
    return Dataset.from_dict(rows)


@pytest.mark.parametrize("grounding", [True, False])
def test_the_probe_keeps_grounding_where_it_ranks_better(fit_tiny_probe, grounding):
    held_out = grounded_pairs(60, 1)
    result, probe = fit_tiny_probe(grounded_pairs(160, 0), held_out, grounding=grounding)
    m = result.metrics
    assert probe["grounding"] is grounding and m["probe_grounding"] is grounding
    if grounding:
        # Cross-validation tried every layer with and without them, and kept them.
        assert {g["grounding"] for g in probe["grid"]} == {False, True}
        assert m["accuracy_after"] >= 0.9
    else:
        assert {g["grounding"] for g in probe["grid"]} == {False}
        assert m["accuracy_after"] < 0.8
    # The served version computes the same features from (prompt, answer) when it scores.
    served = RewardModel.load(result.version.path, dtype="float32")
    assert served.probe is not None and served.probe.grounding is grounding
    assert pairwise_accuracy(served, held_out) == pytest.approx(m["accuracy_after"])
    # The kept features are the columns the probe weighs, for a warm start to reuse.
    cache = FeatureCache.load(result.version.path, 64)
    assert cache is not None and cache.features.shape[1] == served.probe.weight.shape[0]


def test_a_warm_start_keeps_its_parents_grounding_and_reads_only_new_answers(
    tmp_path, tiny_reward_backbone_dir
):
    from datasets import concatenate_datasets

    registry = Registry(tmp_path / "registry")
    backbone = str(tiny_reward_backbone_dir)
    old, new, held_out = grounded_pairs(120, 0), grounded_pairs(40, 2), grounded_pairs(60, 1)
    grounded = RewardTrainingConfig(method="probe", max_length=64, dtype="float32", grounding=True)
    first = train_reward(old, held_out, registry, backbone, grounded)
    assert first.metrics["probe_grounding"] is True
    warm = RewardTrainingConfig(
        method="probe", max_length=64, dtype="float32", grounding=True, warm_start=True
    )
    both = concatenate_datasets([old, new])
    second = train_reward(both, held_out, registry, backbone, warm)
    assert second.metrics["probe_grounding"] is True
    assert second.metrics["answers_read"] == 2 * len(new)  # the parent's features were kept
    assert second.metrics["accuracy_after"] >= 0.9
    # A warm start keeps its parent's choice, as it keeps its layer (the loop's retrains
    # do not know what the first version was trained with).
    plain = RewardTrainingConfig(method="probe", max_length=64, dtype="float32", warm_start=True)
    third = train_reward(both, held_out, registry, backbone, plain)
    assert third.metrics["answers_read"] == 0 and third.metrics["probe_grounding"] is True
