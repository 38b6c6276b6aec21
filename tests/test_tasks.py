"""Prompts files and task layout for each label config."""

from __future__ import annotations

import pytest

import label_configs
from ml_backend.cli import main as cli
from ml_backend.tasks import PromptFileError, completions_needed, read_prompts, task_data
from training.label_config import read_schema


def test_prompts_from_jsonl_csv_and_text(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": " b "}\n')
    (tmp_path / "p.csv").write_text('id,prompt\n1,"x, with comma"\n2,y\n')
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert read_prompts(tmp_path / "p.jsonl") == ["a", "b"]
    assert read_prompts(tmp_path / "p.csv") == ["x, with comma", "y"]
    assert read_prompts(tmp_path / "p.txt") == ["first", "second"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", '{"prompt": "a"}\n{oops\n', "bad.jsonl:2: not JSON"),
        ("bad2.jsonl", '{"text": "a"}\n', 'needs a "prompt" string'),
        ("bad.csv", "text\nhello\n", "'prompt' column"),
        ("empty.txt", "\n\n", "holds no prompts"),
    ],
)
def test_bad_prompts_file_says_what_is_expected(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(PromptFileError, match=message):
        read_prompts(tmp_path / name)


def test_missing_prompts_file_is_one_clear_line(tmp_path, capsys):
    assert cli(["generate", "--project", "1", "--prompts", str(tmp_path / "none.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ls-rlhf generate: error:") and "does not exist" in err
    assert "Traceback" not in err


def test_missing_api_key_names_the_setting(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LS_RLHF_LABEL_STUDIO_API_KEY", "")
    (tmp_path / "p.txt").write_text("hello\n")
    assert cli(["generate", "--project", "1", "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "LS_RLHF_LABEL_STUDIO_API_KEY" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "k", "expected_keys"),
    [
        ("pairwise", 2, {"prompt", "answer1", "answer2"}),
        ("ranking", 4, {"prompt", "items"}),
        ("rating", 2, {"prompt", "answer1", "answer2"}),
        ("critique", 1, {"prompt", "answer"}),
        ("demonstration", 0, {"prompt"}),
    ],
)
def test_task_layout_follows_the_config(config, k, expected_keys):
    schema = read_schema(label_configs.load(config))
    assert completions_needed(schema, num_completions=4) == k
    data = task_data(schema, "Q?", [f"ans {i}" for i in range(k)], "policy-base")
    assert set(data) == expected_keys | {"policy_version"}
    if config == "ranking":
        assert [item["id"] for item in data["items"]] == ["a1", "a2", "a3", "a4"]
