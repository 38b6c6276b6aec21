"""`ls-rlhf versions promote`, and `pin`, its old name that scripts may still use."""

from __future__ import annotations

from conftest import add_reward_version

from ml_backend.cli import main
from training.registry import Registry


def test_promote_and_its_old_name_pin_both_serve_the_named_version(
    settings, tiny_reward_backbone_dir, monkeypatch, capsys
):
    monkeypatch.setenv("LS_RLHF_HOME", str(settings.home))
    add_reward_version(settings, tiny_reward_backbone_dir)
    add_reward_version(settings, tiny_reward_backbone_dir)  # v2, promoted on commit
    registry = Registry(settings.registry_dir)
    assert registry.current("reward").name == "v2"

    assert main(["versions", "promote", "reward", "v1"]) == 0
    assert registry.current("reward").name == "v1"
    assert capsys.readouterr().out.strip() == "promoted reward-v1"

    assert main(["versions", "pin", "reward", "v2"]) == 0
    assert registry.current("reward").name == "v2"
    assert capsys.readouterr().out.strip() == "promoted reward-v2"
