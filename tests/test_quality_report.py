"""`ls-rlhf report` against a real Label Studio: three annotators (users made through its API)
whose labels are known, so every figure is checked against a value computed by hand."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import requests
from conftest import add_reward_version
from markdown_tables import rows_outside_tables, tables
from test_uncertainty_sampling import add_different_reward_version

from ml_backend.cli import main as cli

pytestmark = pytest.mark.label_studio

L, R = "left", "right"
# Per task: the three annotators' sides (A, B, C), and the suggestion shown with its score;
# None: the anchoring guard withheld it.
LABELS = [
    ((L, L, L), (L, 0.92)),
    ((L, L, R), (L, 0.75)),
    ((R, R, R), (L, 0.65)),
    ((L, R, L), (R, 0.96)),
    ((L, L, L), (None, None)),
    ((R, R, L), (None, None)),
]
VERSION = "policy-base+reward-v1"
UNCHANGED = {(0, 0), (1, 1)}  # (task, annotator) submitted as the prediction pre-filled them


def pairwise(side: str, origin: str | None = None) -> list[dict]:
    result = {
        "from_name": "comparison",
        "to_name": "comparison",
        "type": "pairwise",
        "value": {"selected": side},
    }
    return [{**result, "origin": origin} if origin else result]


@pytest.fixture
def annotators(label_studio):
    """Three annotator accounts (made once per session: emails are unique)."""
    headers = {"Authorization": f"Token {label_studio.token}"}
    ids = []
    for name in ("ann-a", "ann-b", "ann-c"):
        email = f"{name}@example.com"
        listed = requests.get(f"{label_studio.url}/api/users/", headers=headers, timeout=30).json()
        found = [u["id"] for u in listed if u["email"] == email]
        if not found:
            made = requests.post(
                f"{label_studio.url}/api/users/",
                headers=headers,
                json={"email": email, "username": name, "first_name": name},
                timeout=30,
            )
            made.raise_for_status()
            found = [made.json()["id"]]
        ids.append(found[0])
    return ids


def annotate(ls_client, project_id: int, annotators: list[int], labels=LABELS) -> list[int]:
    tasks = [
        {
            "data": {"prompt": f"Question {i}?", "answer1": f"first {i}", "answer2": f"second {i}"},
            "predictions": [
                # As the backend writes them: a withheld suggestion has no result, no score.
                {"result": pairwise(shown), "score": score, "model_version": VERSION}
                if shown
                else {"result": [], "model_version": VERSION}
            ],
        }
        for i, (_, (shown, score)) in enumerate(labels)
    ]
    ids = ls_client.projects.import_tasks(
        id=project_id, request=tasks, return_task_ids=True
    ).task_ids
    time.sleep(0.05)  # the annotations come after the predictions they were shown
    for t, (task_id, (sides, _)) in enumerate(zip(ids, labels, strict=True)):
        (prediction,) = ls_client.predictions.list(task=task_id)
        for a, (user, side) in enumerate(zip(annotators, sides, strict=True)):
            unchanged = (t, a) in UNCHANGED
            ls_client.annotations.create(
                id=task_id,
                result=pairwise(side, "prediction" if unchanged else "manual"),
                completed_by=user,
                parent_prediction=prediction.id if unchanged else None,
                ground_truth=False,
            )
    return ids


def test_report_figures_match_hand_computed_values(
    settings,
    make_project,
    ls_client,
    label_studio,
    annotators,
    tiny_reward_backbone_dir,
    monkeypatch,
    tmp_path,
    output_dir,
):
    # float32: bfloat16 scores move with a batch's padding, and the check scores in other batches.
    settings = settings.replace(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token, dtype="float32"
    )
    for key, value in settings.to_env(base={}).items():
        monkeypatch.setenv(key, value)
    # A head redrawn so the answers' rewards are clearly apart (the untrained one nearly ties,
    # and a near tie could fall either way with a batch's padding).
    old = add_different_reward_version(settings, tiny_reward_backbone_dir, seed=5)
    time.sleep(1.1)  # versions are stamped to the second
    project = make_project("pairwise")
    ids = annotate(ls_client, project.id, annotators)
    time.sleep(1.1)
    new = add_reward_version(settings, tiny_reward_backbone_dir)

    out = output_dir / "report"
    assert cli(["report", "--project", str(project.id), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    approx = pytest.approx

    assert (report["tasks"], report["annotations"], report["annotators"]) == (6, 18, 3)
    (control,) = report["agreement"]
    # 12 of 18 annotator pairs agree; alpha by hand: D_o = 6/18 (three 2-1 splits, 4/2 each),
    # D_e = 2*11*7/(18*17) with 11 lefts and 7 rights, alpha = 1 - D_o/D_e = 1 - 306/462.
    assert control["control"] == "comparison" and control["units"] == 6
    assert control["pairwise_agreement"] == approx(12 / 18)
    assert control["alpha"] == approx(1 - 306 / 462)

    rows = {row["annotator"]: row for row in report["per_annotator"]}
    a, b, c = (rows[str(u)] for u in annotators)
    # Leave-one-out majority (a 1-1 split of the other two is skipped): A 3/3, B 3/4, C 3/5.
    assert (a["majority_agreement"], a["majority_compared"]) == (approx(1.0), 3)
    assert (b["majority_agreement"], b["majority_compared"]) == (approx(0.75), 4)
    assert (c["majority_agreement"], c["majority_compared"]) == (approx(0.6), 5)
    # Left choices: A 4 of 6, B 3 of 6, C 4 of 6; two-sided binomial p: 44/64 and 1.
    assert (a["first_choices"], a["choices"], a["position_p_value"]) == (4, 6, approx(44 / 64))
    assert (b["first_choices"], b["position_p_value"]) == (3, approx(1.0))
    assert (c["first_choices"], c["position_p_value"]) == (4, approx(44 / 64))
    assert all(row["annotations"] == 6 for row in rows.values())

    # Suggestions shown on the first four tasks: 12 labels, 6 equal to it, 2 unchanged.
    assert report["suggestions_shown"] == 12
    assert report["suggestion_equal_share"] == approx(0.5)
    assert report["suggestion_unchanged_share"] == approx(2 / 12)
    bins = {round(p["low"], 1): p for p in report["reliability"]}
    assert (bins[0.6]["labels"], bins[0.6]["agreed"]) == (3, approx(0.0))
    assert (bins[0.7]["labels"], bins[0.7]["agreed"]) == (3, approx(2 / 3))
    assert (bins[0.9]["labels"], bins[0.9]["agreed"], bins[0.9]["confidence"]) == (
        6,
        approx(4 / 6),
        approx(0.94),
    )
    assert bins[0.5]["labels"] == bins[0.8]["labels"] == 0
    assert report["calibration_error"] == approx(
        3 / 12 * 0.65 + 3 / 12 * (0.75 - 2 / 3) + 6 / 12 * (0.94 - 4 / 6)
    )
    # Anchoring: with the majority on 6 of 8 shown labels, 3 of 4 withheld ones.
    assert (report["compared_shown"], report["majority_agreement_shown"]) == (8, approx(0.75))
    assert (report["compared_withheld"], report["majority_agreement_withheld"]) == (4, approx(0.75))

    # Live accuracy: the old version on all 18 labels (made after it), by its own scores.
    from training.reward import RewardModel

    model = RewardModel.load(old.path)
    tasks = [ls_client.tasks.get(id=i) for i in ids]
    first = model.score([t.data["prompt"] for t in tasks], [t.data["answer1"] for t in tasks])
    second = model.score([t.data["prompt"] for t in tasks], [t.data["answer2"] for t in tasks])
    assert min(abs(f - s) for f, s in zip(first, second, strict=True)) > 1e-3
    # A tie is wrong, as in reward_eval's accuracy.
    model_side = [L if f > s else R if s > f else None for f, s in zip(first, second, strict=True)]
    right = sum(side == model_side[t] for t, (sides, _) in enumerate(LABELS) for side in sides)
    versions = {v["version"]: v for v in report["versions"]}
    assert versions[old.label]["fresh_pairs"] == 18
    assert versions[old.label]["live_accuracy"] == approx(right / 18)
    assert versions[new.label]["fresh_pairs"] == 0 and versions[new.label]["live_accuracy"] is None

    # The Markdown renders: its tables are tables, its plots are files beside it.
    markdown = (out / "report.md").read_text()
    assert rows_outside_tables(markdown) == []
    rendered = tables(markdown)
    agreement_table = next(t for t in rendered if "Krippendorff's alpha" in t[0])
    assert agreement_table[1][:3] == ["comparison", "nominal", "6"]
    assert agreement_table[1][3] == f"{1 - 306 / 462:.3f}"
    for png in ("reliability.png", "annotators.png", "versions.png"):
        assert f"]({png})" in markdown and (out / png).stat().st_size > 1000
    # The anchoring check names no missing figure: both sides were measured.
    assert not any("anchoring" in reason for reason in report["cannot"])

    # The headline figures are gauges on the backend's /metrics (reports in its state folder).
    shutil.copytree(out, settings.state_dir / "reports" / f"project-{project.id}")
    metrics = metrics_text(settings)
    alpha = (
        f'ls_rlhf_report_krippendorff_alpha{{report="project-{project.id}",control="comparison"}}'
    )
    assert f"{alpha} {1 - 306 / 462}" in metrics.splitlines()
    assert f'ls_rlhf_report_suggestion_equal_share{{report="project-{project.id}"}} 0.5' in metrics


def metrics_text(settings) -> str:
    from ml_backend.app import create_app

    app = create_app(settings, load_models=False, start_worker=False)
    answer = app.test_client().get("/metrics")
    assert answer.status_code == 200
    return answer.get_data(as_text=True)


def test_report_says_what_it_cannot_compute(
    settings, make_project, ls_client, label_studio, annotators, monkeypatch, tmp_path, capsys
):
    settings = settings.replace(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token
    )
    for key, value in settings.to_env(base={}).items():
        monkeypatch.setenv(key, value)

    # No annotations at all.
    empty = make_project("pairwise")
    ls_client.projects.import_tasks(
        id=empty.id, request=[{"data": {"prompt": "q", "answer1": "a", "answer2": "b"}}]
    )
    assert cli(["report", "--project", str(empty.id), "--out", str(tmp_path / "empty")]) == 0
    report = json.loads((tmp_path / "empty" / "report.json").read_text())
    assert report["tasks"] == 1 and report["annotations"] == 0
    assert any("no annotation" in reason for reason in report["cannot"])
    assert "not computed: no annotation" in capsys.readouterr().out

    # One annotator: no agreement, but acceptance and position bias are still there.
    alone = make_project("pairwise")
    one = [((sides[0],), shown) for sides, shown in LABELS]
    annotate(ls_client, alone.id, annotators[:1], one)
    assert cli(["report", "--project", str(alone.id)]) == 0  # into the state folder
    folder = settings.state_dir / "reports" / f"project-{alone.id}"
    report = json.loads((folder / "report.json").read_text())
    assert any("only one annotator" in reason for reason in report["cannot"])
    assert report["agreement"][0]["alpha"] is None and report["agreement"][0]["units"] == 0
    (row,) = report["per_annotator"]
    assert row["majority_agreement"] is None and row["first_choices"] == 4
    # A's labels on the four shown tasks: L=L, L=L, R!=L, L!=R.
    assert report["suggestion_equal_share"] == pytest.approx(0.5)
    markdown = (folder / "report.md").read_text()
    assert "only one annotator" in markdown and rows_outside_tables(markdown) == []
    metrics = metrics_text(settings)
    assert f'ls_rlhf_report_suggestion_equal_share{{report="project-{alone.id}"}} 0.5' in metrics
    assert "krippendorff" not in metrics  # not computed, so not shown

    # A config the report does not know (from an export file): counts only, and why.
    export = tmp_path / "export.json"
    export.write_text(json.dumps([{"id": 1, "data": {"image": "x.png"}, "annotations": [{}]}]))
    config = tmp_path / "image.xml"
    config.write_text(
        '<View><Image name="img" value="$image"/><Choices name="kind" toName="img">'
        '<Choice value="cat"/></Choices></View>'
    )
    out = tmp_path / "unknown"
    assert cli(["report", "--export", str(export), "--config", str(config), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == 1 and report["annotations"] == 1
    assert report["cannot"] and "fits no kind" in report["cannot"][0]


def test_live_accuracy_judges_the_projects_own_lineage(
    settings,
    make_project,
    ls_client,
    label_studio,
    annotators,
    tiny_reward_backbone_dir,
    monkeypatch,
    tmp_path,
):
    """With several projects, the report of a project that has no reward version of its own
    does not measure the registry root's (another project's) versions on its labels."""
    settings = settings.replace(
        label_studio_url=label_studio.url, label_studio_api_key=label_studio.token
    )
    for key, value in settings.to_env(base={}).items():
        monkeypatch.setenv(key, value)
    add_reward_version(settings, tiny_reward_backbone_dir)
    project = make_project("pairwise")
    (settings.registry_dir / "PROJECT").write_text(f"{project.id + 1000}\n")  # another owner
    annotate(ls_client, project.id, annotators)
    time.sleep(1.1)
    add_reward_version(settings, tiny_reward_backbone_dir)  # the root's v2, after the labels
    out = tmp_path / "report"
    assert cli(["report", "--project", str(project.id), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["versions"] == []
    assert "live accuracy: no reward version in the registry" in report["cannot"]
