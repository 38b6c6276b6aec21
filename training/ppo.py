"""PPO for RLHF, compact and readable top to bottom.

Follows InstructGPT (Ouyang et al., 2022) and "The N Implementation Details of RLHF with
PPO" (Huang et al., 2023). One update is:

1. rollout: sample `samples_per_prompt` responses for each prompt from the policy; score
   the decoded text with `reward_fn` (so the reward model may use any tokenizer); scores
   are normalized by the running mean and standard deviation of all scores so far, so the
   KL coefficient means the same for any reward model's scale (Huang et al., "reward
   normalization"); with several samples per prompt each score is taken relative to the
   mean of its siblings' (leave-one-out, as in RLOO), which removes how easy the prompt
   is from the signal, something a freshly initialized value head cannot do for many
   updates; a response that never ends (no eos) gets `missing_eos_penalty` subtracted;
2. per-token rewards: -kl_coef * (log pi(a|s) - log pi_ref(a|s)) at every token (the KL
   penalty to the frozen reference), plus the score at the last token; the sampled tokens'
   log-probs and values come from the generation pass, so only the reference runs again;
3. bootstrap values / GAE: advantages with gamma and lambda over the response tokens,
   returns = advantages + values, advantages whitened;
4. PPO epochs over minibatches: clipped policy loss, clipped value loss, optionally a k3
   KL-to-reference term (`kl_loss_coef`, GRPO's way), and metrics (approx KL, clip
   fraction, entropy, explained variance);
5. adaptive KL controller (Ziegler et al., 2019): kl_coef follows a target KL.

The value head is a linear layer on the policy's last hidden state: one trunk instead of
a second 135M model keeps peak memory low (policy + reference + optimizer state). With
`lora_r > 0` only LoRA adapters train, and the reference is the same model with its
adapters disabled: no second copy at all. `accelerate` places the models, so the same
code runs under `accelerate launch` on GPUs.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from training.generation import render_prompt

log = logging.getLogger(__name__)

RewardFn = Callable[[list[str], list[str]], list[float]]


@dataclass
class PPOConfig:
    """PPO's settings. The defaults of the rollout's shape, lambda, epochs and the KL term
    in the loss are those that beat TRL's GRPO per CPU-minute at equal KL in
    `bench/ppo.py` (docs/benchmarks.md); the learning rate is kept low, as the safe start
    for a model nobody has measured."""

    updates: int = field(
        default=20, metadata={"help": "PPO updates (rollout + optimization rounds)."}
    )
    batch_size: int = field(default=8, metadata={"help": "Responses per rollout."})
    samples_per_prompt: int = field(
        default=2,
        metadata={
            "help": "Responses sampled per prompt (batch_size / this prompts per rollout); "
            "above 1, each score is taken relative to its siblings' mean."
        },
    )
    mini_batch_size: int = field(default=8, metadata={"help": "Responses per gradient step."})
    ppo_epochs: int = field(default=1, metadata={"help": "Passes over each rollout."})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate."})
    max_new_tokens: int = field(default=32, metadata={"help": "Response length limit."})
    max_prompt_length: int = field(
        default=256, metadata={"help": "Prompt tokens kept (from the left)."}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; log-probs use the same."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(
        default=1.0,
        metadata={
            "help": "GAE lambda: 1 credits every token with the whole score; below 1 leans "
            "on the value head, which learns little in a few dozen updates."
        },
    )
    cliprange: float = field(default=0.2, metadata={"help": "Policy ratio clip range."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    init_kl_coef: float = field(
        default=0.05, metadata={"help": "Initial per-token KL penalty coefficient."}
    )
    kl_loss_coef: float = field(
        default=0.2,
        metadata={
            "help": "Weight of a KL-to-reference term (the k3 estimator, per token) in the "
            "policy loss, as GRPO's beta: it pulls every token back directly, where the "
            "reward penalty acts only through the advantages. 0: the reward penalty alone."
        },
    )
    adaptive_kl: bool = field(
        default=True, metadata={"help": "Adapt the KL coefficient to target_kl."}
    )
    target_kl: float = field(
        default=6.0, metadata={"help": "Target sequence KL of the adaptive controller."}
    )
    kl_horizon: int = field(
        default=10000, metadata={"help": "Horizon (in samples) of the adaptive controller."}
    )
    normalize_scores: bool = field(
        default=True,
        metadata={
            "help": "Divide scores by their running standard deviation (after removing the "
            "running mean), so init_kl_coef is in units of the reward's spread."
        },
    )
    missing_eos_penalty: float = field(
        default=1.0, metadata={"help": "Subtracted from the score of a response without eos."}
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    seed: int = field(default=0, metadata={"help": "Random seed."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"lam ({self.lam}) and gamma ({self.gamma}) must be within [0, 1]")
        if self.init_kl_coef < 0 or self.kl_loss_coef < 0:
            raise ValueError(
                f"init_kl_coef ({self.init_kl_coef}) and kl_loss_coef ({self.kl_loss_coef}) "
                "must be at least 0"
            )
        if self.ppo_epochs < 1 or self.mini_batch_size < 1:
            raise ValueError("ppo_epochs and mini_batch_size must be at least 1")
        if self.samples_per_prompt < 1 or self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of samples_per_prompt "
                f"({self.samples_per_prompt}): a rollout holds whole groups of samples per prompt"
            )


# -- closed-form pieces (tested against values computed by hand) ---------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as in TRL/N-details)."""
    mean = masked_mean(x, mask)
    centered = x - mean
    variance = masked_mean(centered**2, mask) * mask.sum() / (mask.sum() - 1).clamp(min=1)
    whitened = centered * torch.rsqrt(variance + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> torch.Tensor:
    """Generalized advantage estimation over each row's valid (mask=1) tokens."""
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = (
            values[:, t + 1] * mask[:, t + 1]
            if t + 1 < rewards.shape[1]
            else torch.zeros_like(last)
        )
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages


def kl_estimates(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3)."""
    log_ratio = logprobs - ref_logprobs
    return {"k1": log_ratio, "k2": 0.5 * log_ratio**2, "k3": torch.expm1(-log_ratio) + log_ratio}


def clipped_policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clip fraction) of PPO's clipped surrogate objective."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def clipped_value_loss(
    new_values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> torch.Tensor:
    clipped = old_values + torch.clamp(new_values - old_values, -cliprange, cliprange)
    return 0.5 * masked_mean(
        torch.maximum((new_values - returns) ** 2, (clipped - returns) ** 2), mask
    )


def leave_one_out_baseline(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Each score minus the mean of the other scores for the same prompt; `scores` holds
    `group` consecutive responses per prompt."""
    grouped = scores.view(-1, group)
    others = (grouped.sum(1, keepdim=True) - grouped) / (group - 1)
    return (grouped - others).view(-1)


class AdaptiveKLController:
    """kl_coef *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon (Ziegler et al., 2019)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


# -- the trainer ------------------------------------------------------------------------------


class RunningMoments:
    """Mean and standard deviation of every value seen so far (Chan et al.'s parallel
    update), for normalizing reward-model scores whose scale is arbitrary."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: torch.Tensor) -> None:
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / (self.count - 1)) ** 0.5 if self.count > 1 else 1.0

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        return (values - self.mean) / max(self.std, 1e-8)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as `generate` counts them: with
    left-padded prompts the default (0 at the first pad) would score tokens at other
    positions than they were sampled at, in models with absolute position embeddings."""
    return (attention_mask.cumsum(1) - 1).clamp(min=0)


class PolicyWithValueHead(nn.Module):
    """The policy and a scalar value head on its last hidden state."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        hidden = policy.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, values) at the positions that predict the last `response_length` tokens.

        The language-model head runs on those positions only: over the prompt it would cost
        a (batch, prompt, vocabulary) tensor, most of the memory of an update, for nothing.
        """
        out = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids(attention_mask),
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=response_length + 1,
        )
        hidden = out.hidden_states[-1][:, -response_length - 1 : -1]
        return out.logits[:, :-1], self.value_head(hidden).squeeze(-1)


@dataclass
class Rollout:
    input_ids: torch.Tensor  # query + response, left-padded queries
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # 1 on response tokens up to and including eos
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor  # per token, KL penalty + score at the end
    scores: torch.Tensor  # the reward model's, as it gave them
    final_scores: torch.Tensor  # normalized, minus the missing-eos penalty: what was optimized
    texts: list[str]


class PPOTrainer:
    def __init__(
        self, policy: nn.Module, tokenizer, reward_fn: RewardFn, config: PPOConfig
    ) -> None:
        from accelerate import Accelerator

        torch.manual_seed(config.seed)
        self.config, self.tokenizer, self.reward_fn = config, tokenizer, reward_fn
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if config.lora_r > 0:
            from peft import LoraConfig, get_peft_model

            policy = get_peft_model(
                policy,
                LoraConfig(
                    r=config.lora_r,
                    lora_alpha=config.lora_alpha,
                    target_modules="all-linear",
                    task_type="CAUSAL_LM",
                ),
            )
            self.reference = None  # the same model with its adapters disabled
        else:
            self.reference = copy.deepcopy(policy).eval().requires_grad_(False)
        self.model = PolicyWithValueHead(policy)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, eps=1e-5)
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        if self.reference is not None:
            self.reference = self.reference.to(self.accelerator.device)
        self.kl = AdaptiveKLController(config.init_kl_coef, config.target_kl, config.kl_horizon)
        self.score_moments = RunningMoments()
        self.history: list[dict[str, float]] = []

    @property
    def unwrapped(self) -> PolicyWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return torch.gather(
            F.log_softmax(logits / self.config.temperature, dim=-1), 2, tokens.unsqueeze(-1)
        ).squeeze(-1)

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str]) -> Rollout:
        c, tok = self.config, self.tokenizer
        tok.padding_side, tok.truncation_side = "left", "left"
        rendered = [render_prompt(tok, p) for p in prompts]
        queries = tok(
            rendered,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=c.max_prompt_length,
            add_special_tokens=False,
        ).to(self.accelerator.device)
        policy = self.unwrapped.policy
        policy.eval()
        # The sampled tokens' log-probs and values come from the generation pass itself (its
        # raw logits and last hidden states): a second forward pass would recompute them.
        output = policy.generate(
            **queries,
            do_sample=True,
            temperature=c.temperature,
            top_k=0,
            top_p=1.0,
            max_new_tokens=c.max_new_tokens,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            return_dict_in_generate=True,
            output_logits=True,
            output_hidden_states=True,
        )
        q_len = queries["input_ids"].shape[1]
        responses = output.sequences[:, q_len:]
        # Keep tokens up to and including the first eos; what follows is padding.
        is_eos = responses == tok.eos_token_id
        ended = is_eos.any(dim=1)
        first_eos = torch.where(
            ended,
            is_eos.float().argmax(dim=1),
            torch.full_like(ended, responses.shape[1] - 1, dtype=torch.long),
        )
        positions = torch.arange(responses.shape[1], device=responses.device)
        response_mask = (positions[None, :] <= first_eos[:, None]).long()
        attention_mask = torch.cat([queries["attention_mask"], response_mask], dim=1)
        response_ids = torch.where(response_mask.bool(), responses, tok.pad_token_id)
        input_ids = torch.cat([queries["input_ids"], response_ids], dim=1)

        logprobs = self._logprobs(torch.stack(output.logits, dim=1), response_ids)
        # hidden_states holds, per generation step, every layer's output; the first step's
        # covers the whole prompt, and its last position predicts the first response token.
        steps = output.hidden_states
        last_hidden = torch.cat([steps[0][-1][:, -1:]] + [step[-1] for step in steps[1:]], dim=1)
        values = self.unwrapped.value_head(last_hidden).squeeze(-1)
        # With LoRA the reference is the policy with its adapters disabled.
        no_adapters = (
            policy.disable_adapter() if self.reference is None else contextlib.nullcontext()
        )
        with no_adapters:
            ref_logits = (self.reference or policy)(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                use_cache=False,
                logits_to_keep=response_ids.shape[1] + 1,
            ).logits
        ref_logprobs = self._logprobs(ref_logits[:, :-1], response_ids)

        texts = tok.batch_decode(response_ids, skip_special_tokens=True)
        scores = torch.tensor(
            self.reward_fn(list(prompts), [t.strip() for t in texts]),
            dtype=torch.float,
            device=logprobs.device,
        )
        final = scores
        if c.normalize_scores:
            self.score_moments.update(scores)
            final = self.score_moments.normalize(scores)
        if c.samples_per_prompt > 1:
            final = leave_one_out_baseline(final, c.samples_per_prompt)
        final = final - c.missing_eos_penalty * (~ended).float()
        mask = response_mask.float()
        rewards = -self.kl.value * kl_estimates(logprobs, ref_logprobs)["k1"] * mask
        rewards[torch.arange(len(prompts)), first_eos] += final
        return Rollout(
            input_ids,
            attention_mask,
            mask,
            logprobs * mask,
            ref_logprobs * mask,
            values * mask,
            rewards,
            scores,
            final,
            texts,
        )

    def step(self, prompts: Sequence[str]) -> dict[str, float]:
        """One PPO update on a batch of prompts (each sampled `samples_per_prompt` times);
        returns its metrics."""
        c = self.config
        started = time.perf_counter()
        prompts = [p for p in prompts for _ in range(c.samples_per_prompt)]
        r = self.rollout(prompts)
        mask = r.response_mask
        q_len = r.input_ids.shape[1] - mask.shape[1]

        # Bootstrap value / GAE.
        advantages = gae(r.rewards, r.values, mask, c.gamma, c.lam)
        returns = advantages + r.values
        advantages = masked_whiten(advantages, mask)

        # Minibatch updates.
        self.model.train()
        # Per-minibatch values under their metric names; each metric is their mean.
        stats: dict[str, list[float]] = defaultdict(list)
        for _ in range(c.ppo_epochs):
            for idx in torch.randperm(len(prompts)).split(c.mini_batch_size):
                logits, new_values = self.model(
                    r.input_ids[idx], r.attention_mask[idx], mask.shape[1]
                )
                new_logprobs = self._logprobs(logits, r.input_ids[idx, q_len:])
                m = mask[idx]
                pg_loss, clipfrac = clipped_policy_loss(
                    new_logprobs, r.logprobs[idx], advantages[idx], m, c.cliprange
                )
                vf_loss = clipped_value_loss(
                    new_values, r.values[idx], returns[idx], m, c.cliprange_value
                )
                loss = pg_loss + c.vf_coef * vf_loss
                if c.kl_loss_coef:
                    # Masked first: past eos the log-probs are not comparable.
                    kl_loss = masked_mean(
                        kl_estimates(new_logprobs * m, r.ref_logprobs[idx])["k3"], m
                    )
                    loss = loss + c.kl_loss_coef * kl_loss
                    stats["loss/kl"].append(kl_loss.item())
                self.optimizer.zero_grad()
                self.accelerator.backward(loss)
                self.optimizer.step()
                with torch.no_grad():
                    probs = F.softmax(logits / c.temperature, dim=-1)
                    entropy = masked_mean(-(probs * torch.log(probs.clamp(min=1e-12))).sum(-1), m)
                    stats["loss/policy"].append(pg_loss.item())
                    stats["loss/value"].append(vf_loss.item())
                    stats["policy/clipfrac"].append(clipfrac.item())
                    stats["policy/approx_kl"].append(
                        masked_mean(kl_estimates(new_logprobs, r.logprobs[idx])["k2"], m).item()
                    )
                    stats["policy/entropy"].append(entropy.item())

        kl = (kl_estimates(r.logprobs, r.ref_logprobs)["k1"] * mask).sum(1).mean().item()
        variance = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
        explained = 1 - masked_mean((returns - r.values) ** 2, mask) / variance.clamp(min=1e-8)
        metrics = {
            "objective/score": r.scores.mean().item(),
            "objective/kl": kl,
            "objective/kl_coef": self.kl.value,
            "objective/non_score_reward": (r.rewards.sum(1) - r.final_scores).mean().item(),
            **{name: sum(values) / len(values) for name, values in stats.items()},
            "val/explained_variance": explained.item(),
            "val/response_length": mask.sum(1).mean().item(),
            "time/seconds": time.perf_counter() - started,
        }
        if c.adaptive_kl:
            self.kl.update(kl, len(prompts))
        self.history.append(metrics)
        return metrics

    def train(
        self, prompts: Sequence[str], progress: Callable[[float], None] | None = None
    ) -> list[dict[str, float]]:
        """`updates` PPO updates, cycling through the prompts in batches."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed)
        order = torch.randperm(len(prompts), generator=generator).tolist()
        bar = tqdm(range(c.updates), desc="ppo", unit="update")
        for update in bar:
            n = c.batch_size // c.samples_per_prompt
            start = (update * n) % len(order)
            batch = [prompts[order[(start + i) % len(order)]] for i in range(n)]
            metrics = self.step(batch)
            bar.set_postfix(
                score=f"{metrics['objective/score']:.3f}", kl=f"{metrics['objective/kl']:.3f}"
            )
            log.debug("update %d: %s", update, metrics)
            if progress:
                progress((update + 1) / c.updates)
        return self.history

    def policy_for_saving(self) -> nn.Module:
        policy = self.unwrapped.policy
        if self.config.lora_r > 0:
            policy = policy.merge_and_unload()  # a plain HF folder, no adapter files
        return policy


def plot_history(history: list[dict[str, float]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        "objective/score",
        "objective/kl",
        "policy/entropy",
        "policy/clipfrac",
        "loss/value",
        "val/explained_variance",
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for ax, key in zip(axes.flat, keys, strict=True):
        ax.plot([h[key] for h in history], marker=".")
        ax.set(title=key, xlabel="update")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def save_policy_version(
    trainer: PPOTrainer, registry, metadata: dict[str, Any], promote: bool = True
):
    """Commit the trained policy as a new registry version with its curves and metrics."""
    with registry.stage("policy") as staged:
        trainer.policy_for_saving().save_pretrained(staged)
        trainer.tokenizer.save_pretrained(staged)
        plot_history(trainer.history, staged / "training_curves.png")
        last = trainer.history[-1] if trainer.history else {}
        return registry.commit(
            "policy",
            staged,
            {
                "algorithm": "ppo",
                "config": asdict(trainer.config),
                "metrics": last,
                "history": trainer.history,
                **metadata,
            },
            promote=promote,
        )
