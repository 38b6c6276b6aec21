"""A gold judge: a fixed reward model that plays the annotators and scores the result.

The loop cannot be judged by the reward model it trains (a policy that games a weak proxy
looks the same as one that improves). As in AlpacaFarm and Gao et al.'s overoptimization
study, a separate "gold" reward model stands in for people: it labels the comparisons the
policy writes, the loop learns only from those labels through its normal path (Label
Studio, webhook, export, `train_reward`), and the gold judge then scores the policy.

What keeps it independent of the proxy the loop trains:

* other data: the judge learns from FineGrainedRLHF's *human* preference pairs on the
  first 400 questions (T5 answers judged by people); the proxy learns only from the judge's
  labels of the loop policy's answers (SmolLM2 answers to the loop's prompts);
* another seed and configuration: seed 1, learning rate 1e-4, one full epoch, no
  validation stop (`JUDGE_CONFIG`: the grouped one-epoch run that ranked 0.609 of the
  held-out human pairs right in docs/benchmarks.md, session 8, the best figure there), where
  the proxy trains with the loop's defaults (seed 0, 2e-4, early stopping, warm starts);
* the same backbone by default (all-MiniLM-L6-v2): the only other backbone shipped offline,
  SmolLM2-135M, did not learn a better reward model within an hour on this CPU (sessions 9
  and 12). `build_judge(backbone=...)` takes any other. A shared backbone makes the judge
  easier for the proxy to imitate than people would be; the figures are read with that in mind.

Degenerate answers. A reward model trained on people's pairs alone has never seen an empty,
cut-off, looping or off-topic answer, and scores them arbitrarily: the first judge (trained on
the human pairs only) preferred an empty answer to the base policy's in 16 of 20 held-out
questions, so a policy that wrote nothing "won". No person would prefer those, so the judge
also learns, for every training question, one pair of a `DEGENERATE_KINDS` drawn at random:
an answer people preferred against the same answer emptied, cut to its first third, looped
on its first words, or against a preferred answer to another question (`degenerate_pairs`). Its
held-out accuracy is measured on the human pairs alone, and its rejection of each kind on
the held-out questions (`judge.json`).

Built once and cached as a plain HF folder (default `~/.cache/ls-rlhf/judges/<name>`), with
`judge.json` saying how it was built and its held-out accuracy on the last 100 questions.

Label noise, so the simulated annotators disagree as people do:

* `temperature` T > 0: Bradley-Terry sampling, P(left) = sigmoid((s_left - s_right) / T);
  rankings are Plackett-Luce samples (scores / T plus Gumbel noise, sorted), which is the
  same model for two answers; T = 0 always picks the higher score;
* `flip_rate` f: the pick is then flipped with probability f (a ranking swaps one random
  neighbouring pair). `flip_rate_for_agreement(a)` gives the f at which two independent
  noisy judges agree on a share a of pairs: (1 - f)^2 + f^2 = a. InstructGPT reports
  72.6 % agreement between its trained labelers (`HUMAN_AGREEMENT`).

The gold win rate (`win_rate`) uses the judge's scores without noise: the share of prompts
where the judge scores the policy's answer above the base policy's (ties count half), with
a 95 % bootstrap interval over prompts.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from training.finegrained import DEFAULT_PATH, finegrained_split, load_finegrained, preference_pairs
from training.registry import Registry
from training.reward import RewardModel, RewardTrainingConfig, train_reward
from training.reward_eval import reward_differences

HUMAN_AGREEMENT = 0.726  # InstructGPT (Ouyang et al., 2022), agreement among training labelers
JUDGE_FILE = "judge.json"
DEFAULT_JUDGE_NAME = "finegrained-minilm-seed1-degenerate"
# Another seed and configuration than the loop's proxy (see the module docstring).
JUDGE_CONFIG = RewardTrainingConfig(
    method="finetune",
    learning_rate=1e-4,
    num_train_epochs=1.0,
    validation_fraction=0.0,
    promote="always",
    seed=1,
    max_length=256,
)


DEGENERATE_KINDS = ("empty", "cut", "loop", "off_topic")
# One degenerate pair per training question, of a kind drawn at random: with all four kinds
# (1,560 pairs beside 2,104 human ones) the easy pairs crowded out the human signal (held-out
# human-pair accuracy 0.529, against 0.551 with one, every kind still rejected 0.70-1.0).
DEGENERATE_PER_PROMPT = 1


def default_judges_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "ls-rlhf" / "judges"


def flip_rate_for_agreement(agreement: float) -> float:
    """The flip rate f at which two independent judges (each flipping a noise-free choice
    with probability f) agree on a share `agreement` of pairs: (1 - f)^2 + f^2 = agreement."""
    if not 0.5 <= agreement <= 1.0:
        raise ValueError(f"agreement must be within [0.5, 1] (chance to always), not {agreement}")
    return (1 - math.sqrt(2 * agreement - 1)) / 2


def degenerate_pairs(
    pairs: Any, seed: int = 1, per_prompt: int | None = None
) -> list[dict[str, str]]:
    """For each prompt of `pairs` (prompt/chosen/rejected rows), one pair of each
    `DEGENERATE_KINDS` (or of `per_prompt` of them drawn at random): an answer people chose
    there against that answer emptied (`empty`), cut to its first third of words (`cut`),
    looping on its first four words (`loop`), and against an answer people chose for another
    prompt (`off_topic`). A `kind` key says which. Answers of fewer than three words get
    no `cut` or `loop` pair."""
    rng = random.Random(seed)
    chosen: dict[str, list[str]] = {}
    for row in pairs:
        if row["chosen"].strip():
            chosen.setdefault(row["prompt"], []).append(row["chosen"])
    prompts = list(chosen)
    out: list[dict[str, str]] = []
    for prompt in prompts:
        answer = rng.choice(sorted(set(chosen[prompt])))
        words = answer.split()
        worse = {"empty": ""}
        if len(words) >= 3:
            worse["cut"] = " ".join(words[: max(1, len(words) // 3)])
            worse["loop"] = " ".join(words[:4] * 4)
        if len(prompts) > 1:
            other = rng.choice([p for p in prompts if p != prompt])
            worse["off_topic"] = rng.choice(chosen[other])
        kinds = sorted(worse)
        if per_prompt is not None:
            kinds = sorted(rng.sample(kinds, min(per_prompt, len(kinds))))
        for kind in kinds:
            rejected = worse[kind]
            out.append({"prompt": prompt, "chosen": answer, "rejected": rejected, "kind": kind})
    return out


def degenerate_accuracy(model: RewardModel, pairs: Sequence[dict[str, str]]) -> dict[str, float]:
    """Per kind, the share of `degenerate_pairs` where `model` scores the real answer higher."""
    # Every answer in one call, as the suggestions score a task's answers together.
    difference = reward_differences(model.score, Dataset.from_list(list(pairs)))
    hits: dict[str, list[bool]] = {}
    for pair, d in zip(pairs, difference, strict=True):
        hits.setdefault(pair["kind"], []).append(bool(d > 0))
    return {kind: round(sum(v) / len(v), 4) for kind, v in hits.items()}


def build_judge(
    folder: str | os.PathLike[str] | None = None,
    backbone: str | None = None,
    config: RewardTrainingConfig | None = None,
    data_path: str | os.PathLike[str] = DEFAULT_PATH,
    train_questions: int = 400,
) -> Path:
    """The judge's folder, trained first if it is not there yet (through `train_reward`,
    on FineGrainedRLHF's human pairs of the first `train_questions` questions; the rest are
    held out and only measured). Returns the folder; a second call just returns it."""
    from training.models import resolve_reward_backbone

    target = Path(folder) if folder else default_judges_dir() / DEFAULT_JUDGE_NAME
    if (target / JUDGE_FILE).is_file():
        return target
    config = config or JUDGE_CONFIG
    backbone = resolve_reward_backbone(backbone or "default")
    records = load_finegrained(Path(data_path))
    train_records, held_out = finegrained_split(records, train_questions)
    from datasets import Dataset, concatenate_datasets

    human, test = preference_pairs(train_records), preference_pairs(held_out)
    negatives = degenerate_pairs(human, seed=config.seed, per_prompt=DEGENERATE_PER_PROMPT)
    train = concatenate_datasets(
        [
            human.select_columns(["prompt", "chosen", "rejected"]),
            Dataset.from_list(negatives).select_columns(["prompt", "chosen", "rejected"]),
        ]
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".building-{target.name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.perf_counter()
    try:
        result = train_reward(
            train,
            test,
            Registry(scratch),
            backbone,
            config,
            data_info={
                "source": "finegrainedrlhf human pairs and degenerate answers",
                "questions": len(train_records),
            },
        )
        held_out_degenerate = degenerate_accuracy(
            RewardModel.load(result.version.path), degenerate_pairs(test, seed=config.seed)
        )
        (result.version.path / JUDGE_FILE).write_text(
            json.dumps(
                {
                    "backbone": backbone,
                    "config": asdict(config),
                    "train_pairs": len(human),
                    "degenerate_pairs": len(negatives),
                    "held_out_pairs": len(test),
                    "held_out_accuracy": result.metrics["accuracy_after"],
                    "longer_answer_accuracy": result.metrics["longer_answer_accuracy"],
                    "held_out_degenerate_accuracy": held_out_degenerate,
                    "build_seconds": round(time.perf_counter() - started, 1),
                },
                indent=2,
            )
            + "\n"
        )
        os.replace(result.version.path, target)  # whole or not at all
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


@dataclass
class WinRate:
    rate: float
    low: float
    high: float
    prompts: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class GoldJudge:
    """A fixed reward model that labels comparisons and rankings with settable noise."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        temperature: float = 0.0,
        flip_rate: float = 0.0,
        seed: int = 0,
        dtype: str = "float32",
    ) -> None:
        if temperature < 0:
            raise ValueError(f"temperature must be at least 0, not {temperature}")
        if not 0 <= flip_rate <= 0.5:
            raise ValueError(f"flip_rate must be within [0, 0.5], not {flip_rate}")
        self.path = Path(path)
        # float32 by default: the gold standard should not move with the hardware's precision
        self.model = RewardModel.load(self.path, dtype=dtype)
        self.temperature, self.flip_rate = temperature, flip_rate
        self.rng = random.Random(seed)
        self._cache: dict[tuple[str, str], float] = {}
        info = self.path / JUDGE_FILE
        self.info: dict[str, Any] = json.loads(info.read_text()) if info.is_file() else {}

    def scores(self, prompts: Sequence[str], answers: Sequence[str]) -> list[float]:
        """Noise-free scores (each distinct (prompt, answer) computed once)."""
        keys = list(zip(prompts, answers, strict=True))
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo:
            values = self.model.score([p for p, _ in todo], [a for _, a in todo])
            self._cache.update(zip(todo, values, strict=True))
        return [self._cache[k] for k in keys]

    def p_left(self, prompt: str, left: str, right: str) -> float:
        """Probability that the noisy judge picks `left`, its flip rate included."""
        s_left, s_right = self.scores([prompt, prompt], [left, right])
        if self.temperature > 0:
            p = 1 / (1 + math.exp(-(s_left - s_right) / self.temperature))
        else:
            p = 1.0 if s_left >= s_right else 0.0
        return p * (1 - self.flip_rate) + (1 - p) * self.flip_rate

    def prefer(self, prompt: str, left: str, right: str) -> str:
        """One noisy pairwise label: "left" or "right"."""
        return "left" if self.rng.random() < self.p_left(prompt, left, right) else "right"

    def rank(self, prompt: str, answers: Sequence[str]) -> list[int]:
        """One noisy ranking: indices of `answers`, best first."""
        scores = self.scores([prompt] * len(answers), list(answers))
        if self.temperature > 0:
            # Plackett-Luce by the Gumbel trick; for two answers it is Bradley-Terry above.
            scores = [
                s / self.temperature - math.log(-math.log(self.rng.random() or 1e-300))
                for s in scores
            ]
        order = sorted(range(len(answers)), key=lambda i: -scores[i])
        if len(order) > 1 and self.rng.random() < self.flip_rate:
            i = self.rng.randrange(len(order) - 1)
            order[i], order[i + 1] = order[i + 1], order[i]
        return order

    def win_rate(
        self,
        prompts: Sequence[str],
        policy_answers: Sequence[str],
        base_answers: Sequence[str],
        samples: int = 2000,
        seed: int = 0,
    ) -> WinRate:
        """Share of prompts where the noise-free judge prefers the policy's answer (ties
        half), with a 95 % bootstrap interval over prompts. Several answers per prompt (the
        same prompt repeated) are averaged per prompt first, so a prompt counts once."""
        policy = self.scores(prompts, policy_answers)
        base = self.scores(prompts, base_answers)
        per_prompt: dict[str, list[float]] = {}
        for prompt, p, b in zip(prompts, policy, base, strict=True):
            per_prompt.setdefault(prompt, []).append(1.0 if p > b else 0.5 if p == b else 0.0)
        wins = np.array([sum(v) / len(v) for v in per_prompt.values()])
        rng = np.random.default_rng(seed)
        means = wins[rng.integers(0, len(wins), size=(samples, len(wins)))].mean(axis=1)
        low, high = np.percentile(means, [2.5, 97.5])
        return WinRate(float(wins.mean()), float(low), float(high), len(wins))
