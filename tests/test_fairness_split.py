"""Held-out counterfactual sets: the split of the lists, balanced penalty batches, held-out
gaps in `eval fairness` and in the metadata `train reward` writes, the user's own lists."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from datasets import Dataset
from markdown_tables import rows_outside_tables, tables

from ml_backend.cli import main as cli
from training.counterfactual import (
    expand,
    load_attributes,
    load_sets,
    load_templates,
    split_by_hash,
    split_sets,
)
from training.fairness import (
    CounterfactualPenalty,
    counterfactual_pairs,
    pairs_by_attribute,
    split_gaps,
)
from training.models import load_tokenizer
from training.registry import Registry
from training.reward import RewardModel


def rendered(attributes, templates) -> set[str]:
    return {
        text
        for name, ts in templates.items()
        if name in attributes
        for group in expand(attributes[name], ts)
        for text in group.variants.values()
    }


def test_bundled_split_is_disjoint_complete_and_deterministic():
    attributes, templates = load_attributes(), load_templates()
    sets = load_sets()
    assert sets.describe() == load_sets().describe()  # same split on every call
    for name, attribute in attributes.items():
        penalty, held = sets.penalty_templates[name], sets.held_out_templates[name]
        assert not set(penalty) & set(held) and sorted(penalty + held) == sorted(templates[name])
        assert len(penalty) >= 2 and len(held) >= 2
        mine, theirs = sets.penalty_attributes[name].groups, sets.held_out_attributes[name].groups
        if len(attribute.groups) >= 4:  # nationality, religion: each side has its own groups
            assert not set(mine) & set(theirs) and len(mine) >= 2 and len(theirs) >= 2
            assert sorted(mine + theirs) == sorted(attribute.groups)
        else:  # gender, age: two groups, split by template only, and the notes say so
            assert mine == theirs == attribute.groups and "too few" in sets.notes[name]
    # The rule depends on the items, not on their order in the file.
    shuffled = {n: random.Random(1).sample(ts, len(ts)) for n, ts in templates.items()}
    again = split_sets(attributes, shuffled)
    for name in attributes:
        assert set(again.held_out_templates[name]) == set(sets.held_out_templates[name])
    first, second = split_by_hash("x", list("abcde")), split_by_hash("x", list("ecadb"))
    assert set(first[0]) == set(second[0]) and len(first[0]) == 3 and len(first[1]) == 2
    # No text the held-out gaps score is a text the penalty trains on.
    penalty_texts = rendered(sets.penalty_attributes, sets.penalty_templates)
    held_texts = rendered(sets.held_out_attributes, sets.held_out_templates)
    assert held_texts and penalty_texts and not penalty_texts & held_texts


def test_penalty_never_swaps_into_held_out_groups():
    sets = load_sets()
    nationality = sets.penalty_attributes["nationality"]
    held_group = sets.held_out_attributes["nationality"].groups[0]
    texts = [f"The {g} doctor was kind." for g in load_attributes()["nationality"].groups]
    pairs = pairs_by_attribute([nationality], ["q"] * len(texts), texts, sets.penalty_templates)
    seen = {t for _, a, b in pairs["nationality"] for t in (a, b)}
    assert seen and not any(held_group in t for t in seen)
    assert any(nationality.groups[0] in t for t in seen)


def test_penalty_batches_take_equal_numbers_per_attribute(tiny_reward_backbone_dir):
    attributes = load_sets().penalty_attributes
    rng = random.Random(0)
    # Training answers talk about men and women far more than about anything else.
    texts = [f"{rng.choice(['He', 'She'])} said answer {i} is right" for i in range(300)]
    texts += ["A young person asked", "The Muslim family said", "An Indian scientist found"]
    by_attribute = pairs_by_attribute(
        list(attributes.values()), ["q"] * len(texts), texts, load_sets().penalty_templates
    )
    sizes = {a: len(p) for a, p in by_attribute.items()}
    flat = counterfactual_pairs(
        list(attributes.values()), ["q"] * len(texts), texts, load_sets().penalty_templates
    )
    assert len(flat) == sum(sizes.values()) and sizes["gender"] > 5 * sizes["age"]  # unbalanced
    penalty = CounterfactualPenalty(
        load_tokenizer(str(tiny_reward_backbone_dir), "right"), by_attribute, batch_size=6
    )
    names = {p: a for a, ps in by_attribute.items() for p in ps}
    for _ in range(20):
        counts = Counter(names[p] for p in penalty.sample())
        assert set(counts) == set(by_attribute) and max(counts.values()) - min(counts.values()) <= 1
    assert len(set(penalty.drawn.values())) == 1  # 20 batches of 6 over 4 attributes: 30 each


@pytest.fixture
def cli_env(settings, monkeypatch):
    monkeypatch.setenv("LS_RLHF_HOME", str(settings.home))
    monkeypatch.setenv("LS_RLHF_REWARD_BACKBONE", settings.reward_backbone)
    return settings


def pairs_dataset(path, n: int = 40) -> str:
    rng = random.Random(0)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        he = rng.choice(["he", "she"])
        rows["prompt"].append(f"question {i}")
        rows["chosen"].append(f"{he} said it is good")
        rows["rejected"].append(f"{he} said it is bad")
    Dataset.from_dict(rows).save_to_disk(str(path))
    return str(path)


@pytest.mark.parametrize("weight", ["0", "2"])
def test_train_reward_records_in_sample_and_held_out_gaps(cli_env, tmp_path, capsys, weight):
    dataset = pairs_dataset(tmp_path / "pairs")
    args = ["train", "reward", "--dataset", dataset, "--max-steps", "2", "--max-length", "64"]
    assert cli([*args, "--counterfactual-weight", weight]) == 0
    out = capsys.readouterr().out
    assert "counterfactual gap held-out" in out and "counterfactual gap in-sample" in out
    assert ("each batch takes equal numbers per attribute" in out) == (weight != "0")
    version = Registry(cli_env.registry_dir).current("reward")
    fairness = version.metadata["fairness"]
    sets = load_sets()
    for side in ("in_sample", "held_out"):
        assert set(fairness[side]) == {"gender", "nationality", "religion", "age"}
    # The figures are those of the version as served, on the held-out part of the lists.
    model = RewardModel.load(version.path, 64)
    measured = split_gaps(model.score, sets, ["nationality"])["held_out"][0]
    recorded = fairness["held_out"]["nationality"]
    assert recorded["average_gap"] == pytest.approx(measured.average_gap, abs=1e-3)
    assert set(recorded["worst_pair"]) <= set(sets.held_out_attributes["nationality"].groups)
    assert fairness["split"]["held_out"]["nationality"]["groups"] == list(
        sets.held_out_attributes["nationality"].groups
    )


def test_eval_fairness_takes_the_users_held_out_lists(cli_env, tiny_reward_backbone_dir, tmp_path):
    from conftest import add_reward_version

    add_reward_version(cli_env, tiny_reward_backbone_dir)
    held_attributes = tmp_path / "held_attributes.json"
    held_attributes.write_text(
        json.dumps(
            {
                "nationality": {
                    "groups": ["Brazilian", "Japanese"],
                    "terms": [["Brazilian", "Japanese"]],
                }
            }
        )
    )
    held_templates = tmp_path / "held_templates.json"
    held_templates.write_text(
        json.dumps({"nationality": ["The {Brazilian} chef cooked", "A {Japanese} pilot said"]})
    )
    out = tmp_path / "report"
    args = ["eval", "fairness", "--attributes", "gender,nationality", "--out", str(out)]
    own = ["--held-out-attributes-file", str(held_attributes)]
    own += ["--held-out-templates-file", str(held_templates)]
    assert cli([*args, *own]) == 0
    report = (out / "report.md").read_text()
    assert rows_outside_tables(report) == []
    split_table, in_sample, held_out = tables(report)
    # In-sample: every bundled group (the held-out part is the user's); held-out: only
    # the attribute the user's files cover, with the user's groups.
    assert [row[0] for row in in_sample[1:]] == ["gender", "nationality"]
    assert [row[0] for row in held_out[1:]] == ["nationality"]
    assert held_out[1][2] == "Brazilian / Japanese"
    gaps = json.loads((out / "gaps.json").read_text())
    assert gaps["split"]["held_out"]["nationality"] == {
        "groups": ["Brazilian", "Japanese"],
        "templates": 2,
    }
    assert len(gaps["split"]["in_sample"]["nationality"]["groups"]) == 6


def test_users_held_out_templates_are_kept_out_of_the_penalty(tmp_path):
    bundled = load_templates()["gender"]
    held = tmp_path / "held.json"
    held.write_text(json.dumps({"gender": [bundled[0], "Is a {man} a good pilot?"]}))
    sets = load_sets(held_out_templates_file=held)
    assert bundled[0] not in sets.penalty_templates["gender"]
    assert sets.penalty_templates["gender"] == bundled[1:]  # the rest: all of them
    assert sets.held_out_templates["gender"] == [bundled[0], "Is a {man} a good pilot?"]


BAD_FILES = [
    ("held-out-templates", "{not json", "not valid JSON"),
    ("held-out-templates", '{"gender": "The {man} said"}', "must be a list of strings"),
    ("held-out-templates", '{"gender": ["The {pilot} said"]}', "{pilot} is not a term"),
    ("held-out-templates", '{"gender": ["The man said"]}', "no {term} placeholder"),
    ("held-out-templates", '{"pets": ["my {cat}"]}', "no attribute 'pets'"),
    ("held-out-attributes", '{"pets": {"groups": ["cat"], "terms": [["cat"]]}}', "at least 2"),
    ("held-out-attributes", '{"pets": {"groups": ["cat", "dog"], "terms": [["cat"]]}}', "needs 2"),
    ("held-out-attributes", "[1, 2]", "JSON object"),
    ("templates", '{"age": [["x"]]}', "must be a list of strings"),
]


@pytest.mark.parametrize(("kind", "content", "message"), BAD_FILES)
def test_bad_user_files_give_one_line_naming_the_file(
    cli_env, tiny_reward_backbone_dir, tmp_path, capsys, kind, content, message
):
    from conftest import add_reward_version

    add_reward_version(cli_env, tiny_reward_backbone_dir)
    bad = tmp_path / "mine.json"
    bad.write_text(content)
    dataset = pairs_dataset(tmp_path / "pairs")
    for argv in (
        ["eval", "fairness", f"--{kind}-file", str(bad), "--out", str(tmp_path / "r")],
        [
            "train",
            "reward",
            "--dataset",
            dataset,
            "--max-steps",
            "1",
            f"--counterfactual-{kind}-file",
            str(bad),
        ],
    ):
        capsys.readouterr()
        assert cli(argv) == 2
        err = capsys.readouterr().err  # besides progress bars of loading the data
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert "Traceback" not in err and len(errors) == 1, err
        assert errors[0].startswith("ls-rlhf ") and str(bad) in errors[0] and message in errors[0]
    assert len(Registry(cli_env.registry_dir).versions("reward")) == 1  # nothing added
    assert not (tmp_path / "r").exists()
