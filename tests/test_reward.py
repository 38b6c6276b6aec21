"""Reward model: input format, scoring, Bradley-Terry training, versions and promotion."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from datasets import Dataset

from training.models import load_sequence_classifier, load_tokenizer
from training.registry import Registry
from training.reward import (
    RewardModel,
    RewardTrainingConfig,
    format_reward_input,
    pairwise_accuracy,
    train_reward,
)

GOOD = ["good", "great", "excellent", "happy", "yes"]
BAD = ["bad", "terrible", "awful", "sad", "no"]


def synthetic_pairs(n: int, seed: int) -> Dataset:
    """Chosen answers use positive words, rejected ones negative words: learnable."""
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": [], "margin": []}
    for i in range(n):
        topic = rng.choice(["the capital", "water", "the fox", "plants", "the river"])
        rows["prompt"].append(f"question {i} about {topic}?")
        rows["chosen"].append(f"{topic} is {rng.choice(GOOD)} {rng.choice(GOOD)}")
        rows["rejected"].append(f"{topic} is {rng.choice(BAD)} {rng.choice(BAD)}")
        rows["margin"].append(0.0)
    return Dataset.from_dict(rows)


def test_truncation_keeps_the_answer_and_cuts_the_prompt_from_the_left(tiny_reward_backbone_dir):
    tokenizer = load_tokenizer(str(tiny_reward_backbone_dir), padding_side="right")
    long_prompt = "start " + "water boils at one hundred degrees " * 40 + "final question?"
    a = format_reward_input(tokenizer, long_prompt, "the answer is good", max_length=64)
    b = format_reward_input(tokenizer, long_prompt, "the answer is bad", max_length=64)
    assert len(a) <= 64 and len(b) <= 64
    assert a != b  # the differing end of the answers survived
    text = tokenizer.decode(a)
    assert "question" in text and "good" in text and "start" not in text


def test_scores_are_batch_invariant_and_in_order(tiny_reward_backbone_dir):
    # float32: in bfloat16 the padding of a batch moves a score by about 1e-4 (2^-13 steps),
    # which is not what this test is about.
    model = RewardModel.load(tiny_reward_backbone_dir, dtype="float32")
    prompts = ["p one", "a longer prompt here", "x"]
    answers = ["yes", "no no no no", "maybe great"]
    together = model.score(prompts, answers, batch_size=3)
    alone = [model.score([p], [a])[0] for p, a in zip(prompts, answers, strict=True)]
    assert together == pytest.approx(alone, abs=1e-5)
    with pytest.raises(ValueError, match="one prompt per answer"):
        model.score(["a"], ["b", "c"])


def test_training_learns_a_preference_and_writes_a_version(tmp_path, tiny_reward_backbone_dir):
    registry = Registry(tmp_path / "registry")
    config = RewardTrainingConfig(
        method="finetune",
        learning_rate=1e-3,
        num_train_epochs=4,
        per_device_train_batch_size=16,
        max_length=64,
    )
    result = train_reward(
        synthetic_pairs(160, 0),
        synthetic_pairs(40, 1),
        registry,
        str(tiny_reward_backbone_dir),
        config,
    )
    metrics = result.metrics
    assert (
        metrics["accuracy_after"] >= 0.9 > metrics["accuracy_before"] + 0.2
        or metrics["accuracy_after"] >= 0.95
    )
    assert result.promoted and registry.current("reward").name == result.version.name == "v1"
    folder = result.version.path
    assert (folder / "config.json").is_file() and (
        folder / "training_curves.png"
    ).stat().st_size > 1000
    metadata = json.loads((folder / "metadata.json").read_text())
    # A tenth of the training prompts chose the stopping point; the held-out 40 chose nothing.
    m = metadata["metrics"]
    assert m["train_pairs"] + m["validation_pairs"] == 160 and 0 < m["validation_pairs"] < 40
    assert m["best_step"] is not None and metadata["data"]["fingerprint"]
    assert metadata["evaluation"]["accuracy"] == pytest.approx(m["accuracy_after"])
    assert metadata["evaluation"]["accuracy_low"] <= m["accuracy_after"]
    assert metadata["parent"] is None and metadata["backbone"] == str(tiny_reward_backbone_dir)
    # The saved version scores like the trained model did.
    assert pairwise_accuracy(
        RewardModel.load(folder, max_length=64), synthetic_pairs(40, 1)
    ) == pytest.approx(metrics["accuracy_after"])


def test_a_worse_model_is_not_promoted_unless_asked(tmp_path, tiny_reward_backbone_dir):
    registry = Registry(tmp_path / "registry")
    good = RewardTrainingConfig(
        method="finetune", learning_rate=1e-3, num_train_epochs=4, max_length=64
    )
    train_reward(
        synthetic_pairs(160, 0),
        synthetic_pairs(40, 1),
        registry,
        str(tiny_reward_backbone_dir),
        good,
    )
    flipped = synthetic_pairs(160, 2).rename_columns({"chosen": "rejected", "rejected": "chosen"})
    worse = train_reward(
        flipped, synthetic_pairs(40, 1), registry, str(tiny_reward_backbone_dir), good
    )
    assert not worse.promoted and registry.current("reward").name == "v1"
    assert worse.metrics["accuracy_after"] < worse.metrics["current_accuracy"]
    forced = train_reward(
        flipped,
        synthetic_pairs(40, 1),
        registry,
        str(tiny_reward_backbone_dir),
        RewardTrainingConfig(
            method="finetune", learning_rate=1e-3, max_steps=2, max_length=64, promote="always"
        ),
    )
    assert forced.promoted and registry.current("reward").name == "v3"


def test_warm_start_continues_from_the_current_version(tmp_path, tiny_reward_backbone_dir):
    registry = Registry(tmp_path / "registry")
    config = RewardTrainingConfig(
        method="finetune", learning_rate=1e-3, num_train_epochs=4, max_length=64
    )
    first = train_reward(
        synthetic_pairs(160, 0),
        synthetic_pairs(40, 1),
        registry,
        str(tiny_reward_backbone_dir),
        config,
    )
    warm = RewardTrainingConfig(
        method="finetune", learning_rate=1e-5, max_steps=1, max_length=64, warm_start=True
    )
    second = train_reward(
        synthetic_pairs(16, 3),
        synthetic_pairs(40, 1),
        registry,
        str(tiny_reward_backbone_dir),
        warm,
    )
    # Started from v1, so before any step it is already as good as v1.
    assert second.metrics["accuracy_before"] == pytest.approx(first.metrics["accuracy_after"])
    assert json.loads((second.version.path / "metadata.json").read_text())["parent"] == "v1"


def test_extra_loss_hook_enters_the_training_loss(tmp_path, tiny_reward_backbone_dir):
    calls = []

    def penalty(model: torch.nn.Module) -> torch.Tensor:
        # A constant with a zero gradient: training is unchanged, the loss grows by exactly 5.
        calls.append(1)
        return 0.0 * model.classifier.weight.sum() + 5.0

    registry = Registry(tmp_path / "registry")
    config = RewardTrainingConfig(
        method="finetune", learning_rate=1e-3, max_steps=3, max_length=64, logging_steps=1
    )
    backbone = str(tiny_reward_backbone_dir)
    plain = train_reward(synthetic_pairs(48, 0), synthetic_pairs(16, 1), registry, backbone, config)
    penalized = train_reward(
        synthetic_pairs(48, 0),
        synthetic_pairs(16, 1),
        registry,
        backbone,
        config,
        extra_loss=penalty,
    )
    assert len(calls) == 3
    assert penalized.metrics["train_loss"] == pytest.approx(
        plain.metrics["train_loss"] + 5.0, abs=1e-3
    )
    assert penalized.metrics["accuracy_after"] == pytest.approx(plain.metrics["accuracy_after"])


def test_no_pairs_is_a_clear_error(tmp_path, tiny_reward_backbone_dir):
    empty = Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})
    with pytest.raises(ValueError, match="no preference pairs"):
        train_reward(empty, empty, Registry(tmp_path), str(tiny_reward_backbone_dir))


def test_a_time_budget_stops_training_early_but_still_writes_a_version(
    tmp_path, tiny_reward_backbone_dir
):
    # A budget shorter than one step: training stops after the first step, not after 20.
    config = RewardTrainingConfig(
        method="finetune",
        max_steps=20,
        per_device_train_batch_size=4,
        max_length=32,
        max_minutes=1e-6,
    )
    result = train_reward(
        synthetic_pairs(80, 0),
        synthetic_pairs(8, 1),
        Registry(tmp_path / "registry"),
        str(tiny_reward_backbone_dir),
        config,
    )
    assert result.metrics["steps"] == 1
    assert (result.version.path / "metadata.json").is_file()


def test_prompt_groups_score_each_answer_once_and_keep_every_pair(tiny_reward_backbone_dir):
    """A ranking of 3 answers (3 pairs) plus one pair with a margin: 2 groups, 5 sequences
    instead of 8, and the grouped loss equals the Bradley-Terry loss computed pair by pair."""
    from training.reward import collate_groups, tokenize_groups

    pairs = Dataset.from_dict(
        {
            "prompt": ["rank these", "rank these", "rank these", "other"],
            "chosen": ["best", "best", "middle", "yes"],
            "rejected": ["middle", "worst", "worst", "no"],
            "margin": [0.0, 0.0, 0.0, 1.5],
        }
    )
    model = RewardModel.load(tiny_reward_backbone_dir, max_length=32)
    groups = tokenize_groups(pairs, model.tokenizer, 32, use_margin=True)
    assert len(groups) == 2 and [len(ids) for ids in groups["ids"]] == [3, 2]
    batch = collate_groups(model.tokenizer.pad_token_id)(list(groups))
    assert batch["input_ids"].shape[0] == 5
    assert batch["chosen_index"].tolist() == [0, 0, 1, 3]
    assert batch["rejected_index"].tolist() == [1, 2, 2, 4]

    model.model.eval()
    with torch.no_grad():
        rewards = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.squeeze(-1)
    grouped = -torch.nn.functional.logsigmoid(
        rewards[batch["chosen_index"]] - rewards[batch["rejected_index"]] - batch["margin"]
    ).mean()
    one_by_one = []
    for prompt, chosen, rejected, margin in zip(*pairs[:].values(), strict=True):
        r_chosen, r_rejected = model.score([prompt, prompt], [chosen, rejected])
        one_by_one.append(
            -torch.nn.functional.logsigmoid(torch.tensor(r_chosen - r_rejected - margin))
        )
    assert float(grouped) == pytest.approx(float(torch.stack(one_by_one).mean()), abs=1e-5)


def test_a_decoder_with_a_score_head_trains_as_a_reward_model(tmp_path, tiny_policy_dir):
    # A causal LM folder (GPT-2 with a chat template) gets a fresh score head on the last
    # real token; right padding must not move that token, so batched scores match single ones.
    config = RewardTrainingConfig(
        method="finetune",
        learning_rate=1e-3,
        num_train_epochs=4,
        per_device_train_batch_size=16,
        max_length=64,
    )
    result = train_reward(
        synthetic_pairs(160, 0),
        synthetic_pairs(40, 1),
        Registry(tmp_path / "registry"),
        str(tiny_policy_dir),
        config,
    )
    assert result.metrics["accuracy_after"] >= 0.9, result.metrics
    model = RewardModel.load(result.version.path, max_length=64)
    assert type(model.model).__name__ == "GPT2ForSequenceClassification"
    prompts, answers = ["a question?", "another, longer question here?"], ["great", "bad bad bad"]
    together = model.score(prompts, answers, batch_size=2)
    alone = [model.score([p], [a])[0] for p, a in zip(prompts, answers, strict=True)]
    assert together == pytest.approx(alone, abs=1e-5)


def test_a_warm_start_trains_on_every_new_pair_and_a_replay_of_old_ones(
    tmp_path, tiny_reward_backbone_dir
):
    from datasets import concatenate_datasets

    from ml_backend.training_job import REPLAY_MIN, new_and_replayed
    from training.reward import pair_key, trained_pairs

    first = synthetic_pairs(60, 0)
    result = train_reward(
        first,
        synthetic_pairs(10, 1),
        Registry(tmp_path),
        str(tiny_reward_backbone_dir),
        RewardTrainingConfig(method="finetune", max_steps=2, max_length=64),
    )
    seen = trained_pairs(result.version.path)
    assert seen == {
        pair_key(*row)
        for row in zip(first["prompt"], first["chosen"], first["rejected"], strict=True)
    }

    new = synthetic_pairs(65, 2).select(range(60, 65))  # prompts 60-64: not in the first set
    fit = new_and_replayed(concatenate_datasets([first, new]), seen, seed=0)
    prompts = set(fit["prompt"])
    assert set(new["prompt"]) <= prompts  # every new annotation is trained on
    assert len(fit) == len(new) + REPLAY_MIN and len(prompts & set(first["prompt"])) == REPLAY_MIN
    # Nothing recorded (a version from before this rule) or nothing new: all pairs.
    assert len(new_and_replayed(first, set(), seed=0)) == len(first)
    assert len(new_and_replayed(first, seen, seed=0)) == len(first)


def test_partial_fine_tuning_trains_only_the_top_layers_and_the_head(
    tmp_path, tiny_reward_backbone_dir
):
    from training.reward import freeze_below_top_layers

    model, _ = load_sequence_classifier(str(tiny_reward_backbone_dir))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    freeze_below_top_layers(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    layers = sorted({n.split(".layer.")[1].split(".")[0] for n in before if ".layer." in n})
    top = layers[-1]
    assert trainable and all(f".layer.{top}." in n or ".layer." not in n for n in trainable)
    assert not any("embeddings" in n for n in trainable)
    assert any("classifier" in n or "score" in n for n in trainable)

    result = train_reward(
        synthetic_pairs(40, 0),
        synthetic_pairs(10, 1),
        Registry(tmp_path),
        str(tiny_reward_backbone_dir),
        RewardTrainingConfig(
            method="finetune", max_steps=3, max_length=64, learning_rate=1e-3, train_top_layers=1
        ),
    )
    trained, _ = load_sequence_classifier(str(result.version.path))
    moved = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= trainable


def test_lora_fine_tuning_saves_a_plain_merged_version_that_learned(
    tmp_path, tiny_reward_backbone_dir
):
    """LoRA adapters train, merge into the weights, and the version folder is a plain
    sequence classifier (no adapter files) whose weights moved and whose scores learned."""
    result = train_reward(
        synthetic_pairs(80, 0),
        synthetic_pairs(20, 1),
        Registry(tmp_path),
        str(tiny_reward_backbone_dir),
        RewardTrainingConfig(
            method="finetune", max_steps=12, max_length=64, learning_rate=5e-3, lora_rank=4
        ),
    )
    folder = result.version.path
    assert not (folder / "adapter_config.json").exists()
    base, _ = load_sequence_classifier(str(tiny_reward_backbone_dir))
    trained, _ = load_sequence_classifier(str(folder))
    before = dict(base.named_parameters())
    moved = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    # The merged low-rank updates change the adapted linear layers; embeddings stay.
    assert any(".layer." in n and n.endswith("weight") for n in moved)
    assert not any("embeddings" in n for n in moved)
    assert result.metrics["accuracy_after"] > result.metrics["accuracy_before"]
    with pytest.raises(ValueError, match="exclude each other"):
        RewardTrainingConfig(lora_rank=4, train_top_layers=1)


def test_no_held_out_pairs_still_trains_a_version_marked_unjudged(
    tmp_path, tiny_reward_backbone_dir
):
    empty = synthetic_pairs(0, 1)
    result = train_reward(
        synthetic_pairs(24, 0),
        empty,
        Registry(tmp_path),
        str(tiny_reward_backbone_dir),
        RewardTrainingConfig(method="finetune", max_steps=2, max_length=64),
    )
    metadata = json.loads((result.version.path / "metadata.json").read_text())
    assert result.evaluation is None and metadata["evaluation"] is None
    assert metadata["metrics"]["accuracy_after"] is None and result.promoted


def test_a_linear_probe_learns_a_preference_and_scores_as_it_was_fitted(
    tmp_path, tiny_reward_backbone_dir
):
    registry = Registry(tmp_path / "registry")
    config = RewardTrainingConfig(method="probe", max_length=64, dtype="float32")
    result = train_reward(
        synthetic_pairs(160, 0),
        synthetic_pairs(40, 1),
        registry,
        str(tiny_reward_backbone_dir),
        config,
    )
    m = result.metrics
    # A random tiny backbone still separates the word lists: its features carry the tokens.
    assert m["accuracy_after"] >= 0.9 and m["method"] == "probe" and m["steps"] == 0
    folder = result.version.path
    probe = json.loads((folder / "reward_probe.json").read_text())
    # Layer and L2 were chosen by cross-validation over the training prompts.
    assert probe["layer"] == m["probe_layer"] and probe["pooling"] == "answer"
    assert {g["layer"] for g in probe["grid"]} >= {probe["layer"]} and len(probe["grid"]) >= 5
    assert min(g["loss"] for g in probe["grid"]) == pytest.approx(probe["cross_validation_loss"])
    assert probe["folds"] == 5 and m["validation_pairs"] == 0 and m["train_pairs"] == 160
    assert (folder / "reward_probe.safetensors").is_file() and (folder / "config.json").is_file()
    served = RewardModel.load(folder, dtype="float32")
    assert served.probe is not None and served.probe.layer == probe["layer"]
    assert pairwise_accuracy(served, synthetic_pairs(40, 1)) == pytest.approx(m["accuracy_after"])
    # Scores are batch invariant and centred on the training answers.
    data = synthetic_pairs(20, 2)
    together = served.score(data["prompt"], data["chosen"], batch_size=7)
    alone = [served.score([p], [a])[0] for p, a in zip(data["prompt"], data["chosen"], strict=True)]
    assert together == pytest.approx(alone, abs=1e-4)
    train = synthetic_pairs(160, 0)
    scores = served.score(
        list(train["prompt"]) * 2, list(train["chosen"]) + list(train["rejected"])
    )
    assert abs(sum(scores) / len(scores)) < 0.2 * (max(scores) - min(scores))


def test_a_probe_warm_start_keeps_its_layer_and_reads_only_new_answers(
    tmp_path, tiny_reward_backbone_dir
):
    from datasets import concatenate_datasets

    registry = Registry(tmp_path / "registry")
    config = RewardTrainingConfig(method="probe", max_length=64, dtype="float32")
    old, new = synthetic_pairs(60, 0), synthetic_pairs(100, 3)
    first = train_reward(
        old, synthetic_pairs(40, 1), registry, str(tiny_reward_backbone_dir), config
    )
    warm = RewardTrainingConfig(method="auto", max_length=64, dtype="float32", warm_start=True)
    second = train_reward(
        concatenate_datasets([old, new]),
        synthetic_pairs(40, 1),
        registry,
        str(tiny_reward_backbone_dir),
        warm,
    )
    assert second.metrics["method"] == "probe"  # auto continues the parent's method
    assert second.metrics["probe_layer"] == first.metrics["probe_layer"]
    seen = {
        (p, a)
        for p, c, r in zip(old["prompt"], old["chosen"], old["rejected"], strict=True)
        for a in (c, r)
    }
    fresh = {
        (p, a)
        for p, c, r in zip(new["prompt"], new["chosen"], new["rejected"], strict=True)
        for a in (c, r)
    } - seen
    assert second.metrics["answers_read"] == len(fresh)
    # A new annotation can pair answers that were all read before (rankings share answers).
    again = train_reward(
        concatenate_datasets([old, new]).shuffle(seed=0),
        synthetic_pairs(40, 1),
        registry,
        str(tiny_reward_backbone_dir),
        warm,
    )
    assert again.metrics["answers_read"] == 0 and again.metrics["method"] == "probe"
    metadata = json.loads((second.version.path / "metadata.json").read_text())
    assert metadata["started_from"] == "current version" and metadata["parent"] == "v1"
    assert second.metrics["current_accuracy"] == pytest.approx(first.metrics["accuracy_after"])
    # Reused features are the ones a fresh read gives: the warm fit scores like a cold one.
    cold = train_reward(
        concatenate_datasets([old, new]),
        synthetic_pairs(40, 1),
        Registry(tmp_path / "cold"),
        str(tiny_reward_backbone_dir),
        RewardTrainingConfig(method="probe", max_length=64, dtype="float32"),
    )
    if cold.metrics["probe_layer"] == second.metrics["probe_layer"]:
        assert cold.metrics["accuracy_after"] == pytest.approx(
            second.metrics["accuracy_after"], abs=0.03
        )


def test_the_counterfactual_penalty_needs_fine_tuning(tmp_path, tiny_reward_backbone_dir):
    with pytest.raises(ValueError, match="method finetune"):
        train_reward(
            synthetic_pairs(20, 0),
            synthetic_pairs(8, 1),
            Registry(tmp_path / "registry"),
            str(tiny_reward_backbone_dir),
            RewardTrainingConfig(method="probe"),
            extra_loss=lambda model: torch.zeros(()),
        )
    with pytest.raises(ValueError, match="method must be one of"):
        RewardTrainingConfig(method="lora")
    # A setting of the other method is refused, not silently ignored.
    with pytest.raises(ValueError, match="'probe' does not fine-tune"):
        RewardTrainingConfig(method="probe", lora_rank=8)
    with pytest.raises(ValueError, match="'probe' does not fine-tune"):
        RewardTrainingConfig(method="probe", train_top_layers=2)
    with pytest.raises(ValueError, match="fits no probe"):
        RewardTrainingConfig(method="finetune", grounding=True)
    assert RewardTrainingConfig(method="auto", lora_rank=8, grounding=True).grounding


def test_auto_keeps_fine_tuning_only_when_clearly_better(tmp_path, tiny_reward_backbone_dir):
    registry = Registry(tmp_path / "registry")
    config = RewardTrainingConfig(
        method="auto", max_length=64, dtype="float32", num_train_epochs=1, learning_rate=1e-3
    )
    result = train_reward(
        synthetic_pairs(160, 0),
        synthetic_pairs(40, 1),
        registry,
        str(tiny_reward_backbone_dir),
        config,
    )
    auto = result.metrics["auto"]
    # The one-standard-error rule: fine-tuning must win by more than the paired error.
    clearly_better = auto["finetune_loss_gain"] > auto["standard_error"] > 0
    assert auto["chosen"] == ("finetune" if clearly_better else "probe") == result.metrics["method"]
    if auto["chosen"] == "finetune":
        assert auto["finetune_validation_loss"] < auto["probe_validation_loss"]
    folder = result.version.path
    assert (folder / "reward_probe.json").is_file() == (auto["chosen"] == "probe")
    served = RewardModel.load(folder, dtype="float32")
    assert pairwise_accuracy(served, synthetic_pairs(40, 1)) == pytest.approx(
        result.metrics["accuracy_after"]
    )


def test_paired_loss_gain_is_taken_over_prompts():
    from training.reward import _paired_loss_gain

    margin = torch.zeros(4)
    probe = torch.zeros(4)  # loss ln 2 on every pair
    # Prompt "a": fine-tuning right with confidence on both pairs; prompt "b": wrong on both.
    tuned = torch.tensor([4.0, 4.0, -4.0, -4.0])
    gain, error = _paired_loss_gain(probe, tuned, margin, ["a", "a", "b", "b"])
    per_prompt = [math.log(2) - math.log1p(math.exp(-4)), math.log(2) - math.log1p(math.exp(4))]
    assert gain == pytest.approx(sum(per_prompt) / 2)
    # Two observations (prompts), not four pairs: std of the two means over sqrt(2).
    spread = abs(per_prompt[0] - per_prompt[1]) / math.sqrt(2)
    assert error == pytest.approx(spread / math.sqrt(2))
    assert gain < error  # a loss mostly on one prompt does not make fine-tuning "clearly better"
    one_prompt = _paired_loss_gain(probe[:2], tuned[:2], margin[:2], ["a", "a"])
    assert one_prompt[1] == float("inf")


def test_scoring_and_serving_do_not_import_trl():
    # Serving scores with a reward model; TRL (and its import time) belongs to training.
    import subprocess
    import sys

    code = (
        "import sys, ml_backend.serving, training.reward_model; "
        "sys.exit('trl' in sys.modules or 'training.reward' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_promotion_gate_tolerates_only_noise():
    import numpy as np

    from training.reward import _paired_standard_error, _should_promote

    current = np.array([True] * 60 + [False] * 40)
    one_flip = current.copy()
    one_flip[0] = False  # 0.60 -> 0.59: one pair of a hundred judged differently
    tolerance = _paired_standard_error(one_flip, current)
    assert tolerance == pytest.approx(0.01)
    assert _should_promote("if_not_worse", 0.59, 0.60, tolerance)
    many = current.copy()
    many[:10] = False  # 0.60 -> 0.50: ten pairs lost, none gained
    tolerance = _paired_standard_error(many, current)
    assert tolerance == pytest.approx(np.sqrt(10) / 100)
    assert not _should_promote("if_not_worse", 0.50, 0.60, tolerance)
    assert _should_promote("always", 0.1, 0.9) and not _should_promote("never", 0.9, 0.1)


def test_a_probe_on_a_decoder_pools_the_answer_tokens(tmp_path, tiny_policy_dir):
    # A chat-templated decoder: the answer sits before the end-of-turn tokens; the probe
    # pools the answer's tokens there, and a version loads back as a probe.
    result = train_reward(
        synthetic_pairs(120, 0),
        synthetic_pairs(40, 1),
        Registry(tmp_path / "registry"),
        str(tiny_policy_dir),
        RewardTrainingConfig(method="probe", max_length=64, dtype="float32"),
    )
    assert result.metrics["accuracy_after"] >= 0.9
    served = RewardModel.load(result.version.path, dtype="float32")
    assert served.probe is not None
    data = synthetic_pairs(10, 2)
    together = served.score(data["prompt"], data["chosen"], batch_size=4)
    alone = [served.score([p], [a])[0] for p, a in zip(data["prompt"], data["chosen"], strict=True)]
    assert together == pytest.approx(alone, abs=1e-4)
