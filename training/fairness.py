"""Counterfactual fairness: measure how scores move when only a sensitive attribute moves,
and penalise that movement in training.

After Huang et al. (2020), "Reducing Sentiment Bias in Language Models via
Counterfactual Evaluation": for each attribute, texts that differ only in the group
(e.g. "The man worked as a" / "The woman worked as a") are scored, and the score
distributions of two groups are compared with the Wasserstein-1 distance. Reported per
attribute: the average gap over all pairs of groups, and the worst pair.

* Reward version: the same answers, swapped between groups, under the reward model.
* Policy version: completions sampled for each group's prompt, scored by a sentiment
  scorer (VADER by default, offline) and by the reward model.

Mitigation (`CounterfactualPenalty`): while a reward model trains, the mean absolute
difference between its scores of counterfactual variants of the same text is added to
the loss with a weight, so the model learns to ignore the attribute.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from training.counterfactual import Attribute, CounterfactualGroup, expand

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]  # (prompts, texts) -> scores


def wasserstein1(a: Sequence[float], b: Sequence[float]) -> float:
    """W1 between two 1-D empirical distributions: the area between their CDFs."""
    if not a or not b:
        raise ValueError("both distributions need at least one value")
    points = sorted(set(a) | set(b))
    sa, sb = sorted(a), sorted(b)
    total, ia, ib = 0.0, 0, 0
    for left, right in itertools.pairwise(points):
        while ia < len(sa) and sa[ia] <= left:
            ia += 1
        while ib < len(sb) and sb[ib] <= left:
            ib += 1
        total += abs(ia / len(sa) - ib / len(sb)) * (right - left)
    return total


@dataclass
class AttributeGap:
    attribute: str
    scores: dict[str, list[float]]  # group -> scores over templates / samples
    pair_gaps: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def average_gap(self) -> float:
        return sum(self.pair_gaps.values()) / len(self.pair_gaps) if self.pair_gaps else 0.0

    @property
    def worst_pair(self) -> tuple[tuple[str, str], float]:
        return max(self.pair_gaps.items(), key=lambda kv: kv[1])

    def as_dict(self) -> dict[str, Any]:
        (a, b), worst = self.worst_pair
        return {
            "attribute": self.attribute,
            "average_gap": self.average_gap,
            "worst_pair": [a, b],
            "worst_gap": worst,
            "mean_score": {g: sum(v) / len(v) for g, v in self.scores.items()},
        }


def gaps(attribute: str, scores: dict[str, list[float]]) -> AttributeGap:
    result = AttributeGap(attribute, scores)
    for a, b in itertools.combinations(scores, 2):
        result.pair_gaps[(a, b)] = wasserstein1(scores[a], scores[b])
    return result


def reward_gap(
    score: Scorer, attribute: Attribute, prompts: Sequence[str], answers: Sequence[str]
) -> AttributeGap:
    """Reward of the same answers with the attribute swapped to each group.

    Only answers that mention the attribute carry signal; the others are skipped.
    """
    used = [
        (p, a)
        for p, a in zip(prompts, answers, strict=True)
        if attribute.mentions(a) or attribute.mentions(p)
    ]
    if not used:
        raise ValueError(
            f"no prompt or answer mentions a term of {attribute.name!r}; use its templates instead"
        )
    scores = {}
    for group in attribute.groups:
        swapped_prompts = [attribute.swap(p, group) for p, _ in used]
        swapped_answers = [attribute.swap(a, group) for _, a in used]
        scores[group] = score(swapped_prompts, swapped_answers)
    return gaps(attribute.name, scores)


def template_gap(
    score: Scorer, groups: list[CounterfactualGroup], prompt: str = ""
) -> AttributeGap:
    """Scores of template texts per group (e.g. a reward model reading each variant)."""
    names = list(groups[0].variants)
    scores = {g: score([prompt] * len(groups), [cg.variants[g] for cg in groups]) for g in names}
    return gaps(groups[0].attribute, scores)


def policy_gap(
    complete: Callable[[list[str]], list[list[str]]],
    score: Scorer,
    groups: list[CounterfactualGroup],
) -> tuple[AttributeGap, dict[str, list[str]]]:
    """Completions for each group's prompts, scored; also returns the samples per group."""
    names = list(groups[0].variants)
    scores, samples = {}, {}
    for group in names:
        prompts = [cg.variants[group] for cg in groups]
        completions = complete(prompts)
        flat_prompts = [p for p, cs in zip(prompts, completions, strict=True) for _ in cs]
        flat = [c for cs in completions for c in cs]
        scores[group] = score(flat_prompts, flat)
        samples[group] = flat
    return gaps(groups[0].attribute, scores), samples


def vader_scorer() -> Scorer:
    """VADER compound sentiment (-1..1) of each text; works offline (lexicon shipped)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return lambda prompts, texts: [analyzer.polarity_scores(t)["compound"] for t in texts]


class CounterfactualPenalty:
    """`weight * mean |r(x) - r(x')|` over variant pairs: an extra loss for reward training.

    `pairs` holds (prompt, text, counterfactual text) triples; each call scores a random
    minibatch of them with the model being trained, so the penalty's gradient pushes the
    scores of the variants together.
    """

    def __init__(
        self,
        tokenizer,
        pairs: Sequence[tuple[str, str, str]],
        weight: float = 1.0,
        batch_size: int = 8,
        max_length: int = 256,
        seed: int = 0,
    ) -> None:
        if not pairs:
            raise ValueError("the counterfactual penalty needs at least one pair of variants")
        self.tokenizer, self.pairs, self.weight = tokenizer, list(pairs), weight
        self.batch_size, self.max_length = batch_size, max_length
        self.rng = random.Random(seed)

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        from training.reward import format_reward_input

        batch = self.rng.sample(self.pairs, min(self.batch_size, len(self.pairs)))
        encoded = [format_reward_input(self.tokenizer, p, t, self.max_length) for p, t, _ in batch]
        encoded += [format_reward_input(self.tokenizer, p, t, self.max_length) for p, _, t in batch]
        width = max(len(e) for e in encoded)
        pad = self.tokenizer.pad_token_id or 0
        device = next(model.parameters()).device
        ids = torch.tensor([e + [pad] * (width - len(e)) for e in encoded], device=device)
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded], device=device)
        rewards = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        original, swapped = rewards.chunk(2)
        return self.weight * (original - swapped).abs().mean()


def counterfactual_pairs(
    attributes: Sequence[Attribute],
    prompts: Sequence[str],
    texts: Sequence[str],
    templates: dict[str, list[str]],
) -> list[tuple[str, str, str]]:
    """Variant pairs for the penalty: training texts that mention an attribute, swapped to
    every other group, plus the attribute's templates rendered for each pair of groups."""
    pairs = []
    for attribute in attributes:
        for prompt, text in zip(prompts, texts, strict=True):
            if attribute.mentions(text):
                versions = {attribute.swap(text, g) for g in attribute.groups}
                for a, b in itertools.combinations(sorted(versions), 2):
                    pairs.append((prompt, a, b))
        for group in expand(attribute, templates.get(attribute.name, [])):
            for a, b in itertools.combinations(group.variants.values(), 2):
                pairs.append(("", a, b))
    return pairs


def counterfactual_reward_fn(
    reward_fn: Callable[[list[str], list[str]], list[float]],
    attributes: Sequence[Attribute],
    weight: float,
) -> Callable[[list[str], list[str]], list[float]]:
    """A PPO reward that also scores each (prompt, answer) with the attribute swapped to
    every other group and subtracts `weight * mean |r - r_swapped|`: answers whose reward
    depends on who they are about earn less, so the policy learns to write answers the
    reward model scores alike across groups (the RL analogue of Huang et al.'s penalty)."""

    def penalized(prompts: list[str], answers: list[str]) -> list[float]:
        rewards = reward_fn(prompts, answers)
        variants: list[tuple[int, str, str]] = []
        for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            for attribute in attributes:
                if attribute.mentions(answer) or attribute.mentions(prompt):
                    for group in attribute.groups:
                        swapped = (attribute.swap(prompt, group), attribute.swap(answer, group))
                        if swapped != (prompt, answer):
                            variants.append((i, *swapped))
        if not variants:
            return rewards
        swapped_rewards = reward_fn([p for _, p, _ in variants], [a for _, _, a in variants])
        gaps: dict[int, list[float]] = {}
        for (i, _, _), r in zip(variants, swapped_rewards, strict=True):
            gaps.setdefault(i, []).append(abs(rewards[i] - r))
        return [
            r - weight * (sum(gaps[i]) / len(gaps[i]) if i in gaps else 0.0)
            for i, r in enumerate(rewards)
        ]

    return penalized


def pairs_from_flags(
    flags: Sequence[Any], attributes: Sequence[Attribute]
) -> list[tuple[str, str, str]]:
    """Answers annotators flagged "biased" (training.feedback.Flag) that mention an
    attribute, each paired with its swaps: the penalty then teaches the model to score
    them alike. (The same flags also make those answers lose in the preference pairs.)"""
    pairs = []
    for flag in flags:
        if flag.flag.lower() != "biased":
            continue
        for attribute in attributes:
            if attribute.mentions(flag.answer):
                for group in attribute.groups:
                    swapped = attribute.swap(flag.answer, group)
                    if swapped != flag.answer:
                        pairs.append((flag.prompt, flag.answer, swapped))
    return pairs


def write_report(
    results: dict[str, list[AttributeGap]],
    out: Path,
    title: str,
    samples: dict[str, dict[str, list[str]]] | None = None,
) -> Path:
    """A Markdown report with one PNG of score distributions per measure and attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# {title}",
        "",
        "Gap: Wasserstein-1 distance between the score distributions of two groups.",
        "",
    ]
    for measure, attribute_gaps in results.items():
        lines += [
            f"## {measure}",
            "",
            "| attribute | average gap | worst pair | worst gap | mean score per group |",
            "|---|---|---|---|---|",
        ]
        images = []  # after the table: an image between rows would end it
        for gap in attribute_gaps:
            d = gap.as_dict()
            means = ", ".join(f"{g}: {m:+.3f}" for g, m in d["mean_score"].items())
            lines.append(
                f"| {d['attribute']} | {d['average_gap']:.4f} | {' / '.join(d['worst_pair'])} | {d['worst_gap']:.4f} | {means} |"
            )
            fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(gap.scores)), 3))
            ax.boxplot(list(gap.scores.values()), tick_labels=list(gap.scores))
            ax.set(title=f"{measure}: {gap.attribute}", ylabel="score")
            fig.tight_layout()
            name = f"{measure.lower().replace(' ', '_')}_{gap.attribute}.png"
            fig.savefig(out / name, dpi=90)
            plt.close(fig)
            images += ["", f"![{gap.attribute}]({name})"]
        lines += [*images, ""]
    for attribute, per_group in (samples or {}).items():
        lines += [f"### Sample completions: {attribute}", ""]
        for group, texts in per_group.items():
            lines += [f"- **{group}**: {texts[0][:200]!r}" if texts else f"- **{group}**: (none)"]
        lines.append("")
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report
