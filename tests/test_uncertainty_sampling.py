"""Uncertainty sampling, really on: `ls-rlhf connect` turns it on, the project's model version
follows the served one, and Label Studio's next task is the least certain prediction, first
on one reward version, then on the next one after it is served."""

from __future__ import annotations

import time

import pytest
import requests
from test_labeling_ui import page  # noqa: F401 - the Chromium fixture

from ml_backend.cli import main as cli
from ml_backend.harness.waiting import wait_until
from ml_backend.sampling import UNCERTAINTY_SAMPLING
from training.registry import Registry, lineage

pytestmark = pytest.mark.label_studio

TASKS = [
    {
        "prompt": f"Question {i}: what should I know about {topic}?",
        "answer1": f"{topic} is {good}.",
        "answer2": f"I do not know much about {topic}, {bad}.",
    }
    for i, (topic, good, bad) in enumerate(
        [
            ("Paris", "the capital of France", "maybe a city"),
            ("water", "boiling at one hundred degrees", "it is wet"),
            ("plants", "making food from sunlight", "they are green"),
            ("the fox", "quick and brown", "an animal"),
            ("doctors", "people who treat patients", "a job"),
            ("numbers", "one two three", "yes no maybe"),
        ]
    )
]


def add_different_reward_version(settings, backbone_dir, seed: int, registry=None):
    """A reward version whose scores differ: the tiny classifier with its head redrawn,
    promoted in `registry` (a project's lineage; the registry root by default)."""
    import torch

    from training.models import load_sequence_classifier

    registry = registry or Registry(settings.registry_dir)
    model, tokenizer = load_sequence_classifier(str(backbone_dir))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("classifier", "score")):
                param.copy_(torch.randn(param.shape, generator=generator) * 20.0)
    with registry.stage("reward") as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        return registry.commit("reward", staged, {"note": "redrawn head"}, promote=True)


def scores_of(ls_client, task_ids, model_version):
    """Each task's score from its prediction of `model_version`."""
    found = {}
    for tid in task_ids:
        preds = [
            p for p in ls_client.predictions.list(task=tid) if p.model_version == model_version
        ]
        if preds:
            found[tid] = preds[0].score
    return found


def next_tasks(label_studio, ls_client, project_id: int, count: int) -> list[int]:
    """The tasks Label Studio serves one annotator, each annotated before asking again."""
    served = []
    headers = {"Authorization": f"Token {label_studio.token}"}
    for _ in range(count):
        answer = requests.get(
            f"{label_studio.url}/api/projects/{project_id}/next", headers=headers, timeout=30
        )
        answer.raise_for_status()
        task_id = answer.json()["id"]
        served.append(task_id)
        ls_client.annotations.create(
            id=task_id,
            result=[
                {
                    "from_name": "comparison",
                    "to_name": "comparison",
                    "type": "pairwise",
                    "value": {"selected": "left"},
                }
            ],
            ground_truth=False,
        )
    return served


@pytest.fixture
def backend32(settings, label_studio, start_backend, monkeypatch):
    """A backend scoring in float32 (bfloat16 rounds the tiny model's small differences away),
    reaching the session's Label Studio; the CLI in this process reaches both."""
    settings = settings.replace(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token, dtype="float32"
    )
    for key, value in settings.to_env(base={}).items():
        monkeypatch.setenv(key, value)
    return settings, start_backend(settings)


def test_next_task_is_the_least_certain_and_follows_a_new_version(
    backend32, make_project, ls_client, label_studio, tiny_reward_backbone_dir, capsys
):
    settings, backend = backend32
    # The untrained tiny classifier scores every answer nearly alike; a redrawn head tells
    # them apart.
    first_version = (
        f"policy-base+{add_different_reward_version(settings, tiny_reward_backbone_dir, 3).label}"
    )
    wait_until(
        lambda: (
            requests.get(f"{backend.url}/health", timeout=5).json().get("model_version")
            == first_version
        ),
        60,
        what=f"the backend does not serve {first_version}",
    )
    project = make_project("pairwise")
    ids = ls_client.projects.import_tasks(
        id=project.id, request=[{"data": t} for t in TASKS], return_task_ids=True
    ).task_ids

    assert cli(["connect", "--project", str(project.id), "--backend-url", backend.url]) == 0
    said = capsys.readouterr().out
    # No prediction of the served version exists yet: Label Studio would refuse the version.
    assert f'sampling "{UNCERTAINTY_SAMPLING}"' in said and first_version in said
    assert ls_client.projects.get(id=project.id).sampling == UNCERTAINTY_SAMPLING

    ls_client.actions.create(
        id="retrieve_tasks_predictions",
        project=project.id,
        selected_items={"all": False, "included": ids},
    )
    first = wait_until(
        lambda: (s := scores_of(ls_client, ids, first_version)) and len(s) == len(ids) and s,
        60,
        what="no predictions",
    )
    # The backend sets the project's version once Label Studio holds its predictions.
    wait_until(
        lambda: ls_client.projects.get(id=project.id).model_version == first_version,
        30,
        what=f"the project's model_version did not become {first_version}",
    )
    assert len(set(first.values())) == len(ids), first  # distinct scores: an order to check
    by_score = sorted(ids, key=first.get)
    served_first = next_tasks(label_studio, ls_client, project.id, 3)
    assert served_first == by_score[:3], (served_first, first)

    # A retrain: a new reward version is promoted; the backend serves it, asks Label Studio to
    # predict the unlabeled tasks with it, and the project follows.
    rest = [tid for tid in ids if tid not in served_first]
    old_order = sorted(rest, key=first.get)
    # Scores of a tiny random model sit close together, so a redrawn head can order three
    # tasks as the old one did by chance; then redraw again (else the test could not tell
    # the versions apart).
    for seed in range(7, 12):
        second = add_different_reward_version(settings, tiny_reward_backbone_dir, seed=seed)
        second_version = f"policy-base+{second.label}"
        new = wait_until(
            lambda v=second_version: (
                (s := scores_of(ls_client, rest, v)) and len(s) == len(rest) and s
            ),
            90,
            what=f"no predictions of {second_version}",
        )
        wait_until(
            lambda v=second_version: ls_client.projects.get(id=project.id).model_version == v,
            30,
            what=f"the project's model_version did not follow to {second_version}",
        )
        new_order = sorted(rest, key=new.get)
        if new_order != old_order:
            break
    assert new_order != old_order, (new, first)
    assert next_tasks(label_studio, ls_client, project.id, len(rest)) == new_order, (new, first)


def test_connect_can_leave_sampling_alone(backend32, make_project, ls_client, capsys):
    _, backend = backend32
    project = make_project("pairwise")
    before = ls_client.projects.get(id=project.id).sampling
    assert (
        cli(
            [
                "connect",
                "--project",
                str(project.id),
                "--backend-url",
                backend.url,
                "--keep-sampling",
            ]
        )
        == 0
    )
    assert "sampling left as it was" in capsys.readouterr().out
    assert ls_client.projects.get(id=project.id).sampling == before != UNCERTAINTY_SAMPLING


@pytest.mark.browser
def test_label_all_tasks_in_chromium_starts_with_the_least_certain(
    page,  # noqa: F811 - the fixture imported from test_labeling_ui
    make_project,
    ls_client,
    label_studio,
    output_dir,
):
    """The annotator's own button: "Label All Tasks" opens the lowest-score task, and after
    a submit the next lowest."""
    from ml_backend.sampling import turn_on_uncertainty_sampling

    project = make_project("pairwise")
    scores = [0.9, 0.55, 0.8, 0.51, 0.7, 0.95]
    ls_client.projects.import_tasks(
        id=project.id,
        request=[
            {
                "data": task,
                "predictions": [
                    {
                        "result": [
                            {
                                "from_name": "comparison",
                                "to_name": "comparison",
                                "type": "pairwise",
                                "value": {"selected": "left"},
                            }
                        ],
                        "score": score,
                        "model_version": "policy-base+reward-v9",
                    }
                ],
            }
            for task, score in zip(TASKS, scores, strict=True)
        ],
    )
    said = turn_on_uncertainty_sampling(ls_client, project.id, "policy-base+reward-v9")
    assert "model version policy-base+reward-v9" in said
    by_score = [TASKS[i]["prompt"] for i in sorted(range(len(scores)), key=scores.__getitem__)]

    page.goto(f"{label_studio.url}/projects/{project.id}/data")
    page.get_by_role("button", name="Label All Tasks").click()
    shown = []
    for step in range(2):
        submit = page.get_by_test_id("bottombar-submit-button")
        submit.wait_for(timeout=60_000)
        # The label stream shows one task, no table of the others.
        (prompt,) = [p for p in by_score if page.get_by_text(p).count()]
        shown.append(prompt)
        page.screenshot(path=str(output_dir / f"label-all-tasks-{step + 1}.png"))
        submit.click()  # the suggestion, pre-filled, as it is
        page.get_by_text(prompt).first.wait_for(state="detached", timeout=30_000)
    assert shown == by_score[:2], shown


def test_each_project_follows_its_own_lineages_version(
    backend32, make_project, ls_client, tiny_reward_backbone_dir, capsys
):
    """Two projects on one backend: the first to connect owns the registry root, the second
    has its own lineage. A version promoted in one lineage moves only that project's
    model_version (and re-predicts only its tasks); the other keeps its own, never the
    root's label."""
    settings, backend = backend32
    for seed in (3, 4):  # the root serves reward-v2, so no label is shared by chance
        add_different_reward_version(settings, tiny_reward_backbone_dir, seed)
    root_v2 = "policy-base+reward-v2"
    wait_until(
        lambda: (
            requests.get(f"{backend.url}/health", timeout=5).json().get("model_version") == root_v2
        ),
        60,
        what=f"the backend does not serve {root_v2}",
    )
    owner, other = make_project("pairwise"), make_project("pairwise")
    ids = {}
    for project, tasks in ((owner, TASKS[:3]), (other, TASKS[3:])):
        ids[project.id] = ls_client.projects.import_tasks(
            id=project.id, request=[{"data": t} for t in tasks], return_task_ids=True
        ).task_ids
        assert cli(["connect", "--project", str(project.id), "--backend-url", backend.url]) == 0
    said = capsys.readouterr().out
    # connect names each project's own served version, not the root's for both.
    (sampling_line,) = [
        line for line in said.splitlines() if f"project {other.id}: sampling" in line
    ]
    assert "policy-base+reward-none" in sampling_line and root_v2 not in sampling_line, said
    assert lineage(settings.registry_dir, owner.id).root == settings.registry_dir
    other_lineage = lineage(settings.registry_dir, other.id)
    assert other_lineage.root != settings.registry_dir

    def model_version(project):
        return ls_client.projects.get(id=project.id).model_version

    def follows(project, version):
        wait_until(
            lambda: model_version(project) == version,
            60,
            what=f"project {project.id}'s model_version did not become {version} "
            f"(it is {model_version(project)!r})",
        )

    def versions_predicted(project):
        return sorted(
            p.model_version for t in ids[project.id] for p in ls_client.predictions.list(task=t)
        )

    for project in (owner, other):
        ls_client.actions.create(
            id="retrieve_tasks_predictions",
            project=project.id,
            selected_items={"all": False, "included": ids[project.id]},
        )
    follows(owner, root_v2)
    follows(other, "policy-base+reward-none")

    # A retrain of the second project only: its lineage gets its own v1.
    add_different_reward_version(settings, tiny_reward_backbone_dir, seed=5, registry=other_lineage)
    follows(other, "policy-base+reward-v1")
    assert model_version(owner) == root_v2
    assert set(versions_predicted(owner)) == {root_v2}  # not re-predicted for the other's version

    # A retrain of the root's project: the owner follows; the other is left alone.
    add_different_reward_version(settings, tiny_reward_backbone_dir, seed=6)
    follows(owner, "policy-base+reward-v3")
    before = versions_predicted(other)
    time.sleep(5)  # the watcher polls every 2 s: time enough for a wrong re-predict to land
    assert versions_predicted(other) == before
    assert set(before) == {"policy-base+reward-none", "policy-base+reward-v1"}
    assert model_version(other) == "policy-base+reward-v1"
