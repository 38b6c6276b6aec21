"""Answers cut at the generation token limit are marked as cut: generation says which
completions ran to `max_new_tokens` without an end-of-sequence token, tasks carry it per
answer ("truncated" and the "<field>_cut" note) and the labeling UI shows the note under
that answer only. Checked in headless Chromium, screenshots in test-output/."""

from __future__ import annotations

import time

import pytest
from playwright.sync_api import expect
from test_labeling_ui import page  # noqa: F401 - the Chromium fixture
from tiny_models import build_steered_policy

import label_configs
from ml_backend.serving import Served
from ml_backend.tasks import cut_note, make_tasks, task_data
from training.generation import generate_completions
from training.label_config import read_schema
from training.models import load_causal_lm

PROMPTS = ["What is the capital of France?", "Why is the sky blue?"]


def _generate(model, tokenizer, max_new_tokens):
    truncated: list[list[bool]] = []
    texts = generate_completions(
        model,
        tokenizer,
        PROMPTS,
        num_completions=1,
        max_new_tokens=max_new_tokens,
        temperature=0,
        batch_size=2,
        truncated=truncated,
    )
    return texts, truncated


def test_generation_says_which_answers_the_limit_cut(tiny_policy_dir):
    model, tokenizer = load_causal_lm(str(tiny_policy_dir))
    # The tiny random policy does not choose its end token within four greedy tokens.
    texts, truncated = _generate(model, tokenizer, 4)
    assert truncated == [[True], [True]]
    # Make the first prompt's greedy first token the end-of-sequence token: that answer
    # now ends by itself after one token (in the same batch as one that runs on).
    (token,) = tokenizer(texts[0][0], add_special_tokens=False)["input_ids"][:1]
    model.generation_config.eos_token_id = token
    again, truncated = _generate(model, tokenizer, 4)
    assert truncated == [[False], [True]], (texts, again)
    assert again[1] == texts[1]
    # Without the list the call answers as before.
    assert (
        generate_completions(
            model, tokenizer, PROMPTS, num_completions=1, max_new_tokens=4, temperature=0
        )
        == again
    )


@pytest.mark.parametrize("config", ["pairwise", "ranking", "rating", "critique"])
def test_tasks_carry_the_cut_per_answer(config, tiny_policy_dir, settings, tmp_path):
    schema = read_schema(label_configs.load(config))
    settings = settings.replace(max_new_tokens=4, num_completions=3)
    note = cut_note(4)
    assert "cut at 4 tokens" in note

    def tasks(folder):
        model, tokenizer = load_causal_lm(str(folder))
        served = Served(model, tokenizer, None, None, None, time.time())
        return make_tasks(PROMPTS, schema, served, settings), tokenizer

    # The tiny policy runs on to the limit; one steered to its end token ends at once.
    cut, tokenizer = tasks(tiny_policy_dir)
    ended, _ = tasks(build_steered_policy(tmp_path / "ends", tokenizer.eos_token, 0.9999))
    for data in cut:
        k = len(data["truncated"])
        assert k == (3 if schema.list_field else len(schema.answer_fields))
        assert data["truncated"] == [True] * k
    assert all(data["truncated"] == [False] * k for data in ended)
    if schema.list_field:
        assert all(item["truncated"] and item["title"].endswith(note) for item in cut[0]["items"])
        assert [item["title"] for item in ended[0]["items"]] == ["Answer 1", "Answer 2", "Answer 3"]
    else:
        for field in schema.answer_fields:
            assert cut[0][f"{field}_cut"] == note and ended[0][f"{field}_cut"] == ""
            # The config shows the note under the answer.
            assert f'value="${field}_cut"' in label_configs.load(config)


@pytest.mark.label_studio
@pytest.mark.browser
@pytest.mark.parametrize("config", ["pairwise", "rating"])
def test_the_cut_answer_is_marked_in_chromium(
    config,
    page,  # noqa: F811 - the fixture imported from test_labeling_ui
    make_project,
    ls_client,
    label_studio,
    output_dir,
):
    schema = read_schema(label_configs.load(config))
    cut = task_data(
        schema,
        "Tell me about the river Seine.",
        ["The Seine flows through Paris to the sea.", "The Seine is a river that runs from"],
        "policy-base",
        truncated=[False, True],
        max_new_tokens=64,
    )
    # A task imported without the notes (the user's own data): nothing is shown, no "undefined".
    plain = {"prompt": "Name a colour.", "answer1": "Blue.", "answer2": "Green."}
    project = make_project(config)
    ls_client.projects.import_tasks(id=project.id, request=[{"data": cut}, {"data": plain}])
    ids = {t.data["prompt"]: t.id for t in ls_client.tasks.list(project=project.id)}

    page.goto(f"{label_studio.url}/projects/{project.id}/data?task={ids[cut['prompt']]}")
    labeling = page.locator(".lsf-main-view")  # not the data manager's table beside it
    note = labeling.get_by_text(cut_note(64))
    # Label Studio re-renders the labeling view once its data manager has loaded (the URL
    # gains &tab=N): count only after that, and with a retrying assertion.
    page.get_by_test_id("bottombar-submit-button").wait_for(timeout=60_000)
    page.wait_for_load_state("networkidle")
    expect(note).to_have_count(1, timeout=30_000)  # under B only
    a = labeling.get_by_text(cut["answer1"]).first.bounding_box()
    b = labeling.get_by_text(cut["answer2"]).first.bounding_box()
    shown = note.first.bounding_box()
    # In B's frame (right of A), below B's text.
    assert a and b and shown, (a, b, shown)
    assert shown["x"] >= a["x"] + a["width"] and shown["y"] >= b["y"] + b["height"] - 1
    page.get_by_test_id("bottombar-submit-button").wait_for(timeout=60_000)
    page.wait_for_load_state("networkidle")
    page.screenshot(path=str(output_dir / f"{config}-cut-answer.png"))

    page.goto(f"{label_studio.url}/projects/{project.id}/data?task={ids[plain['prompt']]}")
    labeling.get_by_text("Green.").first.wait_for(timeout=60_000)
    shown_text = labeling.inner_text()
    assert "Blue." in shown_text
    assert "undefined" not in shown_text and "cut at" not in shown_text
