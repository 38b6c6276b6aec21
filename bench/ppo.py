"""Benchmark: PPO (training/ppo.py) against TRL's GRPOTrainer, same policy, reward and budget.

Default policy (SmolLM2-135M-Instruct) and a MiniLM reward model trained here on
FineGrainedRLHF rankings (first 400 questions; --reward-epochs at --reward-lr). Each trainer runs in its own
process for the same budget: --updates optimizer rounds of --batch prompts x
--generations samples each, --new-tokens tokens per answer. Reported: seconds per update,
peak memory while training (the process's peak resident set, reset when training starts:
the trainer's models, optimizer and activations, not the evaluation's), mean reward on --eval-prompts held-out questions
before and after, KL to the starting policy on those answers, and reward gain per CPU
minute (user + system time of the training). Also, by the gold judge of training/judge.py
(a reward model trained once on FineGrainedRLHF's human pairs, not the one optimized here):
the trained policy's win rate against the starting policy on the same held-out answers
(noise-free scores, ties half, a question's answers averaged first, 95 % bootstrap interval
over questions; --judge none skips it).

    .venv/bin/python bench/ppo.py [--updates 10] [--batch 4] [--generations 2]

With --engines hf,vllm the PPO trainer runs once per engine: its rollouts sampled in
process, then by a vLLM server (training/engine.py) started from .venv-vllm on the
policy in bfloat16 before the clock starts and given each update's weights (saved and
reloaded in place: "reload s/update"); the held-out evaluation is in-process for both.

Runs at different learning rates reach different KL; to compare trainers at equal KL,
append each run to a file (--results runs.jsonl) and plot the gains against KL
(--plot runs.jsonl frontier.png, which runs nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memory import peak_memory_gb, reset_peak_memory  # bench/memory.py (the script's folder)

from training.finegrained import DEFAULT_PATH as DATA
from training.registry import Registry


def cpu_seconds() -> float:
    """This process's CPU time and its finished children's (a vLLM server, once stopped)."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def prepare_reward(folder: Path, epochs: float, lr: float) -> None:
    from training.datasets import split_by_prompt
    from training.finegrained import finegrained_split, load_finegrained, preference_pairs
    from training.models import resolve_reward_backbone
    from training.reward import RewardTrainingConfig, train_reward

    train_records, _ = finegrained_split(load_finegrained(DATA))
    split = split_by_prompt(preference_pairs(train_records, "ranking"), 0.1)
    config = RewardTrainingConfig(
        method="finetune",
        num_train_epochs=epochs,
        learning_rate=lr,
        max_length=256,
        eval_steps=0,
        promote="always",
        dtype="float32",  # as in the earlier rows (sessions 8-11); bf16 is a reward-path default now
    )
    result = train_reward(
        split["train"], split["test"], Registry(folder), resolve_reward_backbone("default"), config
    )
    print(
        f"reward model: {result.metrics['steps']} steps, held-out accuracy {result.metrics['accuracy_after']:.3f}",
        flush=True,
    )


def held_out_prompts(n: int, samples: int) -> tuple[list[str], list[str]]:
    """Training questions, and n held-out ones each repeated `samples` times (one sampled
    answer per row), since one answer per question leaves the mean within noise."""
    from training.finegrained import finegrained_split, load_finegrained

    train, test = finegrained_split(load_finegrained(DATA))
    return [r["question"] for r in train], [r["question"] for r in test[:n] for _ in range(samples)]


def evaluate(policy, reference, tokenizer, reward, prompts: list[str], new_tokens: int):
    """The policy's and the reference's answers to each prompt (same sampling seed), their
    rewards, and the policy's KL to the reference (training.policy_eval.PolicyEvaluation)."""
    from training.policy_eval import evaluate_policy

    return evaluate_policy(
        policy, reference, tokenizer, reward.score, prompts, max_new_tokens=new_tokens
    )


def start_engine(path: str, folder: Path):
    """A vLLM server on the policy and an engine talking to it (bfloat16: vLLM's CPU path)."""
    from ml_backend.harness.vllm_server import VLLMServer
    from training.engine import VLLMEngine

    server = VLLMServer(Path(path), folder, dtype="bfloat16", kv_cache_gb=2)
    started = time.perf_counter()
    server.start()
    print(f"vLLM server started in {time.perf_counter() - started:.0f} s", flush=True)
    return server, VLLMEngine(server.url, folder / "weights"), time.perf_counter() - started


def run_one(kind: str, args: argparse.Namespace) -> dict:
    import torch

    from training.models import load_causal_lm, resolve_policy
    from training.reward import RewardModel
    from training.settings import Settings

    torch.manual_seed(0)
    reward = RewardModel.load(Registry(args.reward_registry).current("reward").path)
    path = resolve_policy("default", Settings.from_env().models_cache_dir)
    policy, tokenizer = load_causal_lm(path)
    reference, _ = load_causal_lm(path)
    train_prompts, eval_prompts = held_out_prompts(args.eval_prompts, args.eval_samples)
    before = evaluate(
        reference, reference, tokenizer, reward, eval_prompts, args.new_tokens
    ).policy_rewards
    del reference  # the trainers hold their own; the evaluation's is loaded again after
    gc.collect()
    server, engine, engine_start = None, None, 0.0
    if kind == "ppo" and args.engine == "vllm":
        server, engine, engine_start = start_engine(path, Path(tempfile.mkdtemp()))
    reset_peak_memory()
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    if kind == "ppo":
        from training.ppo import PPOConfig, PPOTrainer

        # One rollout = batch prompts x generations answers, like GRPO's group of samples.
        config = PPOConfig(
            updates=args.updates,
            batch_size=args.batch * args.generations,
            samples_per_prompt=args.generations,
            mini_batch_size=args.mini_batch,
            ppo_epochs=args.ppo_epochs,
            lam=args.lam,
            learning_rate=args.lr,
            max_new_tokens=args.new_tokens,
            init_kl_coef=args.kl,
            kl_loss_coef=args.kl_loss,
            adaptive_kl=False,
            missing_eos_penalty=0.0,
        )
        trainer = PPOTrainer(policy, tokenizer, reward.score, config, engine=engine)
        trainer.train(train_prompts)
        trained = trainer.unwrapped.policy
        if server is not None:
            server.stop()
    else:
        from datasets import Dataset
        from trl import GRPOConfig, GRPOTrainer

        from training.policy import machine_args

        def reward_func(prompts, completions, **_):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            questions = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
            return reward.score(questions, texts)

        data = Dataset.from_dict(
            {"prompt": [[{"role": "user", "content": p}] for p in train_prompts]}
        )
        with tempfile.TemporaryDirectory() as out:
            grpo_args = GRPOConfig(
                **machine_args(Path(out)),
                max_steps=args.updates,
                per_device_train_batch_size=args.batch * args.generations,
                num_generations=args.generations,
                max_completion_length=args.new_tokens,
                learning_rate=args.lr,
                beta=args.kl,
                temperature=1.0,
            )
            trainer = GRPOTrainer(
                model=policy,
                reward_funcs=reward_func,
                args=grpo_args,
                train_dataset=data,
                processing_class=tokenizer,
            )
            trainer.train()
        trained = policy
    cpu, wall = cpu_seconds() - cpu0, time.perf_counter() - wall0
    peak_gb = peak_memory_gb()
    reference, _ = load_causal_lm(path)
    trained.eval()
    evaluation = evaluate(trained, reference, tokenizer, reward, eval_prompts, args.new_tokens)
    after, kl = evaluation.policy_rewards, evaluation.kl
    gold = {}
    if args.judge != "none":
        # The gold judge (training/judge.py, trained once on human pairs, not the reward
        # model optimized here): does the gain hold by a judge the trainer never saw?
        from training.judge import GoldJudge, build_judge

        judge = GoldJudge(build_judge(args.judge or None))
        win = judge.win_rate(
            evaluation.prompts, evaluation.policy_answers, evaluation.reference_answers
        )
        gold = {"gold_win_rate": win.rate, "gold_win_low": win.low, "gold_win_high": win.high}
    # Standard error of the gain, paired by prompt row (same question, same sampling seed).
    gains = [a - b for a, b in zip(after, before, strict=True)]
    reloads = [h.get("time/engine_reload_seconds", 0.0) for h in getattr(trainer, "history", [])]
    return {
        "trainer": kind,
        "engine": args.engine if kind == "ppo" else "hf",
        "engine_start_seconds": engine_start,
        "reload_seconds_per_update": statistics.fmean(reloads) if reloads else 0.0,
        "reward_before": statistics.fmean(before),
        "reward_after": statistics.fmean(after),
        "gain_se": statistics.stdev(gains) / len(gains) ** 0.5,
        "kl": kl,
        "seconds_per_update": wall / args.updates,
        "cpu_minutes": cpu / 60,
        "peak_gb": peak_gb,
        "gain_per_cpu_minute": statistics.fmean(gains) / (cpu / 60),
        **gold,
    }


def plot_frontier(results: Path, out: Path) -> None:
    """Held-out reward gain against KL to the start: one line per trainer and setting, one
    point per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(r: dict) -> str:
        if r["trainer"] != "ppo":
            return r["trainer"].upper()
        kl_loss = f", KL in loss {r['kl_loss']:g}" if r.get("kl_loss") else ""
        return (
            f"PPO, {r['ppo_epochs']} epoch(s) of minibatches of {r['mini_batch']}, "
            f"λ {r['lam']:g}{kl_loss}"
        )

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in sorted({series(r) for r in rows}):
        runs = sorted((r for r in rows if series(r) == name), key=lambda r: r["kl"])
        gains = [r["reward_after"] - r["reward_before"] for r in runs]
        ax.errorbar(
            [r["kl"] for r in runs],
            gains,
            yerr=[r["gain_se"] for r in runs],
            marker="o",
            capsize=3,
            label=name,
        )
        for r, gain in zip(runs, gains, strict=True):
            ax.annotate(
                f"lr {r['lr']:g}",
                (r["kl"], gain),
                textcoords="offset points",
                xytext=(5, -10),
                fontsize=7,
            )
    ax.set(
        xlabel="KL to the starting policy (held-out answers)",
        ylabel="held-out reward gain (± s.e.)",
        title="Reward gain against KL, same budget of updates",
    )
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4, help="prompts per update")
    parser.add_argument("--generations", type=int, default=2, help="answers per prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument(
        "--ppo-epochs", type=int, default=2, help="PPO passes over each rollout (GRPO makes one)"
    )
    parser.add_argument(
        "--mini-batch",
        type=int,
        help="PPO answers per gradient step (default: --batch, so two steps per epoch)",
    )
    parser.add_argument("--lam", type=float, default=0.95, help="PPO's GAE lambda")
    parser.add_argument(
        "--kl", type=float, default=0.05, help="KL coefficient (PPO init_kl_coef, GRPO beta)"
    )
    parser.add_argument(
        "--kl-loss",
        type=float,
        default=0.0,
        help="PPO's kl_loss_coef: weight of a k3 KL-to-reference term in its loss, as GRPO's beta",
    )
    parser.add_argument("--eval-prompts", type=int, default=100, help="held-out questions")
    parser.add_argument("--eval-samples", type=int, default=2, help="answers per held-out question")
    parser.add_argument("--reward-epochs", type=float, default=1.0)
    parser.add_argument("--reward-lr", type=float, default=1e-4)
    parser.add_argument("--trainers", default="ppo,grpo", help="which to run, comma-separated")
    parser.add_argument(
        "--judge",
        default="",
        help="gold judge folder for the win rate against the starting policy (default: the "
        "cached one of training/judge.py, built if missing; none: skip)",
    )
    parser.add_argument(
        "--engines",
        default="hf",
        help="generation engines of the PPO rollouts, comma-separated: hf (in-process), vllm",
    )
    parser.add_argument("--engine", default="hf", help=argparse.SUPPRESS)
    parser.add_argument("--only", choices=["ppo", "grpo"], help=argparse.SUPPRESS)
    parser.add_argument(
        "--reward-registry",
        help="registry folder to keep the reward model in: trained there once, reused after",
    )
    parser.add_argument(
        "--results", help="append each trainer's result, with its settings, to this JSON-lines file"
    )
    parser.add_argument(
        "--plot",
        nargs=2,
        metavar=("RESULTS", "PNG"),
        help="plot the gain against KL of the runs in a --results file, and exit",
    )
    args = parser.parse_args()
    args.mini_batch = args.mini_batch or args.batch
    if args.plot:
        plot_frontier(Path(args.plot[0]), Path(args.plot[1]))
        return
    if args.only:
        print("RESULT " + json.dumps(run_one(args.only, args)), flush=True)
        return
    # Which code runs, read before it does: timings change with it, and older rows stay in
    # the results file.
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
        check=False,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        registry = args.reward_registry or scratch
        if args.reward_registry is None or Registry(registry).current("reward") is None:
            prepare_reward(Path(registry), args.reward_epochs, args.reward_lr)
        rows = []
        runs = [
            (kind, engine)
            for kind in args.trainers.split(",")
            for engine in (args.engines.split(",") if kind == "ppo" else ["hf"])
        ]
        for kind, engine in runs:
            command = [sys.executable, __file__, "--only", kind, "--reward-registry", registry] + [
                f"--{k.replace('_', '-')}={v}"
                for k, v in vars(args).items()
                if k not in ("only", "reward_registry", "trainers", "results", "plot", "engines")
                and k != "engine"
                and v is not None
            ]
            command.append(f"--engine={engine}")
            output = subprocess.run(command, capture_output=True, text=True, check=False)
            line = next((ln for ln in output.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(output.stderr[-3000:])
                raise SystemExit(f"{kind} failed")
            rows.append(json.loads(line[7:]))
    if args.results:
        settings = {k: getattr(args, k) for k in ("updates", "batch", "generations", "new_tokens")}
        settings |= {"lr": args.lr, "kl_coef": args.kl}  # "kl" is the result's
        ppo_settings = {
            "ppo_epochs": args.ppo_epochs,
            "mini_batch": args.mini_batch,
            "lam": args.lam,
            "kl_loss": args.kl_loss,
        }
        with open(args.results, "a") as out:
            for r in rows:
                extra = ppo_settings if r["trainer"] == "ppo" else {}
                row = {
                    **r,
                    **settings,
                    **extra,
                    "date": time.strftime("%Y-%m-%d"),
                    "commit": commit,
                }
                out.write(json.dumps(row) + "\n")
    print(
        f"machine: {platform.machine()}; budget: {args.updates} updates x {args.batch} prompts x {args.generations} answers x {args.new_tokens} tokens; "
        f"lr {args.lr}, KL coefficient {args.kl}, PPO epochs {args.ppo_epochs} of minibatches of {args.mini_batch}, GAE lambda {args.lam}, KL in PPO's loss {args.kl_loss}"
    )
    print(
        f"{'trainer':<8}{'engine':<7}{'s/update':>10}{'reload s':>9}{'peak GB':>9}{'reward before':>15}{'after':>9}{'± s.e.':>8}{'KL':>8}{'gain / CPU-min':>16}{'gold win vs start [95%]':>26}"
    )
    for r in rows:
        print(
            f"{r['trainer']:<8}{r['engine']:<7}{r['seconds_per_update']:>10.1f}{r['reload_seconds_per_update']:>9.2f}{r['peak_gb']:>9.2f}{r['reward_before']:>15.4f}{r['reward_after']:>9.4f}{r['gain_se']:>8.4f}{r['kl']:>8.3f}{r['gain_per_cpu_minute']:>16.5f}"
            + (
                f"{r['gold_win_rate']:>9.3f} [{r['gold_win_low']:.3f}, {r['gold_win_high']:.3f}]"
                if "gold_win_rate" in r
                else f"{'-':>26}"
            )
        )


if __name__ == "__main__":
    main()
