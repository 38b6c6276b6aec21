"""Benchmark: the loop, judged by a gold judge it does not train (issue 14).

Against a real Label Studio and a real `ls-rlhf serve` process with the default models:

1. a gold judge (training/judge.py: a reward model trained once on FineGrainedRLHF's human
   pairs, cached) plays the annotators, with label noise matched to a human agreement rate;
2. the base policy writes comparison tasks (two answers each) for `--per-round` training
   questions of FineGrainedRLHF (questions 1-400);
3. each round the judge annotates the unannotated tasks through Label Studio's API, like a
   person; the annotation that crosses LS_RLHF_TRAIN_EVERY fires Label Studio's webhook, the
   backend's job pulls the export, retrains the proxy reward model, runs the loop's PPO step
   against it (training_job.policy_step, the `train ppo` code) and writes the next round's
   tasks with the new policy (LS_RLHF_NEXT_ROUND);
4. after each round the policy of that round is measured on held-out questions (401-500,
   never trained on by the judge, the proxy or PPO): its gold win rate against the base
   policy (the judge's noise-free scores; a 95 % bootstrap interval over questions), KL to
   the base, and its mean proxy reward; with the proxy's accuracy on the round's fresh
   labels (the served proxy on the new policy answers' labels, before it retrains on them).

Per round a line is printed; everything goes to `--out`/rounds.json and a plot (PNG).

Every new reward version is served by default (`--reward-promote always`): the loop's gate
compares held-out accuracy on the export's held-out split, here 20-30 pairs, where a
difference is a coin flip, and a kept version means no policy step that round. The gold
judge and the overoptimization alarm are what guard the policy in this benchmark.

    .venv/bin/python bench/loop_judged.py [--rounds 3] [--per-round 128] [--updates 40]
        [--lr 5e-5] [--held-out 100] [--samples 2] [--plot docs/loop_judged.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import requests
from label_studio_sdk import LabelStudio

import label_configs
from ml_backend.harness.backend_process import BackendServer
from ml_backend.harness.label_studio_server import (
    LABEL_STUDIO_VERSION,
    LabelStudioServer,
)
from ml_backend.harness.simulated_annotator import SimulatedAnnotator
from ml_backend.harness.waiting import wait_until
from training.finegrained import DEFAULT_PATH, finegrained_split, load_finegrained
from training.judge import (
    HUMAN_AGREEMENT,
    GoldJudge,
    build_judge,
    flip_rate_for_agreement,
)
from training.registry import Registry
from training.settings import Settings


def _get(url: str) -> dict:
    try:
        return requests.get(url, timeout=10).json()
    except (requests.RequestException, ValueError):
        return {}


def sample_answers(
    model_path: str, prompts: list[str], settings: Settings, samples: int, seed: int
):
    """`samples` answers per prompt with the loop's sampling settings, flattened:
    (prompts repeated, answers, whether the length limit cut each)."""
    from training.generation import generate_completions
    from training.models import load_causal_lm

    model, tokenizer = load_causal_lm(model_path, dtype=settings.dtype)
    truncated: list[list[bool]] = []
    completions = generate_completions(
        model,
        tokenizer,
        prompts,
        samples,
        settings.max_new_tokens,
        settings.temperature,
        settings.top_p,
        settings.generation_batch_size,
        seed,
        truncated=truncated,
    )
    repeated = [p for p in prompts for _ in range(samples)]
    return repeated, [a for c in completions for a in c], [t for c in truncated for t in c]


def measure_policy(
    policy_path: str,
    base_path: str,
    prompts: list[str],
    base_answers: list[str],
    judge: GoldJudge,
    proxy_path: Path | None,
    settings: Settings,
    samples: int,
    seed: int,
) -> dict:
    """Gold win rate against the base, KL to the base and mean proxy reward, on held-out
    questions."""
    from training.models import load_causal_lm
    from training.policy_eval import sequence_kl
    from training.reward import RewardModel

    repeated, answers, cut = sample_answers(policy_path, prompts, settings, samples, seed)
    win = judge.win_rate(repeated, answers, base_answers)
    policy, tokenizer = load_causal_lm(policy_path, dtype="float32")
    base, _ = load_causal_lm(base_path, dtype="float32")
    kl = (
        sequence_kl(policy, base, tokenizer, repeated, answers, cut)
        if policy_path != base_path
        else 0.0
    )
    gold = judge.scores(repeated, answers)
    figures = {
        "gold_win_rate": win.rate,
        "gold_win_low": win.low,
        "gold_win_high": win.high,
        "held_out_questions": win.prompts,
        "held_out_answers": len(answers),
        "kl_to_base_held_out": kl,
        "gold_mean_score": sum(gold) / len(gold),
        "mean_answer_words": sum(len(a.split()) for a in answers) / len(answers),
        "sample_answers": [
            {"prompt": p, "answer": a} for p, a in list(zip(repeated, answers, strict=True))[:4]
        ],
    }
    if proxy_path is not None:
        proxy = RewardModel.load(proxy_path).score(repeated, answers)
        figures["proxy_mean_reward_held_out"] = sum(proxy) / len(proxy)
    return figures


def alarm_state(reasons: list[str] | None) -> str:
    """The alarm of a round in one word: quiet, accuracy (the proxy rose while its live
    accuracy fell), kl (past the bound), or both; '-' where no policy step ran."""
    if reasons is None:
        return "-"
    kinds = [
        kind
        for kind, word in (("accuracy", "accuracy on fresh labels"), ("kl", "past the bound"))
        if any(word in r for r in reasons)
    ]
    return "+".join(kinds) or "quiet"


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    ax = axes[0]
    ax.errorbar(
        rounds,
        [r["gold_win_rate"] for r in rows],
        yerr=[
            [r["gold_win_rate"] - r["gold_win_low"] for r in rows],
            [r["gold_win_high"] - r["gold_win_rate"] for r in rows],
        ],
        marker="o",
        capsize=4,
    )
    for r in rows:
        if r.get("alarm"):  # the round's policy was not served
            ax.annotate(
                f"alarm: {r.get('alarm_state', '')}",
                (r["round"], r["gold_win_rate"]),
                color="red",
                textcoords="offset points",
                xytext=(4, 6),
            )
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.axhline(0.6, color="green", lw=0.8, ls=":")
    ax.set(title="gold win rate vs base (95% CI)", xlabel="round", ylim=(0.2, 0.9))
    axes[1].plot(
        rounds, [r.get("proxy_mean_reward_held_out") for r in rows], marker="o", label="held-out"
    )
    axes[1].plot(
        rounds, [r.get("policy_score_last") for r in rows], marker="s", label="PPO's last rollout"
    )
    axes[1].set(title="policy's mean proxy reward", xlabel="round")
    axes[1].legend()
    axes[2].plot(
        rounds,
        [r.get("live_accuracy") for r in rows],
        marker="o",
        label="on the round's fresh labels",
    )
    axes[2].plot(
        rounds, [r.get("accuracy_after") for r in rows], marker="s", label="held-out split"
    )
    axes[2].axhline(0.5, color="grey", lw=0.8, ls="--")
    axes[2].set(title="proxy accuracy", xlabel="round")
    axes[2].legend()
    axes[3].plot(rounds, [r.get("kl_to_base_held_out") for r in rows], marker="o", label="held-out")
    axes[3].plot(
        rounds, [r.get("policy_kl_to_base") for r in rows], marker="s", label="PPO's last rollout"
    )
    axes[3].set(title="KL to base", xlabel="round")
    axes[3].legend()
    for ax in axes:
        ax.set_xticks(rounds)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=128, help="comparisons labelled per round")
    parser.add_argument("--updates", type=int, default=40, help="PPO updates per round")
    parser.add_argument("--lr", type=float, default=5e-5, help="PPO learning rate of the loop")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="responses per PPO rollout of the loop"
    )
    parser.add_argument(
        "--prompt-pool",
        type=int,
        default=400,
        help="training questions the loop draws its rounds and PPO prompts from "
        "(LS_RLHF_LOOP_PROMPTS; 0: the first round's --per-round questions only)",
    )
    parser.add_argument("--max-kl", type=float, default=0.0, help="the alarm's KL bound (0: none)")
    parser.add_argument(
        "--alarm-accuracy-drop",
        type=float,
        default=None,
        help="LS_RLHF_LOOP_ALARM_ACCURACY_DROP of the loop (default: the setting's)",
    )
    parser.add_argument("--held-out", type=int, default=100, help="held-out questions (of 100)")
    parser.add_argument("--samples", type=int, default=2, help="answers per held-out question")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--agreement",
        type=float,
        default=HUMAN_AGREEMENT,
        help="human agreement rate the judge's flip rate is matched to",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="judge's Bradley-Terry temperature"
    )
    parser.add_argument(
        "--judge", help="judge folder (default ~/.cache/ls-rlhf/judges/...); built if missing"
    )
    parser.add_argument(
        "--reward-promote",
        default="always",
        choices=["always", "if_not_worse"],
        help="LS_RLHF_REWARD_PROMOTE of the loop (default always: see the module docstring)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/output/loop_judged")
    parser.add_argument("--plot", default=None, help="PNG path (default OUT/loop_judged.png)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    judge_started = time.monotonic()
    judge_path = build_judge(args.judge)
    judge_seconds = time.monotonic() - judge_started
    flip = flip_rate_for_agreement(args.agreement)
    judge = GoldJudge(judge_path, temperature=args.temperature, flip_rate=flip, seed=args.seed)
    annotator = SimulatedAnnotator(judge=judge)
    print(
        f"gold judge {judge_path} (held-out accuracy on human pairs "
        f"{judge.info.get('held_out_accuracy', float('nan')):.3f}); flip rate {flip:.3f} "
        f"(agreement {args.agreement}), temperature {args.temperature}; ready in {judge_seconds:.0f} s",
        flush=True,
    )

    records = load_finegrained(DEFAULT_PATH)
    train_records, held = finegrained_split(records)
    questions = list(dict.fromkeys(r["question"] for r in train_records))
    pool = questions[: args.prompt_pool]
    train_prompts = (pool or questions)[: args.per_round]
    held_prompts = list(dict.fromkeys(r["question"] for r in held))[: args.held_out]

    workdir = Path(tempfile.mkdtemp(prefix="bench-loop-judged-"))
    base_settings = Settings.from_env()
    settings = dataclasses.replace(
        base_settings,
        home=workdir / "home",
        train_every=args.per_round,
        loop_policy="ppo",
        loop_policy_updates=args.updates,
        loop_policy_learning_rate=args.lr,
        loop_policy_batch_size=args.batch_size,
        loop_prompts=str(workdir / "prompts.jsonl") if pool else "",
        loop_max_kl=args.max_kl,
        loop_alarm_accuracy_drop=(
            base_settings.loop_alarm_accuracy_drop
            if args.alarm_accuracy_drop is None
            else args.alarm_accuracy_drop
        ),
        next_round=args.per_round,
        reward_promote=args.reward_promote,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )
    if pool:
        Path(settings.loop_prompts).write_text(
            "".join(json.dumps({"prompt": p}) + "\n" for p in pool), encoding="utf-8"
        )
    (settings.home / "models").mkdir(parents=True, exist_ok=True)
    cached = base_settings.models_cache_dir / "SmolLM2-135M-Instruct"
    if cached.is_dir():  # reuse the converted default policy
        shutil.copytree(cached, settings.home / "models" / cached.name)
    from training.models import resolve_policy

    base_path = resolve_policy(settings.policy_model, settings.models_cache_dir)

    # The base policy's held-out answers, once: every round's policy is compared with them.
    held_repeated, base_answers, _ = sample_answers(
        base_path, held_prompts, settings, args.samples, args.seed + 1
    )
    base_gold = judge.scores(held_repeated, base_answers)

    template = (
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        / "ls-rlhf-test"
        / f"label-studio-{LABEL_STUDIO_VERSION}"
    )
    studio = LabelStudioServer(data_dir=workdir / "label-studio")
    if (template / "label_studio.sqlite3").is_file():  # skips the first start's migrations
        shutil.copytree(template, studio.data_dir, dirs_exist_ok=True)
    studio.start()
    settings = settings.replace(label_studio_url=studio.url, label_studio_api_key=studio.token)
    backend = BackendServer(settings, workdir / "backend.log")
    url = backend.url
    rows: list[dict] = []
    header = (
        f"{'round':>5} {'annotations':>11} {'proxy acc fresh':>15} {'proxy acc held':>14} "
        f"{'policy':>10} {'served':>6} {'proxy reward':>12} {'gold win vs base [95%]':>24} "
        f"{'KL (held-out)':>13} {'KL (PPO)':>8} {'minutes':>7} {'alarm':>8}"
    )
    config = {
        k: getattr(args, k)
        for k in (
            "rounds",
            "per_round",
            "updates",
            "lr",
            "batch_size",
            "prompt_pool",
            "max_kl",
            "held_out",
            "samples",
            "reward_promote",
        )
    }
    config.update(
        alarm_accuracy_drop=settings.loop_alarm_accuracy_drop,
        max_new_tokens=args.max_new_tokens,
        agreement=args.agreement,
        flip_rate=flip,
        temperature=args.temperature,
        judge=str(judge_path),
        judge_info=judge.info,
        machine=f"{platform.machine()}, {os.cpu_count()} cores",
        base_gold_mean_score=sum(base_gold) / len(base_gold),
    )
    try:
        backend.start(timeout=600)
        ls = LabelStudio(base_url=studio.url, api_key=studio.token)
        xml = label_configs.load("pairwise")
        project = ls.projects.create(title="bench loop judged", label_config=xml)
        assert project.id is not None
        # Connecting creates Label Studio's webhook to /webhook: annotations reach the backend.
        ls.ml.create(project=project.id, url=url, title="ls-rlhf", is_interactive=False)
        requests.post(f"{url}/setup", json={"project": project.id}, timeout=10)
        from ml_backend.training_job import next_round

        registry = Registry(settings.registry_dir)
        # Round 1's tasks: the base policy's answers, written as the loop writes later rounds.
        next_round(settings, studio.url, studio.token, project.id, xml, train_prompts, registry)
        print(header, flush=True)
        total = 0
        done: set[int] = set()
        for number in range(1, args.rounds + 1):
            listed: list = list(ls.tasks.list(project=project.id))
            todo = [(t.id, t.data) for t in listed if not t.total_annotations][: args.per_round]
            for task_id, data in todo:
                ls.annotations.create(
                    id=task_id, result=annotator.pairwise_result(data), ground_truth=False
                )
            total += len(todo)

            def finished():
                for job in _get(f"{url}/jobs").get("jobs", []):
                    if job["id"] not in done and job["state"] in ("done", "failed"):
                        done.add(job["id"])
                        return job
                return None

            job = wait_until(finished, 3600)
            metrics = job.get("metrics") or {}
            if job["state"] != "done":
                raise RuntimeError(f"round {number}: job {job['state']}: {job.get('message')}")
            if "policy_version" in metrics:
                policy = registry.get("policy", metrics["policy_version"].removeprefix("policy-"))
                policy_path = str(policy.path)
            else:
                # The gate kept the served reward version, so the loop took no policy step
                # and wrote no tasks: the served policy writes the next round, as in round 1.
                served_policy = registry.current("policy")
                policy_path = str(served_policy.path) if served_policy else base_path
                metrics["policy_version"] = served_policy.label if served_policy else "base"
                listed = list(ls.tasks.list(project=project.id))
                asked = [{"data": task.data} for task in listed]
                next_round(
                    settings,
                    studio.url,
                    studio.token,
                    project.id,
                    xml,
                    pool or train_prompts,
                    registry,
                    asked,
                )
            reward = registry.current("reward")
            figures = measure_policy(
                policy_path,
                base_path,
                held_prompts,
                base_answers,
                judge,
                reward.path if reward else None,
                settings,
                args.samples,
                args.seed + 1,
            )
            row = {
                "round": number,
                "annotations": total,
                "minutes": (time.monotonic() - started) / 60,
                **{
                    k: metrics.get(k)
                    for k in (
                        "reward_version",
                        "accuracy_after",
                        "live_accuracy",
                        "fresh_pairs",
                        "policy_version",
                        "policy_promoted",
                        "alarm",
                        "previous_live_accuracy",
                        "policy_score_first",
                        "policy_score_last",
                        "policy_kl_to_base",
                        "message",
                    )
                },
                **figures,
            }
            row["alarm_state"] = alarm_state(row.get("alarm"))
            rows.append(row)
            live = row["live_accuracy"]
            print(
                f"{number:>5} {total:>11} {'-' if live is None else format(live, '.3f'):>15} "
                f"{row['accuracy_after'] or float('nan'):>14.3f} {row['policy_version']:>10} "
                f"{ {True: 'yes', False: 'NO', None: '-'}[row['policy_promoted']]:>6} "
                f"{row.get('proxy_mean_reward_held_out', float('nan')):>+12.4f} "
                f"{row['gold_win_rate']:>9.3f} [{row['gold_win_low']:.3f}, {row['gold_win_high']:.3f}] "
                f"{row['kl_to_base_held_out']:>13.2f} {row['policy_kl_to_base'] or float('nan'):>8.2f} {row['minutes']:>7.1f} {row['alarm_state']:>8}",
                flush=True,
            )
            if row["alarm"]:
                print(f"      alarm: {'; '.join(row['alarm'])}", flush=True)
            (out / "rounds.json").write_text(
                json.dumps({"config": config, "rounds": rows}, indent=2)
            )
            plot(
                rows,
                Path(args.plot) if args.plot else out / "loop_judged.png",
                f"{args.rounds} rounds x {args.per_round} judged comparisons, {args.updates} PPO "
                f"updates/round at lr {args.lr:g}; {len(held_prompts)} held-out questions x {args.samples}",
            )
    finally:
        backend.stop()
        studio.stop()
    print(f"total {(time.monotonic() - started) / 60:.1f} min; results in {out / 'rounds.json'}")


if __name__ == "__main__":
    main()
