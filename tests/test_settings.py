"""`ls-rlhf settings --markdown` renders as the README's table; `LS_RLHF_REPORT_TO` is read and checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from markdown_tables import inline_html, rows_outside_tables, tables

from ml_backend.cli import main as cli
from training.policy import machine_args
from training.settings import Settings, SettingsError, describe, report_to

README = Path(__file__).resolve().parents[1] / "README.md"


def test_settings_markdown_renders_as_the_readme_table(capsys):
    assert cli(["settings", "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert rows_outside_tables(printed) == []
    (table,) = tables(printed)
    assert table[0] == ["variable", "default", "meaning"]
    assert [row[0] for row in table[1:]] == [f"`{name}`" for name, _, _ in describe()]
    assert all(len(row) == 3 for row in table)
    # Nothing in a cell is taken for HTML (a `<secret>` would vanish from the page).
    assert inline_html(printed) == []
    readme = README.read_text()
    assert table in tables(readme), (
        "README's settings table differs: paste `ls-rlhf settings --markdown`"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("none", []),
        ("tensorboard", ["tensorboard"]),
        ("tensorboard, trackio", ["tensorboard", "trackio"]),
        ("all", ["all"]),
    ],
)
def test_report_to_gives_the_trainers_list(value, expected):
    assert report_to(Settings.from_env({"LS_RLHF_REPORT_TO": value})) == expected


def test_report_to_defaults_to_none_and_refuses_what_transformers_cannot_do(monkeypatch):
    monkeypatch.delenv("LS_RLHF_REPORT_TO", raising=False)
    assert Settings().report_to == "none" and report_to() == []
    with pytest.raises(SettingsError, match="LS_RLHF_REPORT_TO names tensorbored"):
        report_to(Settings.from_env({"LS_RLHF_REPORT_TO": "tensorbored"}))
    for bad in ("none,tensorboard", "tensorboard,", "all,wandb"):
        with pytest.raises(SettingsError, match="LS_RLHF_REPORT_TO must be"):
            Settings.from_env({"LS_RLHF_REPORT_TO": bad})


def test_trl_arguments_take_report_to_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LS_RLHF_REPORT_TO", "trackio")
    assert machine_args(tmp_path)["report_to"] == ["trackio"]
    explicit = Settings.from_env({"LS_RLHF_REPORT_TO": "wandb,mlflow"})
    assert machine_args(tmp_path, explicit)["report_to"] == ["wandb", "mlflow"]
