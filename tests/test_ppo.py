"""PPO: closed-form pieces against hand-computed values, and learning on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch

from training.models import load_causal_lm
from training.ppo import (
    AdaptiveKLController,
    PPOConfig,
    PPOTrainer,
    RunningMoments,
    clipped_policy_loss,
    clipped_value_loss,
    gae,
    kl_estimates,
    leave_one_out_baseline,
    masked_whiten,
    save_policy_version,
)
from training.registry import Registry


def test_gae_by_hand():
    rewards, values = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]])
    # t=2: delta = 1 - 0.5 = 0.5; t=1: delta = 0, A = 0.5*0.5; t=0: A = 0.5*0.25
    assert gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5).tolist() == [
        [0.125, 0.25, 0.5]
    ]
    # The last token is padding: it neither adds reward nor bootstraps a value.
    masked = gae(torch.tensor([[0.0, 1.0, 9.0]]), values, torch.tensor([[1.0, 1.0, 0.0]]), 1.0, 0.5)
    assert masked.tolist() == [[0.25, 0.5, 0.0]]
    discounted = gae(
        torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), gamma=0.9, lam=1.0
    )
    assert discounted.tolist()[0] == pytest.approx([0.9, 1.0])


def test_whitening_by_hand():
    x, mask = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    std = math.sqrt(5 / 3)  # unbiased variance of 1..4 is 5/3; the masked 100 is ignored
    expected = [(v - 2.5) / std for v in (1, 2, 3, 4)] + [0.0]
    assert masked_whiten(x, mask).tolist()[0] == pytest.approx(expected, abs=1e-5)


def test_kl_estimators_by_hand():
    k = kl_estimates(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert k["k1"].item() == pytest.approx(math.log(2))
    assert k["k2"].item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert k["k3"].item() == pytest.approx(0.5 - 1 + math.log(2))


def test_clipping_by_hand():
    old, new, mask = torch.tensor([[0.0]]), torch.tensor([[math.log(1.5)]]), torch.ones(1, 1)
    loss, clipfrac = clipped_policy_loss(new, old, torch.tensor([[1.0]]), mask, cliprange=0.2)
    assert (loss.item(), clipfrac.item()) == (pytest.approx(-1.2), 1.0)  # gain capped at ratio 1.2
    loss, clipfrac = clipped_policy_loss(new, old, torch.tensor([[-1.0]]), mask, cliprange=0.2)
    assert (loss.item(), clipfrac.item()) == (
        pytest.approx(1.5),
        0.0,
    )  # a loss is never clipped away
    value_loss = clipped_value_loss(
        torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), mask, 0.2
    )
    assert value_loss.item() == pytest.approx(0.5 * 0.8**2)


def test_adaptive_kl_controller_by_hand():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    controller.update(current_kl=12.0, n_steps=100)  # error clipped to +0.2
    assert controller.value == pytest.approx(0.1 * 1.02)
    controller.update(current_kl=5.7, n_steps=1000)  # error -0.05
    assert controller.value == pytest.approx(0.1 * 1.02 * 0.95)


def test_running_moments_by_hand():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    moments.update(torch.tensor([10.0]))
    # all four values: mean 4, sample variance ((9 + 4 + 1 + 36) / 3) = 50 / 3
    assert moments.mean == pytest.approx(4.0)
    assert moments.std == pytest.approx(math.sqrt(50 / 3))
    assert moments.normalize(torch.tensor([4.0])).item() == pytest.approx(0.0)


def test_leave_one_out_baseline_by_hand():
    # two prompts, three samples each: each score minus the mean of its two siblings
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    expected = [1 - 4, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0]
    assert leave_one_out_baseline(scores, 3).tolist() == pytest.approx(expected)


def test_config_rejects_settings_that_cannot_run():
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        PPOConfig(batch_size=6, samples_per_prompt=4)
    with pytest.raises(ValueError, match="kl_loss_coef"):
        PPOConfig(kl_loss_coef=-0.1)


def test_rollout_log_probs_and_values_from_generation_match_a_forward_pass(tiny_policy_dir):
    # The rollout takes them from `generate`; training recomputes them with a forward pass.
    # They must agree, or the first PPO ratio is not 1: prompts of different lengths (left
    # padding, absolute positions in the tiny GPT-2) and a temperature make that a test.
    model, tokenizer = load_causal_lm(str(tiny_policy_dir))
    config = PPOConfig(
        batch_size=3,
        samples_per_prompt=1,
        max_new_tokens=10,
        temperature=0.7,
        missing_eos_penalty=0,
    )
    trainer = PPOTrainer(model, tokenizer, letter_e, config)
    torch.nn.init.normal_(trainer.unwrapped.value_head.weight)  # it starts at zero
    prompts = ["hi", "a much longer prompt than the first one, to pad the others", "mid length"]
    r = trainer.rollout(prompts)
    assert r.attention_mask[:, 0].tolist().count(0) == 2  # two rows are left-padded
    with torch.no_grad():
        logits, values = trainer.model(r.input_ids, r.attention_mask, r.response_mask.shape[1])
    q_len = r.input_ids.shape[1] - r.response_mask.shape[1]
    logprobs = trainer._logprobs(logits, r.input_ids[:, q_len:]) * r.response_mask
    torch.testing.assert_close(r.logprobs, logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(r.values, values * r.response_mask, atol=1e-4, rtol=0)


def letter_e(prompts, texts):
    """A known, simple reward: the share of 'e' characters in the response (x5)."""
    return [5 * t.count("e") / max(1, len(t)) for t in texts]


def run(policy_dir, **overrides):
    model, tokenizer = load_causal_lm(str(policy_dir))
    # Classic PPO (one sample per prompt, GAE 0.95, two epochs, the KL in the reward only)
    # unless a test says otherwise: the tests are about these parts, not the defaults.
    settings = {
        "updates": 60,
        "batch_size": 16,
        "samples_per_prompt": 1,
        "mini_batch_size": 8,
        "ppo_epochs": 2,
        "lam": 0.95,
        "kl_loss_coef": 0.0,
        "learning_rate": 1e-3,
        "max_new_tokens": 12,
        "missing_eos_penalty": 0.0,
    }
    config = PPOConfig(**{**settings, **overrides})
    trainer = PPOTrainer(model, tokenizer, letter_e, config)
    history = trainer.train([f"prompt number {i}" for i in range(32)])
    return trainer, history


def mean(values):
    return sum(values) / len(values)


def test_ppo_learns_a_known_reward_with_bounded_kl_and_kl_coefficient_matters(
    tiny_policy_dir, tmp_path
):
    trainer, free = run(
        tiny_policy_dir, init_kl_coef=0.05, adaptive_kl=True, target_kl=4.0, kl_horizon=200
    )
    start, end = (
        mean([h["objective/score"] for h in free[:5]]),
        mean([h["objective/score"] for h in free[-5:]]),
    )
    assert end > 2 * start and end > start + 0.5, (start, end)
    assert all(math.isfinite(h["objective/kl"]) for h in free)
    assert (
        max(h["objective/kl"] for h in free[-10:]) < 60
    )  # bounded: the controller raised the coefficient
    assert free[-1]["objective/kl_coef"] > 0.05
    for key in ("policy/entropy", "policy/clipfrac", "loss/value", "val/explained_variance"):
        assert all(math.isfinite(h[key]) for h in free), key

    _, tight = run(tiny_policy_dir, init_kl_coef=1.0, adaptive_kl=False)
    assert mean([h["objective/kl"] for h in tight[-10:]]) < mean(
        [h["objective/kl"] for h in free[-10:]]
    )

    version = save_policy_version(trainer, Registry(tmp_path / "registry"), {"reward": "letter_e"})
    assert (version.path / "config.json").is_file() and (
        version.path / "training_curves.png"
    ).is_file()
    assert version.metadata["metrics"]["objective/score"] == free[-1]["objective/score"]
    reloaded, _ = load_causal_lm(str(version.path))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for p in trainer.unwrapped.policy.parameters()
    )


def test_the_default_settings_learn_a_known_reward(tiny_policy_dir):
    # Two answers per prompt, lambda 1, one epoch, the KL term in the loss: what
    # `train ppo` runs unless told otherwise (the tiny model needs a larger learning rate).
    model, tokenizer = load_causal_lm(str(tiny_policy_dir))
    config = PPOConfig(
        updates=60, batch_size=16, learning_rate=1e-3, max_new_tokens=12, missing_eos_penalty=0
    )
    history = PPOTrainer(model, tokenizer, letter_e, config).train(
        [f"prompt number {i}" for i in range(32)]
    )
    start = mean([h["objective/score"] for h in history[:5]])
    end = mean([h["objective/score"] for h in history[-5:]])
    assert end > start + 0.3, (start, end)  # about +0.5 measured with two seeds
    assert max(h["objective/kl"] for h in history) < 20


def test_a_kl_term_in_the_loss_keeps_the_policy_closer(tiny_policy_dir):
    # No reward penalty in either run: only the loss's k3 term holds the policy back.
    runs = {
        coef: run(tiny_policy_dir, updates=30, init_kl_coef=0.0, kl_loss_coef=coef)[1]
        for coef in (0.0, 2.0)
    }
    free, held = ([h["objective/kl"] for h in runs[c][-10:]] for c in (0.0, 2.0))
    assert mean(held) < 0.5 * mean(free), (mean(held), mean(free))
    assert "loss/kl" in runs[2.0][-1] and "loss/kl" not in runs[0.0][-1]


def test_ppo_with_a_leave_one_out_baseline_learns(tiny_policy_dir):
    # 4 prompts x 4 samples per rollout: each score relative to its three siblings'
    _, history = run(tiny_policy_dir, samples_per_prompt=4, updates=40)
    start = mean([h["objective/score"] for h in history[:5]])
    end = mean([h["objective/score"] for h in history[-5:]])
    assert end > start + 0.5, (start, end)


def test_lora_trains_adapters_only_and_saves_a_plain_folder(tiny_policy_dir, tmp_path):
    model, tokenizer = load_causal_lm(str(tiny_policy_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = PPOTrainer(
        model,
        tokenizer,
        letter_e,
        PPOConfig(
            updates=3,
            batch_size=4,
            mini_batch_size=2,
            max_new_tokens=6,
            lora_r=4,
            learning_rate=1e-3,
        ),
    )
    trainer.train(["a", "b", "c", "d"])
    version = save_policy_version(trainer, Registry(tmp_path / "registry"), {})
    assert not (version.path / "adapter_config.json").exists()
    merged, _ = load_causal_lm(str(version.path))
    changed = [
        k for k, v in merged.state_dict().items() if k in before and not torch.equal(v, before[k])
    ]
    assert changed  # the merged adapters changed some weights


def test_train_ppo_command_against_a_reward_version(
    settings, tiny_reward_backbone_dir, monkeypatch, tmp_path, capsys
):
    from conftest import add_reward_version

    from ml_backend.cli import main as cli

    add_reward_version(settings, tiny_reward_backbone_dir)
    for key, value in {
        "LS_RLHF_HOME": str(settings.home),
        "LS_RLHF_POLICY_MODEL": settings.policy_model,
    }.items():
        monkeypatch.setenv(key, value)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\nwhat is water\nname a city\n")
    args = [
        "train",
        "ppo",
        "--prompts",
        str(prompts),
        "--updates",
        "2",
        "--batch-size",
        "2",
        "--mini-batch-size",
        "1",
        "--max-new-tokens",
        "4",
    ]
    assert cli(args) == 0
    assert "policy-v1: score" in capsys.readouterr().out
    registry = Registry(settings.registry_dir)
    assert registry.current("policy").metadata["reward_version"] == "reward-v1"
    assert cli([*args, "--from-current", "--no-promote"]) == 0
    assert (
        registry.current("policy").name == "v1"
        and registry.get("policy", "v2").metadata["parent"] == "v1"
    )
    # the fairness penalty wrapped around the reward
    assert cli([*args, "--counterfactual-weight", "1", "--no-promote"]) == 0
    assert cli(["train", "ppo", "--updates", "1"]) == 2  # no prompts: a clear error
    # two samples per prompt and the KL term in the loss through the command, and a batch
    # the samples do not divide
    options = ["--samples-per-prompt", "2", "--ppo-epochs", "1", "--lam", "1"]
    assert cli([*args, *options, "--kl-loss-coef", "0.1", "--no-promote"]) == 0
    v4 = registry.get("policy", "v4")
    assert v4.metadata["config"]["kl_loss_coef"] == 0.1 and "loss/kl" in v4.metadata["metrics"]
    assert cli([*args, "--samples-per-prompt", "3"]) == 2
    assert "multiple of samples_per_prompt" in capsys.readouterr().err
    assert cli([*args, "--lam", "1.5"]) == 2
    assert "within [0, 1]" in capsys.readouterr().err


def test_train_ppo_takes_its_prompts_from_a_label_studio_project(
    settings,
    tiny_reward_backbone_dir,
    label_studio,
    make_project,
    ls_client,
    finegrained_path,
    monkeypatch,
    capsys,
):
    from conftest import add_reward_version

    from ml_backend.cli import main as cli
    from training.finegrained import load_finegrained, to_label_studio_tasks

    add_reward_version(settings, tiny_reward_backbone_dir)
    project = make_project("ranking")
    records = load_finegrained(finegrained_path)[:3]
    ls_client.projects.import_tasks(
        id=project.id, request=to_label_studio_tasks(records, "ranking")
    )
    for key, value in {
        "LS_RLHF_HOME": str(settings.home),
        "LS_RLHF_POLICY_MODEL": settings.policy_model,
    }.items():
        monkeypatch.setenv(key, value)
    args = ["train", "ppo", "--project", str(project.id), "--updates", "1", "--batch-size", "2"]
    args += ["--mini-batch-size", "1", "--max-new-tokens", "4"]
    # The URL and key come from the flags as well as from the settings.
    assert cli([*args, "--url", label_studio.url, "--api-key", label_studio.token]) == 0
    assert "policy-v1: score" in capsys.readouterr().out
    assert Registry(settings.registry_dir).current("policy").metadata["prompts"] == 3
    assert cli([*args, "--url", label_studio.url, "--api-key", "wrong-token-123456"]) == 2
    assert "LS_RLHF_LABEL_STUDIO_API_KEY" in capsys.readouterr().err
