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
import re
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

    `pairs` holds (prompt, text, counterfactual text) triples, either as one list or as a
    dict attribute -> triples (`pairs_by_attribute`). Each call scores a random minibatch
    of them with the model being trained, so the penalty's gradient pushes the scores of
    the variants together. Given a dict, every minibatch is balanced: it takes the same
    number of pairs from each attribute (`batch_size // attributes`, at least one; the
    remainder goes round the attributes in turn), however many pairs each has.
    """

    def __init__(
        self,
        tokenizer,
        pairs: Sequence[tuple[str, str, str]] | dict[str, list[tuple[str, str, str]]],
        weight: float = 1.0,
        batch_size: int = 8,
        max_length: int = 256,
        seed: int = 0,
    ) -> None:
        by_attribute = (
            {k: list(v) for k, v in pairs.items() if v}
            if isinstance(pairs, dict)
            else {"": list(pairs)}
        )
        if not any(by_attribute.values()):
            raise ValueError("the counterfactual penalty needs at least one pair of variants")
        self.tokenizer, self.by_attribute, self.weight = tokenizer, by_attribute, weight
        self.pairs = [p for ps in by_attribute.values() for p in ps]
        self.batch_size, self.max_length = batch_size, max_length
        self.rng = random.Random(seed)
        self._turn = 0  # which attribute gets the next remainder slot
        self.drawn: dict[str, int] = dict.fromkeys(by_attribute, 0)  # pairs drawn so far

    def sample(self) -> list[tuple[str, str, str]]:
        """One minibatch: equal numbers of pairs per attribute (see the class docstring)."""
        names = list(self.by_attribute)
        counts = dict.fromkeys(names, max(1, self.batch_size // len(names)))
        for _ in range(max(0, self.batch_size - sum(counts.values()))):
            counts[names[self._turn % len(names)]] += 1
            self._turn += 1
        batch = []
        for name, k in counts.items():
            pool = self.by_attribute[name]
            # Without replacement inside a batch; a small pool is reused across batches.
            batch += self.rng.sample(pool, k) if k <= len(pool) else self.rng.choices(pool, k=k)
            self.drawn[name] += k
        return batch

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        from training.reward_model import format_reward_input

        batch = self.sample()
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


def pairs_by_attribute(
    attributes: Sequence[Attribute],
    prompts: Sequence[str],
    texts: Sequence[str],
    templates: dict[str, list[str]],
    flags: Sequence[Any] = (),
) -> dict[str, list[tuple[str, str, str]]]:
    """Variant pairs for the penalty, per attribute: training texts that mention it swapped
    to every other group, its templates rendered for each pair of groups, and answers
    flagged "biased" that mention it against their swaps. Pass the penalty part of the
    lists (`training.counterfactual.load_sets(...).penalty_*`) so the held-out part stays
    unseen."""
    result = {}
    for attribute in attributes:
        pairs = []
        for prompt, text in zip(prompts, texts, strict=True):
            if attribute.mentions(text):
                versions = {attribute.swap(text, g) for g in attribute.groups}
                for a, b in itertools.combinations(sorted(versions), 2):
                    pairs.append((prompt, a, b))
        for group in expand(attribute, templates.get(attribute.name, [])):
            for a, b in itertools.combinations(group.variants.values(), 2):
                pairs.append(("", a, b))
        pairs += pairs_from_flags(flags, [attribute])
        result[attribute.name] = pairs
    return result


def counterfactual_pairs(
    attributes: Sequence[Attribute],
    prompts: Sequence[str],
    texts: Sequence[str],
    templates: dict[str, list[str]],
) -> list[tuple[str, str, str]]:
    """`pairs_by_attribute` as one list (unbalanced: attributes the texts mention often
    contribute far more pairs; give the dict to `CounterfactualPenalty` to balance)."""
    by_attribute = pairs_by_attribute(attributes, prompts, texts, templates)
    return [p for ps in by_attribute.values() for p in ps]


def split_gaps(score: Scorer, sets: Any, names: Sequence[str]) -> dict[str, list[AttributeGap]]:
    """Template gaps of `score` on both parts of `sets` (training.counterfactual
    .CounterfactualSets): {"in_sample": [...], "held_out": [...]}, one AttributeGap per
    attribute of `names` that has templates on that side."""
    result: dict[str, list[AttributeGap]] = {"in_sample": [], "held_out": []}
    for side, attrs, tpls in (
        ("in_sample", sets.penalty_attributes, sets.penalty_templates),
        ("held_out", sets.held_out_attributes, sets.held_out_templates),
    ):
        for name in names:
            if name in attrs and tpls.get(name):
                result[side].append(template_gap(score, expand(attrs[name], tpls[name])))
    return result


def gap_summary(measured: dict[str, list[AttributeGap]], sets: Any) -> dict[str, Any]:
    """What a version's metadata records: per side and attribute, the average gap and the
    worst pair with its gap, plus how the lists were split."""
    summary: dict[str, Any] = {}
    for side, attribute_gaps in measured.items():
        summary[side] = {}
        for gap in attribute_gaps:
            d = gap.as_dict()
            summary[side][gap.attribute] = {
                "average_gap": round(d["average_gap"], 6),
                "worst_pair": d["worst_pair"],
                "worst_gap": round(d["worst_gap"], 6),
            }
    summary["split"] = sets.describe()
    return summary


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
    sets: Any = None,
) -> Path:
    """A Markdown report with one PNG of score distributions per measure and attribute;
    with `sets` (training.counterfactual.CounterfactualSets), a table of how the lists were
    split into the penalty's (in-sample) part and the held-out part."""
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
    if sets is not None:
        lines += [
            f"In-sample: the part of the lists the counterfactual penalty trains on; held-out: "
            f"the part it never sees ({sets.source}).",
            "",
            "| attribute | in-sample groups | in-sample templates | held-out groups | held-out templates |",
            "|---|---|---|---|---|",
        ]
        for name, attribute in sets.penalty_attributes.items():
            held = sets.held_out_attributes.get(name)
            lines.append(
                f"| {name} | {', '.join(attribute.groups)} | {len(sets.penalty_templates.get(name, []))} | "
                f"{', '.join(held.groups) if held else 'none'} | "
                f"{len(sets.held_out_templates.get(name, [])) if held else 0} |"
            )
        lines.append("")
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
            name = f"{re.sub(r'[^a-z0-9()-]+', '_', measure.lower())}_{gap.attribute}.png"
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
