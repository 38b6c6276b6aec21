"""The gold judge (training/judge.py) and the overoptimization alarm (issue 14).

The judge is a real reward model folder (the tiny random classifier, or one built through
`train_reward`); its labels go into a real Label Studio as annotations, the backend's real
webhook job learns from them, and the alarm keeps a policy step out of serving.
"""

from __future__ import annotations

import json
import math

import pytest
import requests

from ml_backend.cli import main as cli
from ml_backend.harness.simulated_annotator import SimulatedAnnotator
from ml_backend.harness.waiting import wait_until
from ml_backend.overoptimization import MIN_FRESH_PAIRS, alarm_reasons
from training.datasets import preference_dataset
from training.export import pull_export
from training.feedback import parse_export
from training.finegrained import load_finegrained
from training.judge import (
    DEGENERATE_KINDS,
    JUDGE_FILE,
    GoldJudge,
    build_judge,
    degenerate_pairs,
    flip_rate_for_agreement,
)
from training.registry import Registry
from training.reward import RewardTrainingConfig

WORDS = [
    "the",
    "capital",
    "of",
    "france",
    "is",
    "paris",
    "a",
    "city",
    "on",
    "river",
    "seine",
    "water",
    "boils",
    "good",
    "bad",
    "answer",
]


def answers(n: int) -> list[str]:
    """n distinct short answers made of the tiny tokenizer's words."""
    return [
        " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(3 + i % 5)) for i in range(n)
    ]


def test_flip_rate_matches_the_agreement_of_two_judges():
    for agreement in (0.5, 0.726, 0.9, 1.0):
        f = flip_rate_for_agreement(agreement)
        assert (1 - f) ** 2 + f**2 == pytest.approx(agreement)
    with pytest.raises(ValueError, match="within"):
        flip_rate_for_agreement(0.4)


def test_labels_follow_the_scores_and_the_flip_rate_is_honoured(tiny_reward_backbone_dir):
    texts = answers(40)
    prompt = "who wrote the answer"
    clean = GoldJudge(tiny_reward_backbone_dir)
    scores = clean.scores([prompt] * len(texts), texts)
    pairs = [(texts[i], texts[i + 1]) for i in range(0, 40, 2)]
    expected = {
        pair: "left" if scores[texts.index(pair[0])] >= scores[texts.index(pair[1])] else "right"
        for pair in pairs
    }
    # Without noise the judge picks the higher score, every time.
    assert all(clean.prefer(prompt, a, b) == expected[(a, b)] for a, b in pairs * 3)

    noisy = GoldJudge(tiny_reward_backbone_dir, flip_rate=0.2, seed=3)
    n = 4000
    flips = sum(noisy.prefer(prompt, a, b) != expected[(a, b)] for a, b in (pairs * 200)[:n])
    # Binomial(4000, 0.2): standard deviation 0.0063; 4 of them either way
    assert abs(flips / n - 0.2) < 4 * math.sqrt(0.2 * 0.8 / n)


def test_bradley_terry_temperature_and_rankings(tiny_reward_backbone_dir):
    texts = answers(20)
    prompt = "explain how plants make food"
    judge = GoldJudge(tiny_reward_backbone_dir, temperature=0.05, seed=1)
    s = judge.scores([prompt] * 20, texts)
    pairs = [(i, j) for i in range(20) for j in range(i + 1, 20)][:60]
    trials, lefts, expected, variance = 40, 0, 0.0, 0.0
    for i, j in pairs:
        p = 1 / (1 + math.exp(-(s[i] - s[j]) / 0.05))
        expected += trials * p
        variance += trials * p * (1 - p)
        lefts += sum(judge.prefer(prompt, texts[i], texts[j]) == "left" for _ in range(trials))
    assert abs(lefts - expected) < 4 * math.sqrt(variance) + 1
    # A noise-free ranking is the order of the scores; a flip swaps one neighbouring pair.
    exact = GoldJudge(tiny_reward_backbone_dir)
    assert exact.rank(prompt, texts[:5]) == sorted(range(5), key=lambda i: -s[i])
    always = GoldJudge(tiny_reward_backbone_dir, flip_rate=0.5, seed=2)
    orders = [always.rank(prompt, texts[:5]) for _ in range(200)]
    truth = sorted(range(5), key=lambda i: -s[i])
    swapped = [o for o in orders if o != truth]
    assert 60 < len(swapped) < 140  # half of them, give or take
    assert all(sum(a != b for a, b in zip(o, truth, strict=True)) == 2 for o in swapped)


def test_gold_win_rate_counts_prompts_once_with_an_interval(tiny_reward_backbone_dir):
    judge = GoldJudge(tiny_reward_backbone_dir)
    texts = answers(12)
    prompts = [f"question {i}" for i in range(6) for _ in range(2)]
    win = judge.win_rate(prompts, texts, texts)  # the same answers: every comparison a tie
    assert (win.rate, win.prompts) == (0.5, 6)
    assert win.low == win.high == 0.5
    s = judge.scores(prompts, texts)
    flipped = [texts[i ^ 1] for i in range(12)]  # each prompt's other answer
    win = judge.win_rate(prompts, texts, flipped)
    better = sum(s[i] > s[i ^ 1] for i in range(12)) / 12
    assert win.rate == pytest.approx(better)
    assert win.low <= win.rate <= win.high


def test_build_judge_trains_once_through_train_reward(
    tmp_path, finegrained_path, tiny_reward_backbone_dir
):
    data = tmp_path / "small.json"
    data.write_text(json.dumps(load_finegrained(finegrained_path)[:10]))
    config = RewardTrainingConfig(
        method="finetune", max_steps=2, validation_fraction=0.0, promote="always", seed=1
    )
    folder = build_judge(
        tmp_path / "judge", str(tiny_reward_backbone_dir), config, data, train_questions=8
    )
    info = json.loads((folder / JUDGE_FILE).read_text())
    assert info["train_pairs"] > 0 and info["held_out_pairs"] > 0
    assert info["degenerate_pairs"] > 0
    degenerate = info["held_out_degenerate_accuracy"]
    assert set(degenerate) <= set(DEGENERATE_KINDS) and "empty" in degenerate
    assert all(0 <= v <= 1 for v in degenerate.values())
    assert info["config"]["seed"] == 1 and 0 <= info["held_out_accuracy"] <= 1
    weights = next(folder.glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    assert build_judge(tmp_path / "judge") == folder  # cached: not trained again
    assert weights.stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".building-*"))
    GoldJudge(folder).scores(["q"], ["an answer"])  # loads as a reward model


def test_alarm_reasons():
    live = {"live_accuracy": 0.55, "fresh_pairs": MIN_FRESH_PAIRS}
    # proxy up, accuracy down by more than the tolerance: alarm
    (reason,) = alarm_reasons(live, 0.70, 0.1, 0.3, 1.0, 0.0, 0.05)
    assert "fell (0.700 -> 0.550" in reason
    assert alarm_reasons(live, 0.58, 0.1, 0.3, 1.0, 0.0, 0.05) == []  # within tolerance
    assert alarm_reasons(live, 0.70, 0.3, 0.1, 1.0, 0.0, 0.05) == []  # proxy reward fell too
    assert alarm_reasons(live, None, 0.1, 0.3, 1.0, 0.0, 0.05) == []  # nothing to compare with
    few = {"live_accuracy": 0.1, "fresh_pairs": MIN_FRESH_PAIRS - 1}
    assert alarm_reasons(few, 0.9, 0.1, 0.3, 1.0, 0.0, 0.05) == []  # too few fresh labels
    (reason,) = alarm_reasons({}, None, 0.1, 0.3, 7.5, 5.0, 0.05)
    assert "KL to the base policy 7.50 is past the bound 5" in reason
    assert alarm_reasons({}, None, 0.1, 0.3, 7.5, 0.0, 0.05) == []  # no bound


@pytest.mark.label_studio
def test_judged_annotations_train_the_loop_and_the_alarm_keeps_the_policy_out(
    settings, label_studio, start_backend, make_project, ls_client, tiny_reward_backbone_dir
):
    # The judge labels policy-written comparison tasks through Label Studio's API; the
    # annotation that crosses the threshold fires the real webhook; the job trains the
    # proxy on the judge's labels and runs PPO, whose KL passes the bound: not served.
    settings = settings.replace(
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.token,
        train_every=12,
        loop_policy="ppo",
        loop_policy_updates=2,
        loop_policy_learning_rate=1e-2,
        loop_max_kl=1e-6,
        next_round=2,
    )
    backend = start_backend(settings)
    project = make_project("pairwise")
    assert (
        cli(
            [
                "connect",
                "--project",
                str(project.id),
                "--backend-url",
                backend.url,
                "--url",
                label_studio.url,
                "--api-key",
                label_studio.token,
            ]
        )
        == 0
    )
    requests.post(f"{backend.url}/setup", json={"project": project.id}, timeout=5)
    texts = answers(24)
    tasks = [
        {
            "data": {
                "prompt": f"question {i}",
                "answer1": texts[2 * i],
                "answer2": texts[2 * i + 1],
                "policy_version": "policy-base",
            }
        }
        for i in range(12)
    ]
    ids = ls_client.projects.import_tasks(
        id=project.id, request=tasks, return_task_ids=True
    ).task_ids
    judge = GoldJudge(tiny_reward_backbone_dir)
    annotator = SimulatedAnnotator(judge=judge)
    for task_id, task in zip(ids, tasks, strict=True):
        ls_client.annotations.create(
            id=task_id, result=annotator.pairwise_result(task["data"]), ground_truth=False
        )

    # The labels are real annotations, and each follows the judge's scores.
    exported, config = pull_export(label_studio.url, label_studio.token, project.id)
    pairs = preference_dataset(parse_export(exported, config).records)
    assert len(pairs) == 12
    for prompt, chosen, rejected in zip(
        pairs["prompt"], pairs["chosen"], pairs["rejected"], strict=True
    ):
        c, r = judge.scores([prompt, prompt], [chosen, rejected])
        assert c >= r

    job = wait_until(
        lambda: (
            (jobs := requests.get(f"{backend.url}/jobs", timeout=5).json()["jobs"])
            and jobs[0]["state"] in ("done", "failed")
            and jobs[0]
        ),
        timeout=240,
    )
    assert job["state"] == "done", job["message"]
    metrics = job["metrics"]
    assert metrics["reward_version"] == "reward-v1" and metrics["policy_version"] == "policy-v1"
    assert metrics["policy_promoted"] is False
    assert "NOT served" in job["message"] and "past the bound" in job["message"]
    registry = Registry(settings.registry_dir)
    assert registry.current("policy") is None  # trained, kept, not served
    assert [v.label for v in registry.versions("policy")] == ["policy-v1"]
    # The next round is written by the policy still served: the base.
    tasks_after = list(ls_client.tasks.list(project=project.id))
    assert sum(t.data.get("policy_version") == "policy-base" for t in tasks_after) == 14
    health = requests.get(f"{backend.url}/health", timeout=5).json()
    assert health["model_version"].startswith("policy-base+")


@pytest.mark.label_studio
def test_demo_simulate_with_the_judge_plays_rounds_of_the_policys_own_answers(
    settings,
    label_studio,
    start_backend,
    make_project,
    ls_client,
    tiny_reward_backbone_dir,
    tmp_path,
    capsys,
):
    import shutil

    from ml_backend.commands.demo import simulate

    judge_dir = tmp_path / "judge"  # a built judge: a reward model folder with its judge.json
    shutil.copytree(tiny_reward_backbone_dir, judge_dir)
    (judge_dir / JUDGE_FILE).write_text(json.dumps({"held_out_accuracy": 0.5}))
    settings = settings.replace(
        label_studio_url=label_studio.url,
        label_studio_api_key=label_studio.token,
        train_every=10,
        loop_policy="ppo",
        loop_policy_updates=1,
        next_round=10,
    )
    backend = start_backend(settings)
    project = make_project("pairwise")
    ls_client.ml.create(project=project.id, url=backend.url, title="ls-rlhf", is_interactive=False)
    requests.post(f"{backend.url}/setup", json={"project": project.id}, timeout=5)
    texts = answers(20)
    ls_client.projects.import_tasks(
        id=project.id,
        request=[
            {
                "data": {
                    "prompt": f"question {i}",
                    "answer1": texts[2 * i],
                    "answer2": texts[2 * i + 1],
                    "policy_version": "policy-base",
                }
            }
            for i in range(10)
        ],
    )
    simulate(ls_client, project.id, backend.url, 2, 10, settings.registry_dir, judge=str(judge_dir))
    out = capsys.readouterr().out
    assert "labelled by the gold judge" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("1", "10", "reward-v1"),
        ("2", "20", "reward-v2"),
    ]
    # Round 2's labels are of policy-v1's answers, and the proxy of round 1 was measured on them.
    assert "fresh labels of policy-v1 right" in out
    tasks = list(ls_client.tasks.list(project=project.id))
    assert sum(t.data.get("policy_version") == "policy-v1" for t in tasks) == 10
    assert all(
        t.total_annotations == 1 for t in tasks if t.data.get("policy_version") != "policy-v2"
    )


def test_degenerate_pairs_put_each_chosen_answer_against_worse_versions_of_itself():
    pairs = [
        {"prompt": "q1", "chosen": "paris is the capital of france", "rejected": "rome"},
        {"prompt": "q1", "chosen": "paris is the capital of france", "rejected": "lyon"},
        {"prompt": "q2", "chosen": "water boils at one hundred degrees", "rejected": "at fifty"},
        {"prompt": "q3", "chosen": "no", "rejected": "yes it is"},
    ]
    out = degenerate_pairs(pairs, seed=0)
    by = {(p["prompt"], p["kind"]): p for p in out}
    assert {k for q, k in by if q == "q1"} == set(DEGENERATE_KINDS)
    assert {k for q, k in by if q == "q3"} == {"empty", "off_topic"}  # too short to cut or loop
    assert all(p["chosen"] == "paris is the capital of france" for p in out if p["prompt"] == "q1")
    assert by[("q1", "empty")]["rejected"] == ""
    assert by[("q1", "cut")]["rejected"] == "paris is"
    assert by[("q1", "loop")]["rejected"] == " ".join(["paris is the capital"] * 4)
    assert by[("q2", "off_topic")]["rejected"] in {"paris is the capital of france", "no"}
    assert degenerate_pairs(pairs, seed=0) == out  # seeded
    one = degenerate_pairs(pairs, seed=0, per_prompt=1)
    assert sorted(p["prompt"] for p in one) == ["q1", "q2", "q3"]
