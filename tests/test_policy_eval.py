"""`ls-rlhf eval policy`: reward, win rate and KL of a trained policy against its reference."""

from __future__ import annotations

import json

from markdown_tables import inline_html, rows_outside_tables, tables

from ml_backend.cli import main as cli
from training.models import load_causal_lm
from training.policy_eval import evaluate_policy, sequence_kl
from training.ppo import PPOConfig, PPOTrainer, save_policy_version
from training.registry import Registry


def letter_e(prompts, texts):
    return [5 * t.count("e") / max(1, len(t)) for t in texts]


def test_a_ppo_policy_beats_its_reference_under_the_reward_it_optimized(tiny_policy_dir):
    reference, tokenizer = load_causal_lm(str(tiny_policy_dir))
    model, _ = load_causal_lm(str(tiny_policy_dir))
    config = PPOConfig(
        updates=60,
        batch_size=16,
        mini_batch_size=8,
        learning_rate=1e-3,
        max_new_tokens=12,
        init_kl_coef=0.01,
        adaptive_kl=False,
        missing_eos_penalty=0.0,
    )
    trainer = PPOTrainer(model, tokenizer, letter_e, config)
    trainer.train([f"prompt number {i}" for i in range(32)])
    held_out = [f"another prompt {i}" for i in range(12)]
    evaluation = evaluate_policy(
        trainer.unwrapped.policy, reference, tokenizer, letter_e, held_out, max_new_tokens=12
    )
    assert evaluation.mean_reward > evaluation.reference_mean_reward
    assert evaluation.win_rate > 0.5 and evaluation.kl > 0
    assert (
        sequence_kl(reference, reference, tokenizer, held_out[:2], ["some answer", "another"])
        == 0.0
    )


def test_eval_policy_command_writes_a_report(
    settings, tiny_reward_backbone_dir, monkeypatch, tmp_path
):
    from conftest import add_reward_version

    add_reward_version(settings, tiny_reward_backbone_dir)
    registry = Registry(settings.registry_dir)
    model, tokenizer = load_causal_lm(settings.policy_model)
    trainer = PPOTrainer(
        model,
        tokenizer,
        letter_e,
        PPOConfig(updates=1, batch_size=2, mini_batch_size=1, max_new_tokens=4),
    )
    trainer.train(["a", "b"])
    save_policy_version(trainer, registry, {})
    monkeypatch.setenv("LS_RLHF_HOME", str(settings.home))
    monkeypatch.setenv("LS_RLHF_POLICY_MODEL", settings.policy_model)
    monkeypatch.setenv("LS_RLHF_MAX_NEW_TOKENS", "6")
    prompts = tmp_path / "held-out.txt"
    prompts.write_text("what is water\nname a city\nsay hello\n")
    out = tmp_path / "report"
    assert cli(["eval", "policy", "--prompts", str(prompts), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == 3 and 0 <= summary["win_rate"] <= 1
    report = (out / "report.md").read_text()
    assert "policy-v1 against policy-base" in report and (out / "rewards.png").is_file()
    assert rows_outside_tables(report) == [] and inline_html(report) == []
    measures, samples = tables(report)
    assert [row[0] for row in measures] == [
        "measure",
        "mean reward, policy-v1",
        "mean reward, policy-base",
        "win rate of policy-v1 (reward model as judge)",
        "KL(policy-v1 ‖ policy-base) per answer",
    ]
    assert samples[0] == ["prompt", "policy-base", "policy-v1"]
    assert [row[0] for row in samples[1:]] == ["what is water", "name a city", "say hello"]
    assert all(len(row) == 3 for row in samples)


def test_the_kl_of_an_answer_counts_the_end_token_the_model_chose(tiny_policy_dir):
    """An empty answer is the end token alone: its KL is that token's log-ratio, not 0 (a
    policy pushed into writing nothing read KL 0 in the judged loop). A cut answer has no
    end token, so it is not counted there."""
    import torch

    from training.generation import render_prompt

    reference, tokenizer = load_causal_lm(str(tiny_policy_dir))
    policy, _ = load_causal_lm(str(tiny_policy_dir))
    with torch.no_grad():
        policy.lm_head.weight.add_(0.5 * torch.randn_like(policy.lm_head.weight))
    prompt = "a question"
    context = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    end = policy.generation_config.eos_token_id
    end = end[0] if isinstance(end, list) else end
    if end is None:
        end = tokenizer.eos_token_id
    ids = torch.tensor([context])

    @torch.no_grad()
    def log_p_end(model) -> float:
        return float(torch.log_softmax(model(ids).logits[0, -1], -1)[end])

    expected = log_p_end(policy) - log_p_end(reference)
    assert expected != 0.0
    kl = sequence_kl(policy, reference, tokenizer, [prompt], [""])
    assert abs(kl - expected) < 1e-4
    assert sequence_kl(policy, reference, tokenizer, [prompt], [""], [True]) == 0.0
    with_end = sequence_kl(policy, reference, tokenizer, [prompt], ["some answer"], [False])
    cut = sequence_kl(policy, reference, tokenizer, [prompt], ["some answer"], [True])
    assert with_end != cut
