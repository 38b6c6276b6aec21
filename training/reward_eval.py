"""How good a reward model is on held-out preference pairs, in the terms annotators see.

The backend shows an annotator the answer with the higher reward and a confidence
sigmoid(r_a - r_b) (README, "Predictions"). So beside pairwise accuracy this reports:

* a bootstrap 95% interval, resampling prompts rather than pairs: the pairs of one prompt
  share their answers and are not independent;
* calibration of that confidence: expected calibration error over equal-width bins of
  [0.5, 1] and a reliability diagram (shown confidence against how often it was right);
* the length bias: accuracy on the pairs whose chosen answer is the shorter one, beside the
  "longer answer wins" baseline, since a reward model that learned "longer is better" looks
  good on data where longer usually wins;
* accuracy by agreement (several annotators) and by margin (ratings), where the data has them.

Pure numbers from scores: `score(prompts, answers) -> rewards` is any scorer, so this module
needs no model and tests can give it planted scores.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

Scorer = Callable[[Sequence[str], Sequence[str]], list[float]]
REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")


class PreferenceDataError(ValueError):
    """Preference pairs that cannot be evaluated; the message says what to fix."""


@dataclass
class Bucket:
    name: str
    pairs: int
    accuracy: float | None


@dataclass
class ReliabilityBin:
    low: float
    high: float
    pairs: int
    confidence: float | None  # mean shown confidence in the bin
    accuracy: float | None  # how often the suggested answer was the chosen one


@dataclass
class RewardEvaluation:
    pairs: int
    prompts: int
    accuracy: float
    accuracy_low: float
    accuracy_high: float
    longer_answer_accuracy: float
    shorter_chosen_pairs: int
    shorter_chosen_accuracy: float | None
    expected_calibration_error: float
    mean_confidence: float
    reliability: list[ReliabilityBin] = field(default_factory=list)
    by_agreement: list[Bucket] = field(default_factory=list)
    by_margin: list[Bucket] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))

    def summary(self) -> str:
        """One line: accuracy [interval], ECE, length bias."""
        shorter = (
            f", {_fmt(self.shorter_chosen_accuracy)} when the chosen answer is shorter "
            f"({self.shorter_chosen_pairs} pairs)"
            if self.shorter_chosen_pairs
            else ""
        )
        return (
            f"accuracy {self.accuracy:.3f} [{self.accuracy_low:.3f}, {self.accuracy_high:.3f}] "
            f"on {self.pairs} pairs, ECE {self.expected_calibration_error:.3f}{shorter}; "
            f"longer answer wins {self.longer_answer_accuracy:.3f}"
        )

    def to_markdown(self, title: str, reliability_png: str | None = None) -> str:
        lines = [
            f"# {title}",
            "",
            f"{self.pairs} preference pairs over {self.prompts} prompts.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| pairwise accuracy | {self.accuracy:.3f} |",
            f"| 95% interval (bootstrap over prompts) | {self.accuracy_low:.3f} - {self.accuracy_high:.3f} |",
            f"| longer answer wins (baseline) | {self.longer_answer_accuracy:.3f} |",
            f"| accuracy when the chosen answer is the shorter one | {_fmt(self.shorter_chosen_accuracy)} ({self.shorter_chosen_pairs} pairs) |",
            f"| expected calibration error of the shown confidence | {self.expected_calibration_error:.3f} |",
            f"| mean shown confidence | {self.mean_confidence:.3f} |",
            "",
            "## Calibration",
            "",
            "The confidence shown with a suggestion is sigmoid(r_a - r_b) for the suggested "
            "answer a; a calibrated model's suggestions at confidence 0.8 are right 80% of the time.",
            "",
            "| confidence | pairs | mean confidence | suggestion right |",
            "|---|---|---|---|",
            *[
                f"| {b.low:.1f} - {b.high:.1f} | {b.pairs} | {_fmt(b.confidence)} | {_fmt(b.accuracy)} |"
                for b in self.reliability
            ],
            "",
        ]
        if reliability_png:
            lines += [f"![reliability diagram]({reliability_png})", ""]
        for heading, buckets in (("agreement", self.by_agreement), ("margin", self.by_margin)):
            if buckets:
                lines += [
                    f"## Accuracy by {heading}",
                    "",
                    f"| {heading} | pairs | accuracy |",
                    "|---|---|---|",
                    *[f"| {b.name} | {b.pairs} | {_fmt(b.accuracy)} |" for b in buckets],
                    "",
                ]
        return "\n".join(lines)

    def write(self, folder: Path, title: str) -> tuple[Path, Path, Path]:
        """report.md, report.json and reliability.png in `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        png = plot_reliability(self, folder / "reliability.png")
        markdown = folder / "report.md"
        markdown.write_text(self.to_markdown(title, png.name))
        data = folder / "report.json"
        data.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return markdown, data, png


def check_pairs(pairs: Dataset) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in pairs.column_names]
    if missing:
        raise PreferenceDataError(
            f"the preference pairs lack the column(s) {', '.join(missing)}: give "
            "prompt/chosen/rejected (TRL's explicit-prompt preference format)"
        )
    if len(pairs) == 0:
        raise PreferenceDataError("no preference pairs to evaluate")


def evaluate_reward(
    score: Scorer, pairs: Dataset, bins: int = 5, resamples: int = 1000, seed: int = 0
) -> RewardEvaluation:
    """Score each distinct (prompt, answer) once, then every figure of `RewardEvaluation`."""
    check_pairs(pairs)
    return evaluation_of(reward_differences(score, pairs), pairs, bins, resamples, seed)


def evaluation_of(
    difference: np.ndarray, pairs: Dataset, bins: int = 5, resamples: int = 1000, seed: int = 0
) -> RewardEvaluation:
    """Every figure of `RewardEvaluation` from the pairs' reward differences."""
    return evaluation_from_differences(
        difference,
        list(pairs["prompt"]),
        [len(c) for c in pairs["chosen"]],
        [len(r) for r in pairs["rejected"]],
        agreement=_column(pairs, "agreement"),
        votes=_column(pairs, "votes"),
        margin=_column(pairs, "margin"),
        bins=bins,
        resamples=resamples,
        seed=seed,
    )


def reward_differences(score: Scorer, pairs: Dataset) -> np.ndarray:
    """r(chosen) - r(rejected) per pair, scoring each distinct (prompt, answer) once: a
    ranking of K answers gives K(K-1)/2 pairs but only K texts to score."""
    prompts, chosen, rejected = pairs["prompt"], pairs["chosen"], pairs["rejected"]
    unique = list(
        dict.fromkeys([*zip(prompts, chosen, strict=True), *zip(prompts, rejected, strict=True)])
    )
    rewards = dict(zip(unique, score([p for p, _ in unique], [a for _, a in unique]), strict=True))
    return np.array(
        [
            rewards[(p, c)] - rewards[(p, r)]
            for p, c, r in zip(prompts, chosen, rejected, strict=True)
        ]
    )


def evaluation_from_differences(
    difference: np.ndarray,
    prompts: Sequence[str],
    chosen_lengths: Sequence[int],
    rejected_lengths: Sequence[int],
    agreement: Sequence[float] | None = None,
    votes: Sequence[int] | None = None,
    margin: Sequence[float] | None = None,
    bins: int = 5,
    resamples: int = 1000,
    seed: int = 0,
) -> RewardEvaluation:
    """The figures from r(chosen) - r(rejected) per pair; a tie counts as wrong, as in
    `pairwise_accuracy`."""
    correct = difference > 0
    chosen_len, rejected_len = np.asarray(chosen_lengths), np.asarray(rejected_lengths)
    shorter = chosen_len < rejected_len
    low, high = _bootstrap_interval(correct, prompts, resamples, seed)
    confidence = 1 / (1 + np.exp(-np.abs(difference)))
    reliability, ece = _reliability(confidence, correct, bins)
    return RewardEvaluation(
        pairs=len(correct),
        prompts=len(set(prompts)),
        accuracy=float(correct.mean()),
        accuracy_low=low,
        accuracy_high=high,
        longer_answer_accuracy=float((chosen_len > rejected_len).mean()),
        shorter_chosen_pairs=int(shorter.sum()),
        shorter_chosen_accuracy=float(correct[shorter].mean()) if shorter.any() else None,
        expected_calibration_error=ece,
        mean_confidence=float(confidence.mean()),
        reliability=reliability,
        by_agreement=_agreement_buckets(correct, agreement, votes),
        by_margin=_margin_buckets(correct, margin),
    )


def _bootstrap_interval(
    correct: np.ndarray, prompts: Sequence[str], resamples: int, seed: int
) -> tuple[float, float]:
    """95% percentile interval of accuracy, resampling whole prompts (a cluster bootstrap)."""
    ids = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
    cluster = np.array([ids[p] for p in prompts])
    wins = np.bincount(cluster, weights=correct.astype(float), minlength=len(ids))
    counts = np.bincount(cluster, minlength=len(ids)).astype(float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(resamples, len(ids)))
    accuracies = wins[draws].sum(1) / counts[draws].sum(1)
    low, high = np.percentile(accuracies, [2.5, 97.5])
    return float(low), float(high)


def _reliability(
    confidence: np.ndarray, correct: np.ndarray, bins: int
) -> tuple[list[ReliabilityBin], float]:
    edges = np.linspace(0.5, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, bins - 1)
    result, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        mean_conf = accuracy = None
        if n:
            mean_conf, accuracy = float(confidence[inside].mean()), float(correct[inside].mean())
            ece += n / len(correct) * abs(accuracy - mean_conf)
        result.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), n, mean_conf, accuracy))
    return result, float(ece)


def _agreement_buckets(
    correct: np.ndarray, agreement: Sequence[float] | None, votes: Sequence[int] | None
) -> list[Bucket]:
    if agreement is None or votes is None or max(votes, default=1) <= 1:
        return []
    agreement_a, votes_a = np.asarray(agreement, dtype=float), np.asarray(votes)
    masks = {
        "one annotator": votes_a <= 1,
        "several, unanimous": (votes_a > 1) & (agreement_a >= 1),
        "several, majority": (votes_a > 1) & (agreement_a < 1),
    }
    return [_bucket(name, correct, mask) for name, mask in masks.items() if mask.any()]


def _margin_buckets(correct: np.ndarray, margin: Sequence[float] | None) -> list[Bucket]:
    if margin is None:
        return []
    values = np.asarray([m or 0.0 for m in margin], dtype=float)
    if not (values > 0).any():
        return []
    median = float(np.median(values[values > 0]))
    masks = {
        "no margin (a choice or ranking)": values <= 0,
        f"up to {median:.2f}": (values > 0) & (values <= median),
        f"above {median:.2f}": values > median,
    }
    return [_bucket(name, correct, mask) for name, mask in masks.items() if mask.any()]


def _bucket(name: str, correct: np.ndarray, mask: np.ndarray) -> Bucket:
    return Bucket(name, int(mask.sum()), float(correct[mask].mean()))


def plot_reliability(evaluation: RewardEvaluation, path: Path) -> Path:
    """Reliability diagram: shown confidence against how often the suggestion was right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0.5, 1], [0.5, 1], linestyle="--", color="grey", label="calibrated")
    filled = [
        (b.confidence, b.accuracy, b.pairs)
        for b in evaluation.reliability
        if b.confidence is not None and b.accuracy is not None
    ]
    ax.plot(
        [confidence for confidence, _, _ in filled],
        [accuracy for _, accuracy, _ in filled],
        marker="o",
        label=f"reward model (ECE {evaluation.expected_calibration_error:.3f})",
    )
    for confidence, accuracy, pairs in filled:
        ax.annotate(str(pairs), (confidence, accuracy), textcoords="offset points", xytext=(4, -10))
    ax.set(
        xlabel="shown confidence sigmoid(r_a - r_b)",
        ylabel="suggestion was the chosen answer",
        xlim=(0.5, 1),
        ylim=(0, 1),
        title=f"Reliability, accuracy {evaluation.accuracy:.3f} on {evaluation.pairs} pairs",
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _column(pairs: Dataset, name: str) -> list | None:
    return list(pairs[name]) if name in pairs.column_names else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
