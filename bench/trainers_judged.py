"""Benchmark: every policy trainer, judged (issue 14).

Each trainer starts from the base policy (SmolLM2-135M-Instruct) and learns from the same
`--train-questions` FineGrainedRLHF training questions (1-400), each from its own kind of
human feedback, through the product's code:

* SFT on corrections: the annotators' corrected answers (`train_sft`, its defaults);
* DPO: the human preference pairs over the four answers (`train_dpo`, its defaults);
* ILF: the error spans and missing-information notes as written feedback, without the
  correction (otherwise ILF keeps the annotator's rewrite and is SFT): the policy writes
  `--refinements` refinements per critique, the one nearest the feedback is kept, then SFT
  (`training.ilf.refinements`, `train_sft`);
* PPO: against a proxy reward model fitted (linear probe on MiniLM, the loop's default
  method) on the same questions' human pairs (`train_reward`, `train_policy_version`).

Each policy then answers `--held-out` held-out questions (401-500; nothing trains on them)
and is measured against the base policy's answers to the same questions:

* the gold judge's win rate (training/judge.py, noise-free scores, ties half, 95 %
  bootstrap interval over questions). The judge was fitted on the human pairs of questions
  1-400, so DPO's pairs and PPO's proxy's pairs are among its training data: it models the
  same annotators, which is what it stands in for;
* ROUGE-L F1 (Google's `rouge-score`, Porter stemming) against the annotators' corrected
  answer of each held-out question, mean over questions, with the base policy's and a 95 %
  bootstrap interval of the paired difference;
* KL to the base on the held-out answers (training.policy_eval.sequence_kl).

    .venv/bin/python bench/trainers_judged.py [--train-questions 48] [--held-out 30] [--samples 2]
        [--trainers sft,dpo,ilf,ppo] [--out bench/output/trainers_judged]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from loop_judged import sample_answers

import label_configs
from training.finegrained import (
    DEFAULT_PATH,
    finegrained_split,
    format_prompt,
    load_finegrained,
    preference_pairs,
    to_export,
    to_label_studio_tasks,
)
from training.judge import GoldJudge, build_judge
from training.registry import Registry
from training.settings import Settings

TRAINERS = ("sft", "dpo", "ilf", "ppo")


def corrected(record: dict) -> str:
    """The annotators' corrected answer of a record ('' if none)."""
    feedback = record.get("feedback") or {}
    if isinstance(feedback, str):
        feedback = ast.literal_eval(feedback)
    return feedback.get("corrected-prediction") or ""


def _parsed(records: list[dict], kind: str):
    from training.feedback import parse_export

    tasks = to_label_studio_tasks(records, kind)
    return parse_export(to_export(tasks), label_configs.load(kind)).records


def rouge_l(answers: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        scorer.score(ref, ans)["rougeL"].fmeasure
        for ans, ref in zip(answers, references, strict=True)
    ]


def per_question(scores: list[float], samples: int) -> list[float]:
    """Mean of each question's `samples` consecutive scores, so a question counts once."""
    return [float(np.mean(scores[i : i + samples])) for i in range(0, len(scores), samples)]


def paired_interval(a: list[float], b: list[float], seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of mean(a - b) over questions."""
    diff = np.array(a) - np.array(b)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(2000, len(diff)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def train(
    name: str, records: list[dict], registry: Registry, base: str, settings: Settings, args
) -> tuple[str, dict]:
    """Train one trainer from the base; (policy folder, what it trained on)."""
    if name == "sft":
        from training.datasets import sft_dataset
        from training.sft import SFTSettings, train_sft

        data = sft_dataset(_parsed(records, "demonstration"))
        version = train_sft(data, registry, base, SFTSettings(), promote=False)
        return str(version.path), {"corrections": len(data), **version.metadata["metrics"]}
    if name == "dpo":
        from training.preference import DPOSettings, train_dpo

        pairs = preference_pairs(records)
        version = train_dpo(pairs, registry, base, DPOSettings(), promote=False)
        return str(version.path), {"pairs": len(pairs), **version.metadata["metrics"]}
    if name == "ilf":
        from datasets import Dataset

        from training.datasets import critique_dataset
        from training.ilf import Embedder, refinements
        from training.models import load_causal_lm, resolve_reward_backbone
        from training.sft import SFTSettings, train_sft

        critiques = critique_dataset(_parsed(records, "critique"))
        # Written feedback only: the annotators' rewrites are SFT's data, not ILF's.
        critiques = Dataset.from_dict({**critiques.to_dict(), "refinement": [""] * len(critiques)})
        policy, tokenizer = load_causal_lm(base)
        embed = Embedder.load(resolve_reward_backbone(settings.reward_backbone))
        kept = refinements(
            critiques, policy, tokenizer, embed, args.refinements, args.max_new_tokens, args.seed
        )
        del policy
        version = train_sft(
            kept.select_columns(["prompt", "completion"]),
            registry,
            base,
            SFTSettings(),
            promote=False,
        )
        return str(version.path), {
            "critiques": len(critiques),
            "refinements_each": args.refinements,
            "mean_selection_score": float(np.mean(kept["selection_score"])),
            "sample_refinement": kept[0]["completion"][:300],
            **version.metadata["metrics"],
        }
    if name == "ppo":
        from training.datasets import split_by_prompt
        from training.models import resolve_reward_backbone
        from training.ppo import PPOConfig, train_policy_version
        from training.reward import RewardModel, RewardTrainingConfig, train_reward

        pairs = preference_pairs(records)
        split = split_by_prompt(pairs, seed=args.seed)
        fit = split["train"]
        result = train_reward(
            fit,
            split["test"],
            registry,
            resolve_reward_backbone(settings.reward_backbone),
            RewardTrainingConfig(method="probe", seed=args.seed),
        )
        prompts = list(dict.fromkeys(format_prompt(r) for r in records))
        version, history = train_policy_version(
            registry,
            base,
            prompts,
            RewardModel.load(result.version.path).score,
            PPOConfig(
                updates=args.ppo_updates,
                learning_rate=args.ppo_lr,
                batch_size=args.ppo_batch_size,
                seed=args.seed,
            ),
            {"reward_version": result.version.label},
            reference=base,
            promote=False,
        )
        return str(version.path), {
            "proxy_pairs": len(fit),
            "proxy_held_out_accuracy": result.metrics["accuracy_after"],
            "ppo_updates": len(history),
            "proxy_score_first": history[0]["objective/score"],
            "proxy_score_last": history[-1]["objective/score"],
            "ppo_kl_last": history[-1]["objective/kl"],
        }
    raise ValueError(f"unknown trainer {name!r}: use {', '.join(TRAINERS)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-questions", type=int, default=48)
    parser.add_argument("--held-out", type=int, default=30, help="held-out questions (of 100)")
    parser.add_argument("--trainers", default=",".join(TRAINERS))
    parser.add_argument("--samples", type=int, default=2, help="answers per held-out question")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--refinements", type=int, default=2, help="ILF candidates per critique")
    parser.add_argument("--ppo-updates", type=int, default=12)
    parser.add_argument("--ppo-lr", type=float, default=5e-5)
    parser.add_argument(
        "--ppo-batch-size",
        type=int,
        default=32,
        help="responses per PPO rollout (the judged loop's target run used 32)",
    )
    parser.add_argument("--judge", help="judge folder (default ~/.cache/ls-rlhf/judges/...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/output/trainers_judged")
    args = parser.parse_args()
    names = [n.strip() for n in args.trainers.split(",") if n.strip()]
    if unknown := [n for n in names if n not in TRAINERS]:
        parser.error(f"unknown trainers {unknown}; use {', '.join(TRAINERS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    from training.models import load_causal_lm, resolve_policy
    from training.policy_eval import sequence_kl

    judge = GoldJudge(build_judge(args.judge))
    records = load_finegrained(DEFAULT_PATH)
    train_records, held = finegrained_split(records)
    train_records = train_records[: args.train_questions]
    held = [r for r in held if corrected(r)][: args.held_out]
    held_prompts = [format_prompt(r) for r in held]
    references = [corrected(r) for r in held]

    workdir = Path(tempfile.mkdtemp(prefix="bench-trainers-judged-"))
    settings = Settings.from_env().replace(
        home=workdir / "home", max_new_tokens=args.max_new_tokens, seed=args.seed
    )
    registry = Registry(settings.registry_dir)
    base = resolve_policy(settings.policy_model, settings.models_cache_dir)
    repeated, base_answers, _ = sample_answers(
        base, held_prompts, settings, args.samples, args.seed + 1
    )
    repeated_references = [r for r in references for _ in range(args.samples)]
    base_rouge = per_question(rouge_l(base_answers, repeated_references), args.samples)
    rows = [
        {
            "trainer": "base",
            "rouge_l": float(np.mean(base_rouge)),
            "mean_answer_words": float(np.mean([len(a.split()) for a in base_answers])),
            "minutes": (time.monotonic() - started) / 60,
        }
    ]
    print(f"base: ROUGE-L {rows[0]['rouge_l']:.3f} ({rows[0]['minutes']:.1f} min)", flush=True)
    config = {
        **{k: v for k, v in vars(args).items() if k != "out"},
        "held_out_questions": len(held),
        "judge": str(judge.path),
        "judge_info": judge.info,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "base": base,
    }
    for name in names:
        t0 = time.monotonic()
        path, trained = train(name, train_records, registry, base, settings, args)
        train_minutes = (time.monotonic() - t0) / 60
        _, answers, cut = sample_answers(path, held_prompts, settings, args.samples, args.seed + 1)
        win = judge.win_rate(repeated, answers, base_answers)
        scores = per_question(rouge_l(answers, repeated_references), args.samples)
        low, high = paired_interval(scores, base_rouge, args.seed)
        policy, tokenizer = load_causal_lm(path, dtype="float32")
        reference, _ = load_causal_lm(base, dtype="float32")
        kl = sequence_kl(policy, reference, tokenizer, repeated, answers, cut)
        del policy, reference
        row = {
            "trainer": name,
            "gold_win_rate": win.rate,
            "gold_win_low": win.low,
            "gold_win_high": win.high,
            "rouge_l": float(np.mean(scores)),
            "rouge_l_minus_base": float(np.mean(scores) - np.mean(base_rouge)),
            "rouge_l_minus_base_low": low,
            "rouge_l_minus_base_high": high,
            "kl_to_base_held_out": kl,
            "mean_answer_words": float(np.mean([len(a.split()) for a in answers])),
            "train_minutes": train_minutes,
            "minutes": (time.monotonic() - t0) / 60,
            "trained_on": trained,
            "sample_answers": [
                {"prompt": p, "answer": a} for p, a in list(zip(repeated, answers, strict=True))[:3]
            ],
        }
        rows.append(row)
        print(
            f"{name}: gold win vs base {win.rate:.3f} [{win.low:.3f}, {win.high:.3f}], "
            f"ROUGE-L {row['rouge_l']:.3f} ({row['rouge_l_minus_base']:+.3f} "
            f"[{low:+.3f}, {high:+.3f}]), KL {kl:.2f}, {row['minutes']:.1f} min "
            f"(training {train_minutes:.1f}); {json.dumps({k: v for k, v in trained.items() if not isinstance(v, str)})}",
            flush=True,
        )
        (out / "trainers.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    (out / "trainers.json").write_text(json.dumps({"config": config, "rows": rows}, indent=2))
    print(f"total {(time.monotonic() - started) / 60:.1f} min; results in {out / 'trainers.json'}")


if __name__ == "__main__":
    main()
