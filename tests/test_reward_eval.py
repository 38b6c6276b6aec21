"""Held-out figures of a reward model (training/reward_eval.py) and `ls-rlhf eval reward`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset
from markdown_tables import rows_outside_tables, tables
from test_reward import synthetic_pairs
from test_reward_cli import env  # noqa: F401  (the fixture, shared)

from ml_backend.cli import main as cli
from training.registry import Registry
from training.reward_eval import evaluate_reward, evaluation_from_differences


def test_figures_match_a_hand_computation():
    # Six pairs over three prompts; differences r(chosen) - r(rejected):
    difference = np.array([2.0, 0.5, -1.0, 3.0, -0.2, 0.0])
    prompts = ["a", "a", "b", "b", "c", "c"]
    chosen_len = [10, 3, 5, 8, 2, 4]  # the chosen answer is the shorter one in pairs 2, 5, 6
    rejected_len = [5, 9, 1, 2, 7, 6]
    e = evaluation_from_differences(difference, prompts, chosen_len, rejected_len, bins=5)

    assert e.accuracy == pytest.approx(3 / 6)  # a tie (0.0) counts as wrong
    assert e.longer_answer_accuracy == pytest.approx(3 / 6)
    assert e.shorter_chosen_pairs == 3
    assert e.shorter_chosen_accuracy == pytest.approx(1 / 3)  # only 0.5 was right among them
    # Shown confidence sigmoid(|d|): 0.881, 0.622, 0.731, 0.953, 0.550, 0.5; right: 1,1,0,1,0,0.
    conf = 1 / (1 + np.exp(-np.abs(difference)))
    right = difference > 0
    bins = np.clip(np.searchsorted(np.linspace(0.5, 1, 6), conf, side="right") - 1, 0, 4)
    expected = sum(
        (bins == b).sum() / 6 * abs(right[bins == b].mean() - conf[bins == b].mean())
        for b in range(5)
        if (bins == b).any()
    )
    assert e.expected_calibration_error == pytest.approx(expected)
    assert [b.pairs for b in e.reliability] == [2, 1, 1, 1, 1]
    assert e.accuracy_low <= e.accuracy <= e.accuracy_high
    assert e.accuracy_low < e.accuracy_high  # three prompts with different accuracies


def test_the_interval_resamples_prompts_not_pairs():
    # 20 prompts, each with 10 pairs all right or all wrong: pairs are not independent, and
    # the interval must be as wide as 20 observations make it, not 200.
    difference = np.repeat([1.0] * 10 + [-1.0] * 10, 10)
    prompts = [f"p{i // 10}" for i in range(200)]
    e = evaluation_from_differences(difference, prompts, [1] * 200, [1] * 200, resamples=2000)
    assert e.accuracy == 0.5
    assert e.accuracy_high - e.accuracy_low > 0.3  # pair-level resampling gives about 0.14


def test_each_distinct_answer_is_scored_once_and_agreement_buckets_appear():
    pairs = Dataset.from_dict(
        {
            "prompt": ["q", "q", "q", "r"],
            "chosen": ["long good", "long good", "midd", "x"],
            "rejected": ["midd", "bad", "bad", "yy"],
            "agreement": [1.0, 0.67, 1.0, 1.0],
            "votes": [3, 3, 1, 2],
        }
    )
    calls = []

    def score(prompts, answers):
        calls.append(list(zip(prompts, answers, strict=True)))
        return [float(len(a)) for a in answers]

    e = evaluate_reward(score, pairs)
    assert len(calls) == 1 and len(calls[0]) == 5  # q: 3 answers, r: 2
    assert e.accuracy == pytest.approx(3 / 4)
    assert {b.name: (b.pairs, b.accuracy) for b in e.by_agreement} == {
        "one annotator": (1, 1.0),
        "several, unanimous": (2, 0.5),
        "several, majority": (1, 1.0),
    }


def test_eval_reward_reports_a_version_on_a_jsonl_file(env, tmp_path, capsys):  # noqa: F811
    dataset_dir = tmp_path / "preference"
    synthetic_pairs(48, seed=3).save_to_disk(str(dataset_dir))
    assert cli(["train", "reward", "--dataset", str(dataset_dir), "--max-steps", "6"]) == 0
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(
        "\n".join(json.dumps(row) for row in synthetic_pairs(30, seed=9).to_list()) + "\n"
    )
    capsys.readouterr()

    out_dir = tmp_path / "report"
    code = cli(["eval", "reward", "--pairs", str(held_out), "--out", str(out_dir)])

    out = capsys.readouterr().out
    assert code == 0 and "reward-v1 on held_out.jsonl: accuracy" in out
    report = json.loads((out_dir / "report.json").read_text())
    assert report["pairs"] == 30 and 0 <= report["accuracy"] <= 1
    assert report["accuracy_low"] <= report["accuracy"] <= report["accuracy_high"]
    assert (out_dir / "reliability.png").stat().st_size > 5000
    markdown = (out_dir / "report.md").read_text()
    assert not rows_outside_tables(markdown)
    assert tables(markdown)[0][1] == ["pairwise accuracy", f"{report['accuracy']:.3f}"]
    # `versions list` shows the same held-out figures that training recorded.
    capsys.readouterr()
    assert cli(["versions", "list", "--kind", "reward"]) == 0
    listed = capsys.readouterr().out
    assert "held-out accuracy" in listed and "ECE" in listed and "[" in listed


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "p", "chosen": "a"}\n', "missing or not text: rejected"),
        ("not json\n", "is not JSON"),
        ("", "holds no preference pairs"),
        ('{"prompt": 1, "chosen": "a", "rejected": "b"}\n', "missing or not text: prompt"),
    ],
)
def test_bad_pairs_are_a_one_line_error_and_change_nothing(env, tmp_path, capsys, content, message):  # noqa: F811
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    code = cli(["eval", "reward", "--pairs", str(path), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert err.count("\n") == 1 and not (tmp_path / "r").exists()


def test_a_dataset_without_the_columns_is_a_one_line_error(env, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "other"
    Dataset.from_dict({"prompt": ["p"], "completion": ["c"]}).save_to_disk(str(folder))
    capsys.readouterr()
    code = cli(["train", "reward", "--dataset", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and "lack the column(s) chosen, rejected" in err
    assert Registry(env.registry_dir).versions("reward") == []


def test_no_version_to_evaluate_says_what_to_do(env, tmp_path, capsys):  # noqa: F811
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    code = cli(["eval", "reward", "--pairs", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "train one with `ls-rlhf train reward`" in err
