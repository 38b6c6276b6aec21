"""The counterfactual penalty in PPO learns: with a planted bias in the reward, the
policy's counterfactual gap shrinks with the penalty and grows without it (same seeds)."""

from __future__ import annotations

from training.counterfactual import Attribute
from training.fairness import counterfactual_reward_fn
from training.models import load_causal_lm
from training.ppo import PPOConfig, PPOTrainer

# A two-group attribute of words the tiny tokenizer holds as single tokens ("Ġgood",
# "Ġbad"): its corpus has no " he" or " she" token, and a word spelled over two random
# tokens is too rare in a random policy's answers to measure a gap on. The mechanism is the
# one the bundled attributes go through (Attribute.swap, counterfactual_reward_fn).
PLANTED = Attribute("planted", ("favoured", "other"), (("good", "bad"),))
PROMPTS = [f"prompt number {i}" for i in range(32)]


def biased(prompts: list[str], answers: list[str]) -> list[float]:
    """The planted bias: +1 when the answer says the favoured group's word, else 0."""
    return [
        1.0 if PLANTED.swap(a, "favoured") == a and PLANTED.mentions(a) else 0.0 for a in answers
    ]


def gap(trainer: PPOTrainer) -> float:
    """The policy's counterfactual gap under the biased reward: over 64 sampled answers,
    the mean |r(answer) - r(answer with the attribute swapped)| (0 for an answer that
    names neither group). Weight 1 makes the wrapper's deduction exactly that gap."""
    texts = [t.strip() for t in trainer.rollout(PROMPTS * 2).texts]
    prompts = PROMPTS * 2
    raw = biased(prompts, texts)
    penalized = counterfactual_reward_fn(biased, [PLANTED], weight=1.0)(prompts, texts)
    return sum(r - p for r, p in zip(raw, penalized, strict=True)) / len(texts)


def train(policy_dir, weight: float) -> tuple[float, float]:
    model, tokenizer = load_causal_lm(str(policy_dir))
    reward = counterfactual_reward_fn(biased, [PLANTED], weight) if weight else biased
    config = PPOConfig(
        updates=12,
        batch_size=16,
        samples_per_prompt=1,
        mini_batch_size=8,
        ppo_epochs=2,
        lam=0.95,
        kl_loss_coef=0.0,
        init_kl_coef=0.05,
        learning_rate=1e-3,
        max_new_tokens=12,
        missing_eos_penalty=0.0,
        seed=0,
    )
    trainer = PPOTrainer(model, tokenizer, reward, config)
    before = gap(trainer)
    trainer.train(PROMPTS)
    return before, gap(trainer)


def test_the_counterfactual_penalty_shrinks_the_policys_gap_and_no_penalty_does_not(tmp_path):
    from tiny_models import build_steered_policy

    # A policy that already says " good" in about 40 % of its answers (0.1 a token over 12
    # tokens), so that there is a gap to shrink.
    policy = build_steered_policy(tmp_path / "steered", "Ġgood", 0.1)
    plain_before, plain_after = train(policy, weight=0.0)
    # Weight 2: an answer naming either group earns less than one naming neither
    # (favoured 1 - 2, other 0 - 2, neither 0), so the policy stops naming them.
    fair_before, fair_after = train(policy, weight=2.0)
    assert plain_before == fair_before  # same seeds, same starting policy and samples
    assert plain_before > 0.3, plain_before
    assert fair_after < 0.5 * fair_before, (fair_before, fair_after)
    assert plain_after >= plain_before, (plain_before, plain_after)
    assert fair_after < plain_after - 0.3, (plain_after, fair_after)
