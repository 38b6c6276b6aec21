"""DPO and SFT through TRL on a tiny policy: they move the policy the right way and save versions."""

from __future__ import annotations

import importlib.util

import pytest
from datasets import Dataset

from training.models import load_causal_lm
from training.policy import sequence_logprob
from training.preference import DPOSettings, train_dpo
from training.registry import Registry
from training.sft import SFTSettings, train_sft

PROMPTS = [f"question {i} about water" for i in range(12)]


def test_dpo_raises_the_chosen_over_the_rejected(tiny_policy_dir, tmp_path):
    pairs = Dataset.from_dict(
        {
            "prompt": PROMPTS,
            "chosen": ["it is good and great"] * 12,
            "rejected": ["it is bad and awful"] * 12,
        }
    )
    base, tokenizer = load_causal_lm(str(tiny_policy_dir))

    def margin(model) -> float:
        return sequence_logprob(
            model, tokenizer, PROMPTS[0], "it is good and great"
        ) - sequence_logprob(model, tokenizer, PROMPTS[0], "it is bad and awful")

    registry = Registry(tmp_path / "registry")
    version = train_dpo(
        pairs,
        registry,
        str(tiny_policy_dir),
        DPOSettings(learning_rate=1e-3, max_steps=10, beta=0.5),
    )
    trained, _ = load_causal_lm(str(version.path))
    assert margin(trained) > margin(base) + 1.0
    assert registry.current("policy").name == "v1" and version.metadata["algorithm"] == "dpo"
    assert (version.path / "training_curves.png").is_file()


def test_sft_makes_the_demonstrations_likelier(tiny_policy_dir, tmp_path):
    examples = Dataset.from_dict(
        {"prompt": PROMPTS, "completion": ["the capital of France is Paris"] * 12}
    )
    base, tokenizer = load_causal_lm(str(tiny_policy_dir))
    registry = Registry(tmp_path / "registry")
    version = train_sft(
        examples,
        registry,
        str(tiny_policy_dir),
        SFTSettings(learning_rate=1e-3, max_steps=10),
        promote=False,
    )
    trained, _ = load_causal_lm(str(version.path))
    before = sequence_logprob(base, tokenizer, PROMPTS[1], "the capital of France is Paris")
    after = sequence_logprob(trained, tokenizer, PROMPTS[1], "the capital of France is Paris")
    assert after > before + 5.0
    assert registry.current("policy") is None  # not promoted


def test_dpo_and_sft_commands_on_real_annotations_from_an_export(
    settings, finegrained_path, monkeypatch, tmp_path
):
    import json

    from ml_backend.cli import main as cli
    from training.finegrained import load_finegrained, to_export, to_label_studio_tasks

    records = load_finegrained(finegrained_path)[:3]
    for kind in ("ranking", "demonstration"):
        (tmp_path / f"{kind}.json").write_text(
            json.dumps(to_export(to_label_studio_tasks(records, kind)))
        )
    monkeypatch.setenv("LS_RLHF_HOME", str(settings.home))
    monkeypatch.setenv("LS_RLHF_POLICY_MODEL", settings.policy_model)
    common = ["--max-steps", "2", "--batch-size", "2"]
    assert (
        cli(
            [
                "train",
                "dpo",
                "--export",
                str(tmp_path / "ranking.json"),
                "--config",
                "ranking",
                *common,
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "train",
                "sft",
                "--export",
                str(tmp_path / "demonstration.json"),
                "--config",
                "demonstration",
                "--from-current",
                *common,
            ]
        )
        == 0
    )
    registry = Registry(settings.registry_dir)
    assert [v.metadata["algorithm"] for v in registry.versions("policy")] == ["dpo", "sft"]
    assert registry.current("policy").metadata["parent"] == "v1"
    assert (
        cli(["train", "sft", "--export", str(tmp_path / "ranking.json"), "--config", "ranking"])
        == 2
    )


def test_ilf_keeps_the_refinement_that_follows_the_feedback_or_the_annotators_rewrite(
    tiny_policy_dir, tmp_path
):
    from training.ilf import Embedder, refinements, select_refinement
    from training.models import resolve_reward_backbone

    embed = Embedder.load(resolve_reward_backbone("default"))  # the real MiniLM encoder
    index, scores = select_refinement(
        embed,
        "The answer should name the city: Paris, the capital of France.",
        "I am not sure.",
        ["I am not sure at all, sorry.", "The capital of France is Paris."],
    )
    assert index == 1 and scores[1] > scores[0]

    critiques = Dataset.from_dict(
        {
            "prompt": ["What is the capital of France?", "Name a fruit."],
            "completion": ["I am not sure.", "A car."],
            "feedback": ["Name the city.", "A car is not a fruit."],
            "refinement": ["", "An apple."],
        }
    )
    model, tokenizer = load_causal_lm(str(tiny_policy_dir))
    kept = refinements(critiques, model, tokenizer, embed, num_refinements=3, max_new_tokens=6)
    assert kept["chosen_by"] == ["feedback similarity", "annotator"]
    assert kept["completion"][1] == "An apple."

    registry = Registry(tmp_path / "registry")
    version = train_sft(
        kept,
        registry,
        str(tiny_policy_dir),
        SFTSettings(max_steps=2),
        metadata={"algorithm": "ilf"},
    )
    assert version.metadata["algorithm"] == "ilf"


def test_trl_trainers_report_to_the_trackers_the_setting_names(
    tiny_policy_dir, tmp_path, monkeypatch
):
    examples = Dataset.from_dict({"prompt": PROMPTS[:4], "completion": ["Paris"] * 4})
    monkeypatch.setenv("LS_RLHF_REPORT_TO", "tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "runs"))

    def run():
        train_sft(
            examples,
            Registry(tmp_path / "registry"),
            str(tiny_policy_dir),
            SFTSettings(max_steps=1),
        )

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        run()
        assert list((tmp_path / "runs").glob("events.out.tfevents.*"))
    else:  # the trainer was asked for TensorBoard: it says its package is missing
        with pytest.raises(RuntimeError, match="requires tensorboard"):
            run()
