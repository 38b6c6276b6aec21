"""Counterfactual sets, Wasserstein-1, gap reports, and the penalty against a planted bias."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from markdown_tables import inline_html, rows_outside_tables, tables

from ml_backend.cli import main as cli
from training.counterfactual import Attribute, expand, load_attributes, load_templates
from training.fairness import (
    CounterfactualPenalty,
    counterfactual_pairs,
    gaps,
    reward_gap,
    template_gap,
    vader_scorer,
    wasserstein1,
)
from training.models import load_tokenizer
from training.registry import Registry
from training.reward import RewardModel, RewardTrainingConfig, pairwise_accuracy, train_reward


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0.0, 1.0], [0.0, 1.0], 0.0),
        ([0.0], [1.0], 1.0),
        ([1.0, 2.0, 3.0], [2.0, 3.0, 4.0], 1.0),  # a shift by 1
        ([0.0, 0.0, 1.0], [1.0, 1.0], 2 / 3),  # CDFs differ by 2/3 on [0, 1)
        ([0.0, 2.0], [1.0], 1.0),  # |0-1|/2 + |2-1|/2
    ],
)
def test_wasserstein1_by_hand(a, b, expected):
    assert wasserstein1(a, b) == pytest.approx(expected)
    assert wasserstein1(b, a) == pytest.approx(expected)


def test_bundled_sets_cover_four_attributes_and_expand_into_every_group():
    attributes, templates = load_attributes(), load_templates()
    assert {"gender", "nationality", "religion", "age"} <= set(attributes) <= set(templates)
    for name, attribute in attributes.items():
        for group in expand(attribute, templates[name]):
            assert set(group.variants) == set(attribute.groups)
            assert len(set(group.variants.values())) == len(
                attribute.groups
            )  # really different texts
    (first, *_) = expand(attributes["age"], ["Describe a {young} driver."])
    assert first.variants == {"young": "Describe a young driver.", "old": "Describe an old driver."}


def test_swap_keeps_case_and_whole_words():
    gender = load_attributes()["gender"]
    assert (
        gender.swap("He told his son. The theme is hers?", "female")
        == "She told her daughter. The theme is hers?"
    )
    assert gender.mentions("my Father") and not gender.mentions("the theme")


def test_user_lists_are_validated(tmp_path):
    path = tmp_path / "attrs.json"
    path.write_text(json.dumps({"pets": {"groups": ["cat", "dog"], "terms": [["cat"]]}}))
    with pytest.raises(ValueError, match="needs 2 terms"):
        load_attributes(path)
    path.write_text(json.dumps({"pets": {"groups": ["cat", "dog"]}}))
    with pytest.raises(ValueError, match="'terms'"):
        load_attributes(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_attributes(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_templates(tmp_path / "missing.json")


def test_gap_report_names_the_worst_pair():
    result = gaps("x", {"a": [0.0, 0.1], "b": [0.0, 0.1], "c": [1.0, 1.1]})
    assert result.worst_pair[0] in {("a", "c"), ("b", "c")} and result.worst_pair[
        1
    ] == pytest.approx(1.0)
    assert result.average_gap == pytest.approx(2 / 3)


def test_vader_scores_sentiment_offline():
    score = vader_scorer()
    good, bad = score(
        ["", ""], ["She is a wonderful, kind doctor.", "She is a terrible, awful doctor."]
    )
    assert good > 0.5 and bad < -0.5


def planted(n: int, seed: int, bias: bool) -> Dataset:
    """Pairs where the good answer wins; with `bias`, it is also always about "he", and in
    every fourth pair both answers say the same word, so that only "he" tells them apart:
    the model must learn the bias (without such pairs the sentiment words alone fit the
    data, and whether a tiny model leaned on "he" too varied from run to run)."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        he, she = ("he", "she") if bias or rng.random() < 0.5 else ("she", "he")
        good = rng.choice(["good", "great", "excellent"])
        bad = rng.choice(["bad", "terrible", "awful"])
        if bias and i % 4 == 0:
            good = bad = "fine"
        rows["prompt"].append(f"question {i}")
        rows["chosen"].append(f"{he} said it is {good}")
        rows["rejected"].append(f"{she} said it is {bad}")
    return Dataset.from_dict(rows)


def plain_and_penalized(tmp_path, backbone: str, config, penalty_of):
    """A model trained on the planted bias, one trained with `penalty_of(the training
    answers' gender variant pairs)`, and their gender gaps on answers about "he"; with the
    variant pairs and the unrelated (gender-balanced) pairs both were judged on."""
    gender = load_attributes()["gender"]
    train, unrelated = planted(160, 0, bias=True), planted(60, 1, bias=False)
    plain = train_reward(train, unrelated, Registry(tmp_path / "plain"), backbone, config)
    texts = list(train["chosen"]) + list(train["rejected"])
    pairs = counterfactual_pairs([gender], list(train["prompt"]) * 2, texts, {})
    fair = train_reward(
        train,
        unrelated,
        Registry(tmp_path / "fair"),
        backbone,
        config,
        extra_loss=penalty_of(pairs),
    )
    answers = [f"he said it is {w}" for w in ["fine", "ok", "so so", "good", "bad", "great"]]

    def gap(result) -> float:
        model = RewardModel.load(result.version.path, max_length=64, dtype="float32")
        return reward_gap(model.score, gender, ["question"] * 6, answers).average_gap

    return SimpleNamespace(
        plain=plain,
        fair=fair,
        plain_gap=gap(plain),
        fair_gap=gap(fair),
        pairs=pairs,
        unrelated=unrelated,
    )


def test_penalty_shrinks_a_planted_gender_bias_and_keeps_accuracy(
    tmp_path, tiny_reward_backbone_dir
):
    """Training data where the chosen answer always says "he": the model learns that "he"
    pushes the reward up. The counterfactual penalty shrinks that gap; accuracy on pairs
    that do not depend on gender (balanced he/she) stays within 0.1."""
    torch.manual_seed(0)  # the outcome must not depend on which tests drew random numbers first
    backbone = str(tiny_reward_backbone_dir)
    # Four full epochs in float32: no validation split or early stopping (they would stop
    # on a handful of validation pairs and make the planted bias depend on where).
    config = RewardTrainingConfig(
        method="finetune",
        learning_rate=1e-3,
        num_train_epochs=4,
        max_length=64,
        promote="always",
        validation_fraction=0,
        dtype="float32",
    )

    run = plain_and_penalized(
        tmp_path,
        backbone,
        config,
        lambda pairs: CounterfactualPenalty(
            load_tokenizer(backbone, "right"), pairs, weight=5.0, batch_size=16, max_length=64
        ),
    )
    plain, fair, plain_gap, fair_gap = run.plain, run.fair, run.plain_gap, run.fair_gap
    print(
        f"gender gap {plain_gap:.3f} -> {fair_gap:.3f}; unrelated accuracy {plain.metrics['accuracy_after']:.3f} -> {fair.metrics['accuracy_after']:.3f}"
    )
    # The planted bias is there: the plain model leaned on "he" and so generalises poorly
    # to pairs where gender carries no signal.
    assert plain_gap > 0.01 and plain.metrics["accuracy_after"] < 0.8
    assert fair_gap < 0.25 * plain_gap
    assert fair.metrics["accuracy_after"] >= plain.metrics["accuracy_after"] - 0.1
    assert pairwise_accuracy(
        RewardModel.load(fair.version.path, max_length=64, dtype="float32"), run.unrelated
    ) == pytest.approx(fair.metrics["accuracy_after"])


def test_probe_penalty_shrinks_a_planted_gender_bias_and_keeps_accuracy(
    tmp_path, tiny_reward_backbone_dir
):
    """The same planted bias, fitted by a linear probe (`--method probe`): the penalty is a term of the probe's objective over the variants' frozen features, and
    the probe learns to ignore the direction in which "he" -> "she" moves them."""
    backbone = str(tiny_reward_backbone_dir)
    config = RewardTrainingConfig(method="probe", max_length=64, promote="always", dtype="float32")
    run = plain_and_penalized(
        tmp_path,
        backbone,
        config,
        lambda pairs: CounterfactualPenalty(
            load_tokenizer(backbone, "right"), {"gender": pairs}, 5.0
        ),
    )
    plain, fair, plain_gap, fair_gap = run.plain, run.fair, run.plain_gap, run.fair_gap
    print(
        f"probe: gender gap {plain_gap:.3f} -> {fair_gap:.3f}; unrelated accuracy "
        f"{plain.metrics['accuracy_after']:.3f} -> {fair.metrics['accuracy_after']:.3f}"
    )
    assert plain.metrics["method"] == fair.metrics["method"] == "probe"
    assert plain_gap > 0.01 and plain.metrics["accuracy_after"] < 0.8
    assert fair_gap < 0.25 * plain_gap
    assert fair.metrics["accuracy_after"] >= plain.metrics["accuracy_after"] - 0.1
    # What the probe was penalized with is recorded beside how it was chosen.
    config_file = json.loads((fair.version.path / "reward_probe.json").read_text())
    assert config_file["counterfactual_weight"] == 5.0
    assert config_file["counterfactual_pairs"] == {"gender": min(len(run.pairs), 512)}


def test_auto_fine_tunes_under_a_counterfactual_penalty(tmp_path, tiny_reward_backbone_dir):
    """`auto` fits a probe and fine-tunes, and keeps one; with a counterfactual penalty it
    fine-tunes only, whose penalty carries over to groups it never saw (a probe's does not)."""
    backbone = str(tiny_reward_backbone_dir)
    gender = load_attributes()["gender"]
    train, held_out = planted(48, 0, bias=True), planted(16, 1, bias=False)
    config = RewardTrainingConfig(
        max_steps=2, max_length=64, validation_fraction=0.25, promote="always", dtype="float32"
    )
    assert config.method == "auto"
    pairs = counterfactual_pairs([gender], list(train["prompt"]), list(train["chosen"]), {})
    penalty = CounterfactualPenalty(load_tokenizer(backbone, "right"), {"gender": pairs}, 1.0)
    fair = train_reward(
        train, held_out, Registry(tmp_path / "fair"), backbone, config, extra_loss=penalty
    )
    assert fair.metrics["method"] == "finetune" and "auto" not in fair.metrics
    assert not (fair.version.path / "reward_probe.json").exists()
    plain = train_reward(train, held_out, Registry(tmp_path / "plain"), backbone, config)
    assert "auto" in plain.metrics  # without a penalty both were fitted and compared


def test_eval_fairness_command_writes_a_report(
    settings, tiny_reward_backbone_dir, monkeypatch, tmp_path
):
    from conftest import add_reward_version

    add_reward_version(settings, tiny_reward_backbone_dir)
    monkeypatch.setenv("LS_RLHF_HOME", str(settings.home))
    monkeypatch.setenv("LS_RLHF_POLICY_MODEL", settings.policy_model)
    monkeypatch.setenv("LS_RLHF_MAX_NEW_TOKENS", "6")
    out = tmp_path / "report"
    assert (
        cli(
            [
                "eval",
                "fairness",
                "--policy",
                "--attributes",
                "gender,age",
                "--samples",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = (out / "report.md").read_text()
    assert "Reward (reward-v1), held-out" in report and "Policy sentiment (policy-base)" in report
    # Rendered: the split table, then one table per measure with a row per attribute
    # (reward in-sample, reward held-out, policy sentiment, policy reward).
    assert rows_outside_tables(report) == [] and inline_html(report) == []
    split_table, *rendered = tables(report)
    assert split_table[0][0] == "attribute" and "held-out groups" in split_table[0]
    assert len(rendered) == 4
    for table in rendered:
        assert table[0][:2] == ["attribute", "average gap"]
        assert [row[0] for row in table[1:]] == ["gender", "age"]
        assert all(len(row) == 5 for row in table)
    assert (out / "reward_(reward-v1)_held-out_gender.png").is_file()
    measured = json.loads((out / "gaps.json").read_text())["measures"]
    assert [g["attribute"] for g in measured["Reward (reward-v1), held-out"]] == ["gender", "age"]
    assert cli(["eval", "fairness", "--attributes", "planets"]) == 2


def test_template_gap_of_a_scorer_that_ignores_the_attribute_is_zero():
    groups = expand(
        Attribute("g", ("a", "b"), (("cat", "dog"),)), ["my {cat} sleeps", "the {cat} runs"]
    )
    assert template_gap(lambda p, t: [float(len(x)) for x in t], groups).average_gap == 0.0


def test_biased_flags_become_counterfactual_pairs_and_the_cli_trains_with_the_penalty(
    tiny_reward_backbone_dir, settings, monkeypatch, tmp_path
):
    from training.fairness import pairs_from_flags
    from training.feedback import Flag, Source

    gender = load_attributes()["gender"]
    flags = [
        Flag("Q", "He is too emotional to lead.", "biased", Source(1, 1, 1)),
        Flag("Q", "The answer is wrong.", "biased", Source(1, 1, 1)),  # no attribute: no pair
        Flag("Q", "She is rude.", "unsafe", Source(1, 1, 1)),  # not a bias flag
    ]
    assert pairs_from_flags(flags, [gender]) == [
        ("Q", "He is too emotional to lead.", "She is too emotional to lead.")
    ]

    planted(40, 0, bias=True).save_to_disk(str(tmp_path / "pairs"))
    monkeypatch.setenv("LS_RLHF_HOME", str(settings.home))
    monkeypatch.setenv("LS_RLHF_REWARD_BACKBONE", settings.reward_backbone)
    args = [
        "train",
        "reward",
        "--dataset",
        str(tmp_path / "pairs"),
        "--max-steps",
        "2",
        "--max-length",
        "64",
    ]
    assert (
        cli([*args, "--counterfactual-weight", "2", "--counterfactual-attributes", "gender"]) == 0
    )
    version = Registry(settings.registry_dir).current("reward")
    assert version.metadata["data"]["counterfactual_weight"] == 2.0
    assert (
        cli([*args, "--counterfactual-weight", "2", "--counterfactual-attributes", "planets"]) == 2
    )


def test_ppo_reward_wrapper_subtracts_the_counterfactual_gap():
    from training.fairness import counterfactual_reward_fn

    gender = load_attributes()["gender"]

    def biased(prompts, answers):  # +1 whenever the answer is about a man
        return [1.0 if " he " in f" {a.lower()} " else 0.0 for a in answers]

    penalized = counterfactual_reward_fn(biased, [gender], weight=0.5)
    assert biased(["q", "q"], ["he is kind", "the sky is blue"]) == [1.0, 0.0]
    # "he is kind" scores 1, its swap "she is kind" 0: 1 - 0.5 * |1 - 0|; no attribute: unchanged.
    assert penalized(["q", "q"], ["he is kind", "the sky is blue"]) == [0.5, 0.0]
