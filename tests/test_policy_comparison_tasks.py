"""Tasks that put a new policy's answer against the base policy's: the policy's side is drawn
at random (seeded, reproducible, half of the tasks each side), the draw is recorded in the
task ("answer_sources"), and the feedback parser and `ls-rlhf report` map people's choices
back to the model, not the side. Against a real Label Studio with API-made annotators."""

from __future__ import annotations

import json

import pytest
from conftest import add_reward_version
from test_quality_report import annotators, pairwise  # noqa: F401 - the annotators fixture

import label_configs
from ml_backend.cli import main as cli
from training.feedback import Comparison, model_comparisons, parse_export
from training.label_config import read_schema
from training.policy_eval import PolicyEvaluation, comparison_tasks
from training.registry import Registry

PROMPTS = [f"Question {i}?" for i in range(7)]


def evaluation() -> PolicyEvaluation:
    return PolicyEvaluation(
        prompts=PROMPTS,
        policy_answers=[f"policy says {i}" for i in range(7)],
        reference_answers=[f"base says {i}" for i in range(7)],
        policy_rewards=[0.0] * 7,
        reference_rewards=[0.0] * 7,
        kl=0.0,
    )


def sides(tasks) -> list[bool]:
    """Per task: is the policy's answer answer1 (side A)?"""
    return [t["answer_sources"] == ["policy-v1", "policy-base"] for t in tasks]


def test_sides_are_drawn_recorded_and_reproducible():
    schema = read_schema(label_configs.load("pairwise"))
    tasks = comparison_tasks(evaluation(), schema, "policy-v1", "policy-base", seed=3)
    assert len(tasks) == 7
    # Half on each side (the odd one more on A), not all on one.
    assert sum(sides(tasks)) == 4
    for i, task in enumerate(tasks):
        assert task["prompt"] == PROMPTS[i]
        by_source = dict(
            zip(task["answer_sources"], (task["answer1"], task["answer2"]), strict=True)
        )
        assert by_source == {"policy-v1": f"policy says {i}", "policy-base": f"base says {i}"}
    again = comparison_tasks(evaluation(), schema, "policy-v1", "policy-base", seed=3)
    assert again == tasks  # the same seed: the same sides
    others = [
        sides(comparison_tasks(evaluation(), schema, "policy-v1", "policy-base", seed=s))
        for s in range(4, 9)
    ]
    assert any(o != sides(tasks) for o in others)  # the seed draws them
    assert all("truncated" not in t and "answer1_cut" not in t for t in tasks)  # not known
    # Answers cut at the token limit are marked on whichever side they land.
    cut = evaluation()
    cut.policy_truncated, cut.reference_truncated = [True] * 7, [False] * 7
    cut.max_new_tokens = 64
    marked = comparison_tasks(cut, schema, "policy-v1", "policy-base", seed=3)
    for task in marked:
        policy_at = task["answer_sources"].index("policy-v1")
        assert task["truncated"] == [policy_at == 0, policy_at == 1]
        assert "cut at 64 tokens" in task[f"answer{policy_at + 1}_cut"]
        assert task[f"answer{2 - policy_at}_cut"] == ""
    rating = read_schema(label_configs.load("rating"))
    assert sides(comparison_tasks(evaluation(), rating, "policy-v1", "policy-base", 3)) == sides(
        tasks
    )
    with pytest.raises(ValueError, match="two answer fields"):
        comparison_tasks(
            evaluation(), read_schema(label_configs.load("ranking")), "policy-v1", "policy-base"
        )


def test_the_parser_maps_a_side_back_to_its_model():
    config = label_configs.load("pairwise")
    tasks = comparison_tasks(evaluation(), read_schema(config), "policy-v1", "policy-base", 3)
    export = []
    for i, data in enumerate(tasks):
        policy_side = "left" if data["answer_sources"][0] == "policy-v1" else "right"
        base_side = "right" if policy_side == "left" else "left"
        export.append(
            {
                "id": i,
                "data": data,
                "annotations": [
                    # Annotator 1 always prefers the policy; annotator 2 always clicks left.
                    {"id": 10 * i + 1, "completed_by": 1, "result": pairwise(policy_side)},
                    {"id": 10 * i + 2, "completed_by": 2, "result": pairwise("left")},
                    # Annotator 3 prefers the base on task 0, calls the rest a tie.
                    {
                        "id": 10 * i + 3,
                        "completed_by": 3,
                        "result": pairwise(base_side)
                        if i == 0
                        else [
                            {
                                "from_name": "verdict",
                                "to_name": "prompt",
                                "type": "choices",
                                "value": {"choices": ["tie"]},
                            }
                        ],
                    },
                ],
            }
        )
    comparisons = parse_export(export, config).of_type(Comparison)
    by_annotator = {
        a: [c.preferred_source for c in comparisons if c.source.annotator == a] for a in (1, 2, 3)
    }
    assert by_annotator[1] == ["policy-v1"] * 7
    # Always left: the policy wins exactly where it was drawn to side A (4 of 7).
    assert by_annotator[2] == ["policy-v1" if a else "policy-base" for a in sides(tasks)]
    assert by_annotator[3] == ["policy-base"] + [None] * 6
    (row,) = model_comparisons(comparisons)
    assert (row.first, row.second) == ("policy-v1", "policy-base")
    # Wins: 7 + 4 + 0; ties 6; losses 0 + 3 + 1; win rate (11 + 6/2) / 21.
    assert (row.comparisons, row.first_wins, row.ties, row.second_wins) == (21, 11, 6, 4)
    assert row.first_win_rate == pytest.approx(14 / 21)
    # A task without answer_sources carries none.
    del export[0]["data"]["answer_sources"]
    plain = parse_export(export[:1], config).of_type(Comparison)
    assert all(c.sources is None and c.preferred_source is None for c in plain)


@pytest.mark.label_studio
def test_eval_policy_imports_the_tasks_and_the_report_counts_by_model(
    settings,
    make_project,
    ls_client,
    label_studio,
    annotators,  # noqa: F811 - the fixture imported from test_quality_report
    tiny_reward_backbone_dir,
    monkeypatch,
    tmp_path,
):
    from tiny_models import build_tiny_policy

    settings = settings.replace(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token, seed=3
    )
    for key, value in settings.to_env(base={}).items():
        monkeypatch.setenv(key, value)
    add_reward_version(settings, tiny_reward_backbone_dir)
    registry = Registry(settings.registry_dir)
    other = build_tiny_policy(tmp_path / "other-policy", seed=1)  # other weights: other answers
    with registry.stage("policy") as staged:
        for path in other.iterdir():
            (staged / path.name).write_bytes(path.read_bytes())
        registry.commit("policy", staged, {"note": "test policy"}, promote=True)
    project = make_project("pairwise")
    prompts = tmp_path / "held-out.txt"
    prompts.write_text("\n".join(PROMPTS[:4]) + "\n")
    command = ["eval", "policy", "--prompts", str(prompts), "--out", str(tmp_path / "eval")]
    assert cli([*command, "--project", str(project.id)]) == 0

    tasks = sorted(ls_client.tasks.list(project=project.id), key=lambda t: t.id)
    assert [t.data["prompt"] for t in tasks] == PROMPTS[:4]
    first = [t.data["answer_sources"][0] == "policy-v1" for t in tasks]
    assert sum(first) == 2  # two tasks on each side
    assert all(sorted(t.data["answer_sources"]) == ["policy-base", "policy-v1"] for t in tasks)
    # Each answer is marked if generation cut it (the tiny policies rarely end by themselves).
    for t in tasks:
        assert [bool(t.data["answer1_cut"]), bool(t.data["answer2_cut"])] == t.data["truncated"]
    assert any(any(t.data["truncated"]) for t in tasks)
    # Annotator A clicks left on every task; annotator B picks the policy's answer.
    a, b = annotators[:2]
    for task, policy_first in zip(tasks, first, strict=True):
        ls_client.annotations.create(
            id=task.id, result=pairwise("left"), completed_by=a, ground_truth=False
        )
        ls_client.annotations.create(
            id=task.id,
            result=pairwise("left" if policy_first else "right"),
            completed_by=b,
            ground_truth=False,
        )
    out = tmp_path / "report"
    assert cli(["report", "--project", str(project.id), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    (row,) = report["models"]
    # A's 4 clicks on the left: 2 policy wins (where it was on the left), 2 losses; B: 4 wins.
    assert (row["first"], row["second"]) == ("policy-v1", "policy-base")
    assert (row["comparisons"], row["first_wins"], row["ties"], row["second_wins"]) == (8, 6, 0, 2)
    assert row["first_win_rate"] == pytest.approx(0.75)
    # The /metrics gauge of it.
    headline = json.loads((out / "headline.json").read_text())
    assert headline['human_win_rate{model="policy-v1",against="policy-base"}'] == 0.75
    markdown = (out / "report.md").read_text()
    assert "## Models compared by annotators" in markdown
    assert "| policy-v1 | policy-base | 8 | 6 | 0 | 2 | 0.750 |" in markdown
    # A's position bias still shows: every choice was the first answer.
    (shown_a,) = [x for x in report["per_annotator"] if x["annotator"] == str(a)]
    assert shown_a["first_share"] == 1.0
