"""Consensus with the other answers to a prompt, and the probe that keeps it only where it
ranks better."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset

from training.consensus import consensus
from training.registry import Registry
from training.reward import RewardModel, RewardTrainingConfig, pairwise_accuracy, train_reward
from training.reward_probe import FeatureCache


def test_consensus_ranks_answers_within_their_prompt_only():
    agree = torch.tensor([1.0, 0.0, 0.0])
    features = torch.stack(
        [
            agree,
            agree + torch.tensor([0.0, 0.1, 0.0]),
            agree + torch.tensor([0.0, 0.0, 0.1]),
            torch.tensor([0.0, 1.0, 0.0]),  # the odd one out
            torch.tensor([0.0, 0.0, 1.0]),  # a prompt with two answers
            torch.tensor([1.0, 1.0, 0.0]),
            torch.tensor([0.3, 0.3, 0.3]),  # a prompt with one
        ]
    )
    prompts = ["q"] * 4 + ["pair", "pair", "alone"]
    c = consensus(prompts, features)
    assert int(c[:4].argmin()) == 3 and float(c[:3].min()) > 0
    assert float(c[:4].sum()) == pytest.approx(0.0, abs=1e-6)  # centered within the prompt
    assert c[4:].tolist() == [0.0, 0.0, 0.0]  # two answers agree with each other equally
    # The order of the rows does not matter, only which prompt each belongs to.
    order = [6, 3, 0, 5, 1, 4, 2]
    assert torch.allclose(consensus([prompts[i] for i in order], features[order]), c[order])
    with pytest.raises(ValueError, match="3 prompts but 7 feature rows"):
        consensus(prompts[:3], features)


FACTS = [
    "the river flooded the valley in spring",
    "a doctor opened the new clinic downtown",
    "the album sold a million copies abroad",
    "an engineer measured the old bridge twice",
    "the garden closed after the long storm",
    "a teacher answered every question kindly",
]
OPENINGS = ["", "I think ", "In short, ", "Well, "]


def majority_pairs(n: int, seed: int) -> Dataset:
    """Four answers per prompt: three ways of saying one fact and one other fact, all from
    the same pool, so what an answer says cannot tell the better from the worse; that it
    agrees with the other answers to its prompt does. Each of the three beats the odd one."""
    rng = random.Random(seed)
    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        fact, other = rng.sample(FACTS, 2)
        prompt = f"What happened? ({i})"
        odd = rng.choice(OPENINGS) + other + "."
        for opening in rng.sample(OPENINGS, 3):
            rows["prompt"].append(prompt)
            rows["chosen"].append(opening + fact + ".")
            rows["rejected"].append(odd)
    return Dataset.from_dict(rows)


@pytest.mark.parametrize("offered", [True, False])
def test_the_probe_keeps_consensus_where_it_ranks_better(fit_tiny_probe, offered):
    held_out = majority_pairs(40, 1)
    result, probe = fit_tiny_probe(majority_pairs(120, 0), held_out, consensus=offered)
    m = result.metrics
    assert probe["consensus"] is offered and m["probe_consensus"] is offered
    assert {g["consensus"] for g in probe["grid"]} == ({False, True} if offered else {False})
    if offered:
        assert m["accuracy_after"] >= 0.9
    else:
        assert m["accuracy_after"] < 0.75
    served = RewardModel.load(result.version.path, dtype="float32")
    assert served.probe is not None and served.probe.consensus is offered
    # Scored together (each distinct answer once, every prompt's answers in one call), the
    # served version ranks as the fit did.
    assert pairwise_accuracy(served, held_out) == pytest.approx(m["accuracy_after"])
    # The cache keeps the backbone's columns only: consensus is computed anew on a warm
    # start, over the prompt's answers old and new.
    cache = FeatureCache.load(result.version.path, 64)
    assert cache is not None
    assert cache.features.shape[1] == served.probe.weight.shape[0] - int(offered)
    if offered:
        # Alone, an answer has no siblings to agree with: the odd one is no longer ranked
        # below the others by its consensus.
        pair = held_out[0]
        apart = [served.score([pair["prompt"]], [a])[0] for a in (pair["chosen"], pair["rejected"])]
        together = served.score([pair["prompt"]] * 4, [*held_out[:3]["chosen"], pair["rejected"]])
        assert together[0] > together[3]
        assert abs(apart[0] - apart[1]) < abs(together[0] - together[3])


def test_pairs_alone_do_not_try_consensus(fit_tiny_probe):
    """Two answers per prompt (a plain pairwise export): consensus would be 0 everywhere,
    so cross-validation does not spend fits on it."""
    one_pair_each = majority_pairs(60, 0).select(range(0, 180, 3))
    _, probe = fit_tiny_probe(one_pair_each, majority_pairs(20, 1))
    assert probe["consensus"] is False
    assert {g["consensus"] for g in probe["grid"]} == {False}


def test_a_warm_start_keeps_consensus_and_computes_it_over_old_and_new_answers(
    tmp_path, tiny_reward_backbone_dir
):
    from datasets import concatenate_datasets

    registry = Registry(tmp_path / "registry")
    backbone = str(tiny_reward_backbone_dir)
    old, held_out = majority_pairs(100, 0), majority_pairs(40, 1)
    config = RewardTrainingConfig(method="probe", max_length=64, dtype="float32")
    first = train_reward(old, held_out, registry, backbone, config)
    assert first.metrics["probe_consensus"] is True
    # New answers to the old prompts: one more way of saying each prompt's majority fact.
    new = Dataset.from_dict(
        {
            "prompt": old["prompt"][::3],
            "chosen": [c.replace(".", ", as I said.") for c in old["chosen"][::3]],
            "rejected": old["rejected"][::3],
        }
    )
    warm = RewardTrainingConfig(method="probe", max_length=64, dtype="float32", warm_start=True)
    second = train_reward(concatenate_datasets([old, new]), held_out, registry, backbone, warm)
    assert second.metrics["probe_consensus"] is True
    assert second.metrics["answers_read"] == len(new)  # only the new answers were read
    assert second.metrics["accuracy_after"] >= 0.9
