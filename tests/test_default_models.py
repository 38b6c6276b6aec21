"""The embedded default models, end to end (slow: they are real 135M and 22M models)."""

from __future__ import annotations

import pytest

import label_configs
from ml_backend.app import create_app
from ml_backend.serving import ModelHolder
from training.datasets import preference_dataset, split_by_prompt
from training.feedback import parse_export
from training.finegrained import load_finegrained, to_export, to_label_studio_tasks
from training.models import default_policy_path, load_causal_lm
from training.registry import Registry
from training.reward import RewardTrainingConfig, train_reward
from training.settings import Settings

pytestmark = pytest.mark.default_models


@pytest.fixture(scope="module")
def default_settings(tmp_path_factory):
    # Converted once per machine under the user's cache, as in normal use.
    return Settings(home=tmp_path_factory.mktemp("home"), max_new_tokens=24, temperature=0)


def test_default_policy_converts_once_and_answers_coherently(default_settings):
    path = default_policy_path(Settings().models_cache_dir)
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    model, tokenizer = load_causal_lm(str(path))
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    from training.generation import generate_completions

    (answers,) = generate_completions(
        model,
        tokenizer,
        ["What is the capital of France?"],
        num_completions=1,
        max_new_tokens=12,
        temperature=0,
    )
    assert "Paris" in answers[0]


def test_default_reward_backbone_trains_on_real_preferences_and_the_backend_serves_it(
    default_settings, finegrained_path
):
    records = load_finegrained(finegrained_path)[:40]
    parsed = parse_export(
        to_export(to_label_studio_tasks(records, "ranking")), label_configs.load("ranking")
    )
    split = split_by_prompt(preference_dataset(parsed.records), 0.25)
    registry = Registry(default_settings.registry_dir)
    from training.models import resolve_reward_backbone

    result = train_reward(
        split["train"],
        split["test"],
        registry,
        resolve_reward_backbone("default"),
        RewardTrainingConfig(max_steps=4, max_length=256, promote="always"),
    )
    assert result.version.metadata["backbone"].endswith("model") and result.promoted

    settings = default_settings.replace(
        policy_model=str(default_policy_path(Settings().models_cache_dir))
    )
    holder = ModelHolder(settings)
    holder.refresh()
    client = create_app(settings, holder=holder, load_models=False).test_client()
    record = records[0]
    task = {
        "id": 1,
        "data": {
            "prompt": record["question"],
            "answer1": record["prediction 1"],
            "answer2": record["prediction 2"],
        },
    }
    body = {"tasks": [task], "label_config": label_configs.load("pairwise"), "project": "1.1"}
    (item,) = client.post("/predict", json=body).get_json()["results"]
    assert item["model_version"] == "policy-base+reward-v1"
    assert 0.5 <= item["score"] <= 1 and any(r["type"] == "pairwise" for r in item["result"])
    demo = {
        "tasks": [{"id": 2, "data": {"prompt": "Name a fruit."}}],
        "label_config": label_configs.load("demonstration"),
    }
    (draft,) = client.post("/predict", json=demo).get_json()["results"]
    assert draft["result"][0]["value"]["text"][0].strip()
