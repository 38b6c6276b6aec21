"""The pairwise labeling UI: answers side by side in frames A and B, a tie / "both bad" answer
with keys shown, parsed into ties. Checked in headless Chromium, screenshots in test-output/."""

from __future__ import annotations

import time

import pytest
from test_labeling_ui import page  # noqa: F401 - the Chromium fixture

import label_configs
from training.export import pull_export
from training.feedback import Comparison, parse_export
from training.label_config import read_schema
from training.quality import control_values

pytestmark = [pytest.mark.label_studio, pytest.mark.browser]

TASK = {
    "prompt": "What is the capital of France?",
    "answer1": "Paris is the capital of France, on the river Seine.",
    "answer2": "I think it is Lyon, but I am not sure.",
}


def test_tie_choice_overrides_a_side_and_parses_as_a_tie():
    schema = read_schema(label_configs.load("pairwise"))
    assert schema.tie_choices == "verdict"
    side = {
        "from_name": "comparison",
        "to_name": "comparison",
        "type": "pairwise",
        "value": {"selected": "left"},
    }
    tie = {
        "from_name": "verdict",
        "to_name": "prompt",
        "type": "choices",
        "value": {"choices": ["both bad"]},
    }
    task = {
        "id": 1,
        "data": TASK,
        "annotations": [{"id": 1, "result": [side, tie]}, {"id": 2, "result": [side]}],
    }
    parsed = parse_export([task], label_configs.load("pairwise"))
    first, second = parsed.of_type(Comparison)
    assert first.source.annotation_id == 1 and first.preferred is None
    assert second.preferred == 0 and not parsed.problems
    assert control_values([side, tie], schema) == {"comparison": ("tie: both bad", None)}


def test_answers_side_by_side_and_the_tie_key_in_chromium(
    page,  # noqa: F811 - the fixture imported from test_labeling_ui
    make_project,
    ls_client,
    label_studio,
    output_dir,
):
    project = make_project("pairwise")
    ls_client.projects.import_tasks(id=project.id, request=[{"data": TASK}])
    (task,) = ls_client.tasks.list(project=project.id)
    page.goto(f"{label_studio.url}/projects/{project.id}/data")
    page.get_by_role("button", name="Label All Tasks").click()
    page.get_by_text(TASK["answer1"]).first.wait_for(timeout=60_000)
    a = page.get_by_text(TASK["answer1"]).first.bounding_box()
    b = page.get_by_text(TASK["answer2"]).first.bounding_box()
    # Side by side: B starts to the right of A, on the same line.
    assert a and b and b["x"] >= a["x"] + a["width"] and abs(a["y"] - b["y"]) < 40, (a, b)
    body = page.inner_text("body")
    for words in ("A", "B", "tie", "both bad", "Ctrl+Enter submits"):
        assert words in body.split("\n") or words in body, words
    page.screenshot(path=str(output_dir / "pairwise-side-by-side.png"))
    page.keyboard.press("t")
    page.screenshot(path=str(output_dir / "pairwise-tie-pressed.png"))
    page.get_by_test_id("bottombar-submit-button").click()
    deadline = time.monotonic() + 30
    while not ls_client.annotations.list(id=task.id) and time.monotonic() < deadline:
        time.sleep(0.3)
    tasks, config = pull_export(label_studio.url, label_studio.token, project.id)
    (comparison,) = parse_export(tasks, config).of_type(Comparison)
    assert comparison.preferred is None  # the "t" key gave a tie


def test_rating_answers_side_by_side_in_chromium(
    page,  # noqa: F811 - the fixture imported from test_labeling_ui
    make_project,
    ls_client,
    label_studio,
    output_dir,
):
    project = make_project("rating")
    ls_client.projects.import_tasks(id=project.id, request=[{"data": TASK}])
    page.goto(f"{label_studio.url}/projects/{project.id}/data")
    page.get_by_role("button", name="Label All Tasks").click()
    page.get_by_text(TASK["answer1"]).first.wait_for(timeout=60_000)
    a = page.get_by_text(TASK["answer1"]).first.bounding_box()
    b = page.get_by_text(TASK["answer2"]).first.bounding_box()
    assert a and b and b["x"] >= a["x"] + a["width"] and abs(a["y"] - b["y"]) < 40, (a, b)
    # Each answer's criteria sit under it: two of each.
    assert page.get_by_text("Helpful", exact=True).count() == 2
    assert "Ctrl+Enter submits" in page.inner_text("body")  # the keys are shown
    page.screenshot(path=str(output_dir / "rating-side-by-side.png"))
