"""The anchoring guard: on a drawn, stable share of tasks the prediction suggests nothing (no
choice, ranking, confidence or reward scores), and the report counts those tasks as withheld."""

from __future__ import annotations

import pytest
from conftest import add_reward_version
from test_protocol import make_client, pairwise_task, predict, ranking_task

from ml_backend.results import WITHHELD_TEXT, suggestion_withheld
from training.settings import Settings, SettingsError


@pytest.mark.parametrize("config", ["pairwise", "ranking"])
def test_withheld_tasks_show_no_suggestion(settings, tiny_reward_backbone_dir, config):
    settings = settings.replace(withhold_suggestion_share=0.4, seed=3)
    add_reward_version(settings, tiny_reward_backbone_dir)
    client, _ = make_client(settings)
    make = pairwise_task if config == "pairwise" else ranking_task
    tasks = [make(tid) for tid in range(1, 31)]
    first = predict(client, tasks, config).get_json()["results"]
    again = predict(client, tasks, config).get_json()["results"]
    withheld = {tid for tid in range(1, 31) if suggestion_withheld(tid, 0.4, 3)}
    assert 4 <= len(withheld) <= 20  # a share of 0.4 of 30, drawn
    for tid, item, repeat in zip(range(1, 31), first, again, strict=True):
        types = [r["type"] for r in item["result"]]
        texts = [r["value"]["text"][0] for r in item["result"] if r["type"] == "textarea"]
        if tid in withheld:
            assert "score" not in item and types == ["textarea"], item
            assert texts == [WITHHELD_TEXT]  # no reward scores either
        else:
            assert {"pairwise" if config == "pairwise" else "ranker", "textarea"} <= set(types)
            assert 0.5 <= item["score"] <= 1 and texts[0].startswith("Reward (")
        assert ("score" in item) == ("score" in repeat)  # a task stays on its side


def test_off_by_default_and_a_bad_share_is_refused(settings, tiny_reward_backbone_dir):
    add_reward_version(settings, tiny_reward_backbone_dir)
    client, _ = make_client(settings)
    items = predict(client, [pairwise_task(t) for t in range(1, 21)]).get_json()["results"]
    assert all("score" in item for item in items)
    with pytest.raises(SettingsError, match="WITHHOLD_SUGGESTION_SHARE"):
        Settings.from_env({"LS_RLHF_WITHHOLD_SUGGESTION_SHARE": "1.5"})
