"""Real annotations into a real Label Studio, back out through its export API, into training."""

from __future__ import annotations

import json

import pytest
import requests

import label_configs
from ml_backend.cli import main as cli
from training.export import ExportError, pull_export
from training.feedback import parse_export
from training.finegrained import load_finegrained, to_export, to_label_studio_tasks
from training.registry import Registry

pytestmark = pytest.mark.label_studio


def comparable(records):
    return sorted(
        (type(r).__name__, r.prompt, getattr(r, "answers", None), getattr(r, "preferred", None))
        for r in records
    )


@pytest.mark.parametrize("kind", ["pairwise", "ranking"])
def test_annotations_round_trip_through_the_export_api(
    kind, finegrained_path, make_project, ls_client, label_studio
):
    tasks = to_label_studio_tasks(load_finegrained(finegrained_path)[:15], kind)
    project = make_project(kind)
    ls_client.projects.import_tasks(id=project.id, request=tasks)
    pulled, config = pull_export(label_studio.url, label_studio.token, project.id)
    assert len(pulled) == len(tasks)
    remote = parse_export(pulled, config)
    local = parse_export(to_export(tasks), label_configs.load(kind))
    assert not remote.problems and comparable(remote.records) == comparable(local.records)
    assert {r.source.annotation_id for r in remote.records} <= {
        a["id"] for t in pulled for a in t["annotations"]
    }


def test_personal_access_token_works_and_bad_keys_are_clear(
    finegrained_path, make_project, ls_client, label_studio
):
    project = make_project("pairwise")
    ls_client.projects.import_tasks(
        id=project.id,
        request=to_label_studio_tasks(load_finegrained(finegrained_path)[:2], "pairwise"),
    )
    response = requests.post(
        f"{label_studio.url}/api/token/",
        headers={"Authorization": f"Token {label_studio.token}"},
        timeout=10,
    )
    if response.status_code == 409:  # one PAT per user: a previous test made it
        pytest.skip("this user already has a personal access token (Label Studio allows one)")
    assert response.status_code in (200, 201), response.text
    pat = response.json()["token"]
    tasks, _ = pull_export(label_studio.url, pat, project.id)
    assert len(tasks) > 0
    with pytest.raises(ExportError, match="LS_RLHF_LABEL_STUDIO_API_KEY"):
        pull_export(label_studio.url, "wrong-token-123456", project.id)
    with pytest.raises(ExportError, match="does not exist"):
        pull_export(label_studio.url, label_studio.token, 999999)


def test_export_and_train_reward_commands_against_the_server(
    finegrained_path, make_project, ls_client, label_studio, settings, monkeypatch, tmp_path
):
    project = make_project("ranking")
    ls_client.projects.import_tasks(
        id=project.id,
        request=to_label_studio_tasks(load_finegrained(finegrained_path)[:30], "ranking"),
    )
    for key, value in {
        "LS_RLHF_HOME": str(settings.home),
        "LS_RLHF_REWARD_BACKBONE": settings.reward_backbone,
        "LS_RLHF_LABEL_STUDIO_URL": label_studio.url,
        "LS_RLHF_LABEL_STUDIO_API_KEY": label_studio.token,
    }.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "export.json"
    assert (
        cli(
            [
                "export",
                "--project",
                str(project.id),
                "--out",
                str(out),
                "--datasets",
                str(tmp_path / "ds"),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "ds" / "summary.json").read_text())
    assert summary["records"]["Ranking"] == 30 and summary["datasets"]["preference"] == 30 * 6
    assert len(json.loads(out.read_text())) == 30

    assert (
        cli(
            [
                "train",
                "reward",
                "--project",
                str(project.id),
                "--max-steps",
                "3",
                "--max-length",
                "128",
            ]
        )
        == 0
    )
    version = Registry(settings.registry_dir).current("reward")
    assert version is not None and version.metadata["metrics"]["train_pairs"] > 0
    assert version.metadata["data"]["source"] == f"project {project.id}"

    assert (
        cli(
            [
                "train",
                "reward",
                "--dataset",
                str(tmp_path / "ds" / "preference"),
                "--max-steps",
                "2",
                "--promote",
                "never",
            ]
        )
        == 0
    )
    assert [v.name for v in Registry(settings.registry_dir).versions("reward")] == ["v1", "v2"]
    assert Registry(settings.registry_dir).current("reward").name == "v1"
