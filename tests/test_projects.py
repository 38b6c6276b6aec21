"""Several Label Studio projects on one backend (issue 16): each has its own reward and
policy lineage, served version, pins and jobs; a registry from before keeps working."""

from __future__ import annotations

import json

import pytest
import requests
from conftest import add_reward_version
from test_protocol import make_client, pairwise_task

import label_configs
from ml_backend.cli import main as cli
from ml_backend.harness.waiting import wait_until
from training.finegrained import load_finegrained, to_label_studio_tasks
from training.registry import Registry, lineage, lineages

# Generous: the backend trains in its own worker thread meanwhile, on a shared machine.
HTTP = 30


def test_a_registry_from_before_projects_is_its_projects_lineage(
    settings, tiny_reward_backbone_dir
):
    """Versions trained on project 7 (their metadata says so), no PROJECT file: the root
    stays project 7's; project 8 gets a lineage of its own, empty."""
    version = add_reward_version(settings, tiny_reward_backbone_dir)
    metadata = json.loads((version.path / "metadata.json").read_text())
    metadata["data"] = {"source": "project 7"}
    (version.path / "metadata.json").write_text(json.dumps(metadata))
    root = settings.registry_dir
    assert lineage(root, 7, claim=True).root == root
    assert not (root / "PROJECT").exists()  # inferred, nothing written
    eight = lineage(root, 8, claim=True)
    assert eight.root == root / "projects" / "8" and eight.current("reward") is None
    assert lineage(root, None).current("reward").name == "v1"


def test_the_first_project_to_connect_owns_the_root_and_others_get_their_own(
    settings, tiny_reward_backbone_dir
):
    add_reward_version(settings, tiny_reward_backbone_dir)  # trained from a file: no project
    client, app = make_client(settings)
    xml = label_configs.load("pairwise")
    for project in (3, 4):
        assert (
            client.post("/setup", json={"project": f"{project}.1", "schema": xml}).status_code
            == 200
        )
    assert (settings.registry_dir / "PROJECT").read_text() == "3\n"
    four = lineage(settings.registry_dir, 4)
    add_reward_version(settings, tiny_reward_backbone_dir)  # the root's v2: project 3's
    # Project 4's lineage gets its own v1 (as its training would write it).
    from training.models import load_sequence_classifier

    model, tokenizer = load_sequence_classifier(str(tiny_reward_backbone_dir))
    with four.stage("reward") as staged:
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        four.commit("reward", staged, {"data": {"source": "project 4"}}, promote=True)

    assert app.extensions["ls_rlhf"].holder.refresh()  # what the version watcher does

    def served(project):
        body = {"tasks": [pairwise_task(1)], "label_config": xml, "project": f"{project}.9"}
        answer = client.post("/predict", json=body).get_json()
        return answer["results"][0]["model_version"]

    assert served(3) == "policy-base+reward-v2"  # the root: project 3's lineage
    assert served(4) == "policy-base+reward-v1"  # its own v1, not the root's
    assert served(5) == "policy-base+reward-none"  # a new project starts from nothing
    listing = client.get("/versions?project=4").get_json()
    assert (
        listing["all"]["reward"] == ["reward-v1"] and listing["served"] == "policy-base+reward-v1"
    )
    assert client.get("/versions").get_json()["all"]["reward"] == ["reward-v1", "reward-v2"]
    # A pin through /setup's extra params moves only that project's pointer.
    pin = {"project": "3.2", "extra_params": {"reward_version": "v1"}}
    assert client.post("/setup", json=pin).status_code == 200
    assert Registry(settings.registry_dir).current("reward").name == "v1"
    assert four.current("reward").name == "v1" and four.pointer("reward") == "v1"
    # Project 5 has asked but never trained: no folder yet.
    assert list(lineages(settings.registry_dir)) == [3, 4]


@pytest.mark.label_studio
def test_two_label_studio_projects_train_and_serve_without_disturbing_each_other(
    settings,
    label_studio,
    start_backend,
    make_project,
    ls_client,
    finegrained_path,
    capsys,
    monkeypatch,
):
    settings = settings.replace(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token, train_every=0
    )
    backend = start_backend(settings)
    records = load_finegrained(finegrained_path)
    helpful, harmless = make_project("pairwise"), make_project("pairwise")
    for project, chosen in ((helpful, records[:5]), (harmless, records[5:10])):
        ls_client.projects.import_tasks(
            id=project.id, request=to_label_studio_tasks(chosen, "pairwise")
        )
        # Label Studio calls /setup for each project it connects.
        ls_client.ml.create(
            project=project.id, url=backend.url, title="ls-rlhf", is_interactive=False
        )

    def train(project, expected):
        answer = requests.post(
            f"{backend.url}/webhook",
            json={"action": "START_TRAINING", "project": {"id": project.id}},
            timeout=HTTP,
        ).json()
        assert answer["job"], answer
        job = wait_until(
            lambda: (
                (j := requests.get(f"{backend.url}/jobs/{answer['job']}", timeout=HTTP).json())[
                    "state"
                ]
                in ("done", "failed")
                and j
            )
        )
        assert job["state"] == "done", job["message"]
        assert job["project_id"] == project.id and job["metrics"]["reward_version"] == expected
        return job

    def served(project):
        return requests.get(
            f"{backend.url}/versions", params={"project": project.id}, timeout=HTTP
        ).json()

    def predicted_versions(project):
        ids = [t.id for t in ls_client.tasks.list(project=project.id)]
        for task_id in ids:
            for old in ls_client.predictions.list(task=task_id):
                ls_client.predictions.delete(id=old.id)
        ls_client.actions.create(
            id="retrieve_tasks_predictions",
            project=project.id,
            selected_items={"all": False, "included": ids},
        )
        found = wait_until(
            lambda: (
                all(ls_client.predictions.list(task=t) for t in ids)
                and [ls_client.predictions.list(task=t)[0] for t in ids]
            ),
            timeout=60,
        )
        return {p.model_version for p in found}

    train(helpful, "reward-v1")
    wait_until(lambda: served(helpful)["served"] == "policy-base+reward-v1", timeout=30)
    assert served(harmless)["all"]["reward"] == []  # untouched by the other project's training
    assert predicted_versions(harmless) == {"policy-base+reward-none"}
    assert predicted_versions(helpful) == {"policy-base+reward-v1"}

    own = train(harmless, "reward-v1")  # its own v1: nothing warm-started from the other project
    assert own["metrics"]["promoted"] and "current_accuracy" not in own["metrics"]
    second = train(helpful, "reward-v2")
    # The gate compares v2 with helpful's own v1 on helpful's held-out pairs.
    assert second["metrics"].get("current_accuracy") is not None
    expected = "reward-v2" if second["metrics"]["promoted"] else "reward-v1"
    wait_until(lambda: served(helpful)["served"] == f"policy-base+{expected}", timeout=30)
    wait_until(lambda: served(harmless)["served"] == "policy-base+reward-v1", timeout=30)
    assert predicted_versions(harmless) == {"policy-base+reward-v1"}
    assert predicted_versions(helpful) == {f"policy-base+{expected}"}

    mine = lineage(settings.registry_dir, harmless.id)
    theirs = lineage(settings.registry_dir, helpful.id)
    assert mine.root != theirs.root
    (v1,) = mine.versions("reward")
    assert v1.metadata["data"]["source"] == f"project {harmless.id}"
    assert v1.metadata["parent"] is None and v1.metadata["started_from"] != "current version"
    assert [v.metadata["data"]["source"] for v in theirs.versions("reward")] == [
        f"project {helpful.id}"
    ] * 2
    assert theirs.versions("reward")[-1].metadata["parent"] == "v1"  # warm from its own v1
    # Jobs are per project too.
    jobs = requests.get(f"{backend.url}/jobs", params={"project": harmless.id}, timeout=HTTP).json()
    assert {j["project_id"] for j in jobs["jobs"]} == {harmless.id}

    monkeypatch.setenv("LS_RLHF_HOME", str(settings.home))
    capsys.readouterr()
    assert cli(["versions", "list", "--kind", "reward"]) == 0
    listed = capsys.readouterr().out
    assert f"project {helpful.id}:" in listed and f"project {harmless.id}:" in listed
