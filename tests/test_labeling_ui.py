"""The labeling UI in headless Chromium shows the backend's suggestion and reward scores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ml_backend.cli import main as cli

pytestmark = [pytest.mark.label_studio, pytest.mark.browser]

CHROMIUM = Path(os.environ.get("LS_RLHF_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def page(label_studio):
    if not CHROMIUM.is_file():
        if os.environ.get("CI"):
            raise RuntimeError(
                f"Chromium not found at {CHROMIUM}: `make setup` installs Debian's chromium"
            )
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{label_studio.url}/user/login/")
        page.fill("input[name=email]", label_studio.username)
        page.fill("input[name=password]", label_studio.password)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        yield page
        browser.close()


@pytest.mark.parametrize("config", ["pairwise", "ranking"])
def test_task_shows_suggestion_and_rewards(
    config, served, page, make_project, ls_client, label_studio, tmp_path, output_dir
):
    backend, model_version = served
    project = make_project(config)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n")
    assert cli(["generate", "--project", str(project.id), "--prompts", str(prompts)]) == 0
    (task,) = ls_client.tasks.list(project=project.id)
    (prediction,) = ls_client.predictions.list(task=task.id)
    shown = next(r for r in prediction.result if r["from_name"] == "reward_scores")["value"][
        "text"
    ][0]

    page.goto(f"{label_studio.url}/projects/{project.id}/data?task={task.id}")
    page.get_by_text("Reward (reward-v1)").first.wait_for(timeout=60_000)
    page.screenshot(path=str(output_dir / f"{config}-task.png"))
    body = page.inner_text("body")
    # The reward of each answer, as the backend computed it, is on screen.
    assert shown.split(": ", 1)[1] in body.replace("\n", " ") or all(
        part in body for part in shown.split(" | ")
    )
    # The prediction tab with the backend's confidence is there.
    assert f"{prediction.score * 100:.2f}%" in body

    if config == "pairwise":
        chosen = prediction.result[0]["value"]["selected"]
        answer = task.data["answer1" if chosen == "left" else "answer2"]
        other = task.data["answer2" if chosen == "left" else "answer1"]
        # The suggested answer carries the config's Pairwise selectionStyle (green border); the
        # other answer does not.
        highlighted = page.evaluate(
            """() => [...document.querySelectorAll('*')]
                .filter(e => getComputedStyle(e).borderTopColor === 'rgb(39, 174, 96)')
                .map(e => e.innerText)"""
        )
        assert any(answer.strip()[:30] in text for text in highlighted), highlighted
        assert not any(
            other.strip()[:30] in text for text in highlighted if answer.strip()[:30] not in text
        )
    else:
        # The UI lists the items in the suggested order (found by their titles: the tiny
        # model's answers may hold characters the page renders differently).
        order = prediction.result[0]["value"]["ranker"]["rank"]
        titles = {item["id"]: item["title"] for item in task.data["items"]}
        # Only the labeling area: the data manager's table on the left lists items in data order.
        labeling = body.split("Drag the answers into order", 1)[1]
        positions = [labeling.find(titles[i]) for i in order]
        assert -1 not in positions and positions == sorted(positions), (order, positions)
    (output_dir / "prediction.json").write_text(json.dumps(prediction.result, indent=2))
