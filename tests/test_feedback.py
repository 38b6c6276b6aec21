"""Every result type of the label configs becomes the right feedback record."""

from __future__ import annotations

import pytest

import label_configs
from training.datasets import preference_votes
from training.feedback import (
    Comparison,
    Critique,
    Demonstration,
    Flag,
    Ranking,
    Rating,
    Source,
    parse_export,
)


def task(tid, data, *annotations, predictions=()):
    return {
        "id": tid,
        "data": data,
        "annotations": list(annotations),
        "predictions": list(predictions),
    }


def ann(aid, *results, user=1, cancelled=False, origin="manual"):
    return {
        "id": aid,
        "completed_by": user,
        "was_cancelled": cancelled,
        "result": [{**r, "origin": origin} for r in results],
    }


PAIR = {"prompt": "Q?", "answer1": "A", "answer2": "B"}


def pairwise(selected):
    return {
        "from_name": "comparison",
        "to_name": "comparison",
        "type": "pairwise",
        "value": {"selected": selected},
    }


def test_pairwise_choices_ties_annotators_cancelled_and_accepted_predictions():
    tasks = [
        task(
            1,
            PAIR,
            ann(10, pairwise("left"), user=1),
            ann(11, pairwise("right"), user=2, origin="prediction"),
        ),
        task(2, PAIR, ann(12, pairwise("left"), cancelled=True)),
        task(
            3,
            PAIR,
            ann(
                13,
                {
                    "from_name": "comparison",
                    "to_name": "comparison",
                    "type": "pairwise",
                    "value": {},
                },
            ),
        ),
    ]
    parsed = parse_export(tasks, label_configs.load("pairwise"))
    comparisons = parsed.of_type(Comparison)
    assert [
        (c.answers, c.preferred, c.source.annotation_id, c.source.annotator) for c in comparisons
    ] == [(("A", "B"), 0, 10, 1), (("A", "B"), 1, 11, 2), (("A", "B"), None, 13, 1)]
    assert [c.source.from_prediction for c in comparisons] == [False, True, False]
    assert parsed.cancelled == 1 and parsed.summary()["accepted_predictions"] == 1


def test_the_reward_display_is_ignored_and_the_critique_box_kept():
    scores = {
        "from_name": "reward_scores",
        "to_name": "prompt",
        "type": "textarea",
        "value": {"text": ["Reward ..."]},
    }
    note = {
        "from_name": "critique",
        "to_name": "prompt",
        "type": "textarea",
        "value": {"text": ["B is wrong"]},
    }
    parsed = parse_export(
        [task(1, PAIR, ann(5, pairwise("left"), scores, note))], label_configs.load("pairwise")
    )
    assert [type(r).__name__ for r in parsed.records] == ["Comparison", "Critique"]
    assert parsed.of_type(Critique)[0].feedback == "B is wrong"


def test_ranking_with_and_without_buckets():
    items = [{"id": f"a{i}", "title": "", "body": text} for i, text in enumerate(["x", "y", "z"])]
    data = {"prompt": "Q", "items": items}
    rank = {
        "from_name": "rank",
        "to_name": "answers",
        "type": "ranker",
        "value": {"ranker": {"rank": ["a2", "a0", "a1"]}},
    }
    (ranking,) = parse_export([task(1, data, ann(1, rank))], label_configs.load("ranking")).records
    assert (
        isinstance(ranking, Ranking)
        and ranking.answers == ("z", "x", "y")
        and ranking.buckets == ()
    )

    bucketed = """<View><Text name="prompt" value="$prompt"/><List name="answers" value="$items"/>
      <Ranker name="rank" toName="answers"><Bucket name="best"/><Bucket name="ok"/><Bucket name="biased"/></Ranker></View>"""
    value = {"ranker": {"best": ["a1"], "ok": ["a0"], "biased": ["a2"]}}
    result = {"from_name": "rank", "to_name": "answers", "type": "ranker", "value": value}
    records = parse_export([task(2, data, ann(2, result))], bucketed).records
    (ranking,) = [r for r in records if isinstance(r, Ranking)]
    assert ranking.answers == ("y", "x") and ranking.buckets[0] == ("best", ("y",))
    assert [(f.answer, f.flag) for f in records if isinstance(f, Flag)] == [("z", "biased")]


def test_ratings_and_flags_per_answer():
    data = {"prompt": "Q", "answer1": "A", "answer2": "B"}
    results = [
        {
            "from_name": "helpfulness_answer1",
            "to_name": "answer1",
            "type": "rating",
            "value": {"rating": 4},
        },
        {
            "from_name": "helpfulness_answer2",
            "to_name": "answer2",
            "type": "rating",
            "value": {"rating": 2},
        },
        {
            "from_name": "flags_answer2",
            "to_name": "answer2",
            "type": "choices",
            "value": {"choices": ["biased"]},
        },
    ]
    records = parse_export([task(1, data, ann(1, *results))], label_configs.load("rating")).records
    ratings = [r for r in records if isinstance(r, Rating)]
    assert [(r.answer, r.criterion, r.value, r.max_value) for r in ratings] == [
        ("A", "helpfulness", 4.0, 5.0),
        ("B", "helpfulness", 2.0, 5.0),
    ]
    assert [(f.answer, f.flag) for f in records if isinstance(f, Flag)] == [("B", "biased")]


def test_ratings_keep_the_scale_their_config_declares():
    config = label_configs.load("rating").replace('maxRating="5"', 'maxRating="10"')
    results = [
        {
            "from_name": f"helpfulness_{tag}",
            "to_name": tag,
            "type": "rating",
            "value": {"rating": v},
        }
        for tag, v in (("answer1", 8), ("answer2", 4))
    ]
    data = {"prompt": "Q", "answer1": "A", "answer2": "B"}
    records = parse_export([task(1, data, ann(1, *results))], config).records
    assert [(r.value, r.max_value) for r in records] == [(8.0, 10.0), (4.0, 10.0)]
    # The margin of the preference is the gap on the config's scale: 4 of 10, not 4 of 5.
    assert preference_votes(records) == [("Q", "A", "B", pytest.approx(0.4))]


def test_demonstration_knows_the_model_draft_from_the_prediction():
    draft = {
        "from_name": "answer",
        "to_name": "prompt",
        "type": "textarea",
        "value": {"text": ["model draft"]},
    }
    fixed = {**draft, "value": {"text": ["corrected answer"]}}
    tasks = [task(1, {"prompt": "Q"}, ann(7, fixed, user=3), predictions=[{"result": [draft]}])]
    (demo,) = parse_export(tasks, label_configs.load("demonstration")).records
    assert demo == Demonstration(
        "Q", "corrected answer", "model draft", Source(1, 7, 3, from_prediction=False)
    )


def test_critique_with_rewrite_gives_critique_and_demonstration():
    results = [
        {
            "from_name": "feedback",
            "to_name": "answer",
            "type": "textarea",
            "value": {"text": ["too long"]},
        },
        {
            "from_name": "rewrite",
            "to_name": "answer",
            "type": "textarea",
            "value": {"text": ["short one"]},
        },
    ]
    records = parse_export(
        [task(1, {"prompt": "Q", "answer": "long one"}, ann(1, *results))],
        label_configs.load("critique"),
    ).records
    critique = next(r for r in records if isinstance(r, Critique))
    assert (critique.answer, critique.feedback, critique.refinement) == (
        "long one",
        "too long",
        "short one",
    )
    demo = next(r for r in records if isinstance(r, Demonstration))
    assert (demo.completion, demo.original) == ("short one", "long one")


def test_renamed_tags_work():
    config = """<View><Text name="q" value="$question"/><Text name="l" value="$left_text"/>
      <Text name="r" value="$right_text"/><Pairwise name="which" toName="l,r"/></View>"""
    result = {
        "from_name": "which",
        "to_name": "which",
        "type": "pairwise",
        "value": {"selected": "right"},
    }
    (c,) = parse_export(
        [task(1, {"question": "Q", "left_text": "L", "right_text": "R"}, ann(1, result))], config
    ).records
    assert (c.prompt, c.answers, c.preferred) == ("Q", ("L", "R"), 1)


def test_malformed_and_unknown_results_are_reported_and_the_rest_parsed():
    tasks = [
        task(1, PAIR, ann(1, pairwise("up"))),
        task(2, PAIR, ann(2, {"from_name": "mystery", "type": "polygon", "value": {}})),
        task(3, {"prompt": "Q"}, ann(3, pairwise("left"))),
        task(4, {"text": "no prompt"}, ann(4, pairwise("left"))),
        task(5, PAIR, ann(5, pairwise("left"))),
    ]
    parsed = parse_export(tasks, label_configs.load("pairwise"))
    assert [(p.task_id, p.annotation_id) for p in parsed.problems] == [
        (1, 1),
        (2, 2),
        (3, 3),
        (4, 4),
    ]
    assert "selected must be left or right" in parsed.problems[0].message
    assert "unknown result type 'polygon'" in parsed.problems[1].message
    assert "answer1" in parsed.problems[2].message and "'prompt'" in parsed.problems[3].message
    assert [r.source.task_id for r in parsed.records] == [5]
