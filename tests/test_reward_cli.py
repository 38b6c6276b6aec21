"""`ls-rlhf train reward` on a saved preference dataset, and its one-line errors."""

from __future__ import annotations

import json

import pytest
from test_reward import synthetic_pairs

from ml_backend.cli import main as cli
from training.registry import Registry


@pytest.fixture
def env(settings, monkeypatch):
    """The CLI reads its settings from the environment, like the real command."""
    monkeypatch.setenv("LS_RLHF_HOME", str(settings.home))
    monkeypatch.setenv("LS_RLHF_REWARD_BACKBONE", settings.reward_backbone)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return settings


def test_train_reward_on_a_saved_dataset_writes_and_promotes_a_version(env, tmp_path, capsys):
    dataset_dir = tmp_path / "preference"
    synthetic_pairs(40, seed=3).save_to_disk(str(dataset_dir))

    code = cli(
        [
            "train",
            "reward",
            "--dataset",
            str(dataset_dir),
            "--method",
            "finetune",
            "--max-steps",
            "4",
            "--batch-size",
            "8",
        ]
    )

    out = capsys.readouterr().out
    assert code == 0
    version = Registry(env.registry_dir).current("reward")
    assert version is not None and version.label == "reward-v1"
    assert "reward-v1" in out and "promoted" in out
    assert str(version.path / "training_curves.png") in out
    assert (version.path / "training_curves.png").stat().st_size > 0
    metadata = json.loads((version.path / "metadata.json").read_text())
    # 40 pairs over 40 distinct prompts; about 20% are held out and a tenth of the rest
    # chooses the stopping point (validation), none lost.
    m = metadata["metrics"]
    train_pairs, eval_pairs = m["train_pairs"] + m["validation_pairs"], m["eval_pairs"]
    assert train_pairs + eval_pairs == 40
    assert 0 < eval_pairs < train_pairs
    assert f"{train_pairs} training pairs, {eval_pairs} held-out pairs" in out
    assert f"accuracy {metadata['evaluation']['accuracy']:.3f} [" in out

    # Nothing served can be beaten by --promote never: a second version stays unserved.
    code = cli(
        [
            "train",
            "reward",
            "--dataset",
            str(dataset_dir),
            "--max-steps",
            "1",
            "--promote",
            "never",
        ]
    )
    assert code == 0
    assert [v.label for v in Registry(env.registry_dir).versions("reward")] == [
        "reward-v1",
        "reward-v2",
    ]
    assert Registry(env.registry_dir).current("reward").label == "reward-v1"


def test_too_few_pairs_is_a_one_line_error(env, tmp_path, capsys):
    dataset_dir = tmp_path / "preference"
    synthetic_pairs(3, seed=0).save_to_disk(str(dataset_dir))
    capsys.readouterr()  # the save's progress bar is not the command's output

    code = cli(["train", "reward", "--dataset", str(dataset_dir)])

    err = capsys.readouterr().err
    assert code == 2
    assert "annotate at least" in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("ls-rlhf train: error:")


def test_missing_dataset_is_a_one_line_error(env, tmp_path, capsys):
    code = cli(["train", "reward", "--dataset", str(tmp_path / "nowhere")])

    err = capsys.readouterr().err
    assert code == 2
    assert "nowhere" in err and "Traceback" not in err


def test_unknown_backbone_is_a_one_line_error(env, tmp_path, capsys):
    dataset_dir = tmp_path / "preference"
    synthetic_pairs(20, seed=1).save_to_disk(str(dataset_dir))

    code = cli(
        [
            "train",
            "reward",
            "--dataset",
            str(dataset_dir),
            "--backbone",
            str(tmp_path / "no-such-backbone"),
        ]
    )

    err = capsys.readouterr().err
    assert code == 2
    assert "no-such-backbone" in err and "Traceback" not in err
    assert Registry(env.registry_dir).versions("reward") == []


def test_validation_and_partial_fine_tuning_flags_reach_the_training(env, tmp_path, capsys):
    dataset_dir = tmp_path / "preference"
    synthetic_pairs(40, seed=4).save_to_disk(str(dataset_dir))
    args = ["train", "reward", "--dataset", str(dataset_dir), "--max-steps", "2"]

    assert cli([*args, "--validation-fraction", "0", "--train-top-layers", "1"]) == 0
    metadata = json.loads(
        (Registry(env.registry_dir).current("reward").path / "metadata.json").read_text()
    )
    assert metadata["metrics"]["validation_pairs"] == 0 and metadata["metrics"]["best_step"] is None
    assert metadata["config"]["train_top_layers"] == 1

    capsys.readouterr()
    assert cli([*args, "--validation-fraction", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "validation_fraction must be in [0, 1)" in err and "Traceback" not in err
    assert len(Registry(env.registry_dir).versions("reward")) == 1
