"""Policy evaluation on held-out prompts: reward, KL to the reference, win rate, samples.

* mean reward of the policy's answers under a reward version (and the reference's);
* KL(policy || reference): the mean over sampled answers of sum_t log pi(a_t) - log pi_ref(a_t)
  (the k1 estimator on the policy's own samples);
* win rate: the share of prompts where the reward model scores the policy's answer above
  the reference's (a tie counts half);
* sample answers side by side, in a Markdown report with a plot of both reward distributions;
* the same answers as Label Studio tasks for people to judge (`comparison_tasks`), the
  policy's answer on a side drawn at random (seeded: the same seed gives the same sides)
  and the draw recorded (`training.feedback.model_comparisons` counts the verdicts back
  per model; `ls-rlhf report` shows them).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from training.feedback import ANSWER_SOURCES
from training.generation import cut_field, cut_note, generate_completions, render_prompt
from training.label_config import Schema

if TYPE_CHECKING:
    from training.engine import VLLMEngine


@dataclass
class PolicyEvaluation:
    prompts: list[str]
    policy_answers: list[str]
    reference_answers: list[str]
    policy_rewards: list[float]
    reference_rewards: list[float]
    kl: float
    # Per answer: generation stopped at max_new_tokens without ending (empty: not known).
    policy_truncated: list[bool] = field(default_factory=list)
    reference_truncated: list[bool] = field(default_factory=list)
    max_new_tokens: int | None = None

    @property
    def mean_reward(self) -> float:
        return sum(self.policy_rewards) / len(self.policy_rewards)

    @property
    def reference_mean_reward(self) -> float:
        return sum(self.reference_rewards) / len(self.reference_rewards)

    @property
    def win_rate(self) -> float:
        wins = sum(
            1.0 if p > r else 0.5 if p == r else 0.0
            for p, r in zip(self.policy_rewards, self.reference_rewards, strict=True)
        )
        return wins / len(self.prompts)

    def summary(self) -> dict[str, float]:
        return {
            "mean_reward": self.mean_reward,
            "reference_mean_reward": self.reference_mean_reward,
            "kl_to_reference": self.kl,
            "win_rate": self.win_rate,
            "prompts": len(self.prompts),
        }


@torch.no_grad()
def sequence_kl(
    policy,
    reference,
    tokenizer,
    prompts: list[str],
    answers: list[str],
    truncated: Sequence[bool] | None = None,
) -> float:
    """Mean over answers of sum_t (log pi - log pi_ref) over the answer's tokens and, where
    the model ended the answer itself (not `truncated`, which defaults to all False), its
    end-of-sequence token: choosing to stop is part of the answer, and an empty answer is
    then that one token, not a KL of nothing."""
    end = _end_token_id(policy, tokenizer)
    total = 0.0
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        context = tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]
        tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if end is not None and not (truncated is not None and truncated[i]):
            tokens = [*tokens, end]
        if not tokens:
            continue
        ids = torch.tensor([context + tokens], device=policy.device)
        targets = ids[0, len(context) :]

        total += float(
            _answer_logprob(policy, ids, targets, len(context))
            - _answer_logprob(reference, ids, targets, len(context))
        )
    return total / max(1, len(answers))


def _end_token_id(model, tokenizer) -> int | None:
    """The token generation stops on (the generation config's first, as the chat models set
    it, else the tokenizer's)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if eos is not None else tokenizer.eos_token_id


def _answer_logprob(
    model, ids: torch.Tensor, targets: torch.Tensor, context_length: int
) -> torch.Tensor:
    logits = model(ids).logits[0, context_length - 1 : -1]
    return torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum()


def evaluate_policy(
    policy,
    reference,
    tokenizer,
    score,
    prompts: list[str],
    max_new_tokens: int = 64,
    seed: int = 0,
    engine: VLLMEngine | None = None,
) -> PolicyEvaluation:
    """`score(prompts, answers) -> rewards` is a reward version's scorer. With an `engine`
    both answer sets are sampled by it, given each model's weights in turn (the same
    engine for both, so the comparison is not one of engines)."""

    def answers(model) -> tuple[list[str], list[bool]]:
        if engine is not None:
            engine.serve_model(model)
        truncated: list[list[bool]] = []
        texts = [
            c[0]
            for c in generate_completions(
                model,
                tokenizer,
                prompts,
                1,
                max_new_tokens,
                temperature=0.7,
                seed=seed,
                engine=engine,
                truncated=truncated,
            )
        ]
        return texts, [t[0] for t in truncated] if len(truncated) == len(texts) else []

    policy_answers, policy_truncated = answers(policy)
    reference_answers, reference_truncated = answers(reference)
    return PolicyEvaluation(
        prompts=prompts,
        policy_answers=policy_answers,
        reference_answers=reference_answers,
        policy_rewards=score(prompts, policy_answers),
        reference_rewards=score(prompts, reference_answers),
        kl=sequence_kl(
            policy, reference, tokenizer, prompts, policy_answers, policy_truncated or None
        ),
        policy_truncated=policy_truncated,
        reference_truncated=reference_truncated,
        max_new_tokens=max_new_tokens,
    )


def write_policy_report(
    evaluation: PolicyEvaluation,
    out: Path,
    policy_label: str,
    reference_label: str,
    reward_label: str,
    samples: int = 10,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(
        [evaluation.reference_rewards, evaluation.policy_rewards],
        label=[reference_label, policy_label],
        bins=15,
    )
    ax.set(xlabel=f"reward ({reward_label})", ylabel="answers", title="Reward of held-out answers")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "rewards.png", dpi=90)
    plt.close(fig)
    s = evaluation.summary()
    lines = [
        f"# Policy evaluation: {policy_label} against {reference_label}",
        "",
        f"Reward model: {reward_label}; {s['prompts']} held-out prompts.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| mean reward, {policy_label} | {s['mean_reward']:+.4f} |",
        f"| mean reward, {reference_label} | {s['reference_mean_reward']:+.4f} |",
        f"| win rate of {policy_label} (reward model as judge) | {s['win_rate']:.3f} |",
        f"| KL({policy_label} ‖ {reference_label}) per answer | {s['kl_to_reference']:.4f} |",
        "",
        "![rewards](rewards.png)",
        "",
        f"## Samples\n\n| prompt | {reference_label} | {policy_label} |\n|---|---|---|",
    ]
    for prompt, ref, pol, rr, pr in list(
        zip(
            evaluation.prompts,
            evaluation.reference_answers,
            evaluation.policy_answers,
            evaluation.reference_rewards,
            evaluation.policy_rewards,
            strict=True,
        )
    )[:samples]:
        lines.append(f"| {_cell(prompt)} | {_cell(ref)} ({rr:+.2f}) | {_cell(pol)} ({pr:+.2f}) |")
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _cell(text: str) -> str:
    """At most 300 characters of text as a Markdown table cell: one line, `|` escaped (it
    would split the cell), `<` too (it would start an HTML tag)."""
    return text[:300].replace("\n", " ").replace("|", "\\|").replace("<", "&lt;")


def comparison_tasks(
    evaluation: PolicyEvaluation,
    schema: Schema,
    policy_label: str,
    reference_label: str,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Label Studio task data (pairwise or rating configs: two answer fields) putting each
    prompt's policy answer against the reference's. Annotators should not learn which side
    the new model is on (a side preference would then read as a model preference), so the
    policy takes side A on a random half of the tasks: exactly half (one more for an odd
    count), drawn with `seed`. Each task records its draw as "answer_sources", in answer
    order, which `training.feedback` reads back."""
    if schema.list_field or len(schema.answer_fields) != 2:
        raise ValueError(
            "policy-against-reference tasks need a label config with two answer fields "
            "(pairwise or rating)"
        )
    n = len(evaluation.prompts)
    policy_first = [True] * ((n + 1) // 2) + [False] * (n // 2)
    random.Random(seed).shuffle(policy_first)
    known = len(evaluation.policy_truncated) == len(evaluation.reference_truncated) == n
    tasks = []
    for i, (prompt, first) in enumerate(zip(evaluation.prompts, policy_first, strict=True)):
        answers = [
            (evaluation.policy_answers[i], policy_label, known and evaluation.policy_truncated[i]),
            (
                evaluation.reference_answers[i],
                reference_label,
                known and evaluation.reference_truncated[i],
            ),
        ]
        if not first:
            answers.reverse()
        data: dict[str, Any] = {schema.prompt_field: prompt}
        for name, (text, _, cut) in zip(schema.answer_fields, answers, strict=True):
            data[name] = text
            if known:  # marked as `ls-rlhf generate` marks them (ml_backend/tasks.py)
                data[cut_field(name)] = cut_note(evaluation.max_new_tokens) if cut else ""
        data[ANSWER_SOURCES] = [label for _, label, _ in answers]
        if known:
            data["truncated"] = [bool(cut) for _, _, cut in answers]
        tasks.append(data)
    return tasks
