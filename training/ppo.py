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
   log-probs and values come from the generation pass, so only the reference runs again
   (in bf16 a forward pass recomputes them, the update's own computation);
3. bootstrap values / GAE: advantages with gamma and lambda over the response tokens,
   returns = advantages + values, advantages whitened;
4. PPO epochs over minibatches: clipped policy loss, clipped value loss, optionally a
   KL-to-reference term (`kl_loss_coef`, GRPO's way; `kl_estimator` says which), gradient
   norm clipping, and metrics (approx KL, clip fraction, entropy, explained variance);
5. adaptive KL controller (Ziegler et al., 2019), off by default: kl_coef follows a target
   KL.

Dropout is off throughout (the models stay in eval mode, as TRL's
`disable_dropout_in_model` did): the rollout's log-probs and values come from a pass without
dropout, so an update with dropout on would start from a ratio that is not 1 and clip for
nothing. Sampling uses an explicit generation configuration: the processors a model's own
`generation_config` may ask for (repetition penalty, no-repeat n-grams, top-k, min-p,
suppressed tokens) would make the behaviour policy differ from the logits / temperature
that every log-prob here is computed from.

The value head is a linear layer on the policy's last hidden state: one trunk instead of
a second 135M model keeps peak memory low (policy + reference + optimizer state). With
`lora_r > 0` only LoRA adapters train, and the reference is the same model with its
adapters disabled: no second copy at all, unless another reference is given (the loop
anchors every round at the base policy, not at the round's starting point). `accelerate`
places the models, so the same code runs under `accelerate launch` on GPUs. `bf16`
computes in bfloat16 under autocast with float32 weights and optimizer state, the rollout,
the reference and the update alike; bfloat16 weights are refused (AdamW steps of a 1e-5
learning rate round away in bfloat16's 8-bit mantissa).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from training.distributed import on_main_process
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
            "help": "Weight of a per-token KL-to-reference term in the policy loss, as GRPO's "
            "beta: it pulls every token back directly, where the reward penalty acts only "
            "through the advantages. 0: the reward penalty alone."
        },
    )
    kl_estimator: str = field(
        default="k3",
        metadata={
            "help": "Estimator in that loss term. k3 (GRPO's; its log-ratio bounded) is "
            "unbiased for KL(pi || ref) in value, but as a loss on samples of pi its gradient "
            "is that of KL(ref || pi), the reverse direction, which pulls hardest toward "
            "tokens the reference likes and pi does not. k2 (half the squared log-ratio) has "
            "the gradient of KL(pi || ref) itself."
        },
    )
    max_grad_norm: float = field(
        default=1.0,
        metadata={"help": "Clip the gradient's total norm to this before each step; 0: off."},
    )
    adaptive_kl: bool = field(
        default=False,
        metadata={
            "help": "Adapt the reward penalty's coefficient to target_kl (off by default: "
            "the defaults hold the policy with the loss's KL term instead)."
        },
    )
    target_kl: float = field(
        default=6.0, metadata={"help": "Target sequence KL of the adaptive controller."}
    )
    kl_horizon: int | None = field(
        default=None,
        metadata={
            "help": "Horizon (in samples) of the adaptive controller; default: a tenth of "
            "the run's samples, so that over a run the coefficient can move by up to "
            "e^2 (7x) either way. Ziegler et al.'s 10000 suits runs of 10^5-10^6 samples; "
            "with this project's few hundred it would move the coefficient by under 1%."
        },
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
    bf16: bool = field(
        default=False,
        metadata={
            "help": "Compute in bfloat16 under autocast (rollout, reference and update alike) "
            "with float32 weights and optimizer state."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})

    @property
    def horizon(self) -> int:
        """The adaptive controller's horizon: kl_horizon, or a tenth of the run's samples."""
        if self.kl_horizon is not None:
            return self.kl_horizon
        return max(1, self.updates * self.batch_size // 10)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"lam ({self.lam}) and gamma ({self.gamma}) must be within [0, 1]")
        if self.init_kl_coef < 0 or self.kl_loss_coef < 0:
            raise ValueError(
                f"init_kl_coef ({self.init_kl_coef}) and kl_loss_coef ({self.kl_loss_coef}) "
                "must be at least 0"
            )
        if self.ppo_epochs < 1 or self.mini_batch_size < 1 or self.updates < 1:
            raise ValueError("updates, ppo_epochs and mini_batch_size must be at least 1")
        if self.temperature <= 0:
            # every log-prob divides the logits by it; greedy decoding is not a policy to train
            raise ValueError(f"temperature ({self.temperature}) must be above 0")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, not {self.kl_estimator!r}"
            )
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm ({self.max_grad_norm}) must be at least 0 (0: off)")
        if self.adaptive_kl and (
            self.target_kl <= 0 or (self.kl_horizon is not None and self.kl_horizon < 1)
        ):
            raise ValueError("adaptive KL needs target_kl above 0 and kl_horizon at least 1")
        if self.samples_per_prompt < 1 or self.batch_size % self.samples_per_prompt:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of samples_per_prompt "
                f"({self.samples_per_prompt}): a rollout holds whole groups of samples per prompt"
            )


# -- closed-form pieces (tested against values computed by hand) ---------------------------


KL_ESTIMATORS = ("k3", "k2")
# exp(10) = 2.2e4: the k3 term's gradient grows like exp(-log-ratio); past this bound (a
# token the policy now finds e^10 times less likely than the reference) it stops growing.
K3_LOG_RATIO_BOUND = 10.0


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over mask=1 entries; what lies under mask=0 (padding after eos, possibly -inf
    or nan) is selected away, not multiplied by 0 (which would keep a nan)."""
    return torch.where(mask.bool(), x, 0).sum() / mask.sum().clamp(min=1)


def _own(total: torch.Tensor) -> torch.Tensor:
    return total


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    total: Callable[[torch.Tensor], torch.Tensor] = _own,
) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as in TRL/N-details).

    `total` turns this process's sums into the sums over all training processes (an
    all-reduce), so that several processes whiten with the moments of the whole rollout."""
    count = total(mask.sum())
    mean = total(torch.where(mask.bool(), x, 0).sum()) / count.clamp(min=1)
    centered = x - mean
    variance = total(torch.where(mask.bool(), centered**2, 0).sum()) / (count - 1).clamp(min=1)
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
    """Per-token estimators of KL(pi || pi_ref) from samples of pi (Schulman's k1, k2, k3).

    As values: k1 and k3 are unbiased, k2 is biased but low-variance. As losses on samples of
    pi (their gradients): k1's is 0 in expectation, k2's is that of KL(pi || ref), and k3's is
    that of KL(ref || pi) (tests/test_ppo.py checks both against exact KLs). k3's log-ratio
    is bounded by K3_LOG_RATIO_BOUND, where exp(-log_ratio) would otherwise overflow.
    """
    log_ratio = logprobs - ref_logprobs
    bounded = log_ratio.clamp(-K3_LOG_RATIO_BOUND, K3_LOG_RATIO_BOUND)
    return {"k1": log_ratio, "k2": 0.5 * log_ratio**2, "k3": torch.expm1(-bounded) + bounded}


def explained_variance(
    returns: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    total: Callable[[torch.Tensor], torch.Tensor] = _own,
) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked tokens (as CleanRL and SB3):
    how much of the returns' spread the values account for; a constant offset costs nothing.
    `total` sums across training processes (see `masked_whiten`)."""
    count = total(mask.sum()).clamp(min=1)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return total(torch.where(mask.bool(), x, 0).sum()) / count

    residual = returns - values
    var_residual = mean((residual - mean(residual)) ** 2)
    var_returns = mean((returns - mean(returns)) ** 2)
    return (1 - var_residual / var_returns.clamp(min=1e-8)).item()


@torch.no_grad()
def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> float:
    """Mean entropy of softmax(logits / T) over the masked positions, one row at a time: a
    (batch, response, vocabulary) softmax beside the logits would double the update's peak."""
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for row, row_mask in zip(logits, mask, strict=True):
        z = row.float() / temperature
        entropy = torch.logsumexp(z, dim=-1) - (F.softmax(z, dim=-1) * z).sum(-1)
        total += torch.where(row_mask.bool(), entropy, 0).sum()
    return (total / mask.sum().clamp(min=1)).item()


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

    def __init__(self, policy: Any) -> None:  # a transformers causal LM, maybe PEFT-wrapped
        super().__init__()
        self.policy: Any = policy
        hidden = policy.config.get_text_config().hidden_size
        self.value_head = nn.Linear(hidden, 1, dtype=torch.float32)  # not the default dtype
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


def disable_dropout(model: nn.Module) -> None:
    """Dropout off for good: eval mode (which also covers attention dropout given as a float,
    as Llama's), and every nn.Dropout at p=0 should anything switch train mode back on."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def _hf_model(policy: Any) -> Any:
    """The transformers model under a PEFT wrapper (the one whose generation_config counts)."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


@contextlib.contextmanager
def plain_generation_config(policy: Any) -> Iterator[None]:
    """Generate with no processor the model's own generation_config asks for.

    `generate` fills every setting it is not given from `model.generation_config` (a
    repetition penalty, no-repeat n-grams, min_p, top_k, suppressed tokens...): passing
    neutral values one by one would miss any setting a later version adds, so the model's
    configuration is swapped for a blank one during the rollout and put back after (it is
    saved with the trained policy).
    """
    from transformers import GenerationConfig

    model = _hf_model(policy)
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


def needs_bos(tokenizer) -> bool:
    """Whether prompts need the tokenizer's BOS prepended: rendered prompts are tokenized
    without special tokens (a chat template writes its own), so a model without a template
    whose tokenizer normally adds a BOS (Llama, Gemma base models) would never see one."""
    if tokenizer.chat_template or tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _check_float32(model: nn.Module, what: str) -> None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        raise ValueError(
            f"the {what} has {', '.join(sorted(str(d) for d in dtypes))} weights: PPO trains "
            "float32 weights (AdamW steps of a 1e-5 learning rate round away in bfloat16); "
            "load it in float32 and set bf16=True to compute in bfloat16"
        )


class PPOTrainer:
    def __init__(
        self,
        policy: nn.Module,
        tokenizer,
        reward_fn: RewardFn,
        config: PPOConfig,
        reference: nn.Module | None = None,
        engine: Any | None = None,
    ) -> None:
        """`reference`: the model the KL terms hold the policy to; by default the policy as
        it starts (a frozen copy, or with LoRA the policy with its adapters disabled).
        `engine`: a training.engine.VLLMEngine that samples the rollouts (given the
        policy's weights before each), instead of `generate` in this process."""
        from accelerate import Accelerator

        torch.manual_seed(config.seed)
        self.config, self.tokenizer, self.reward_fn = config, tokenizer, reward_fn
        self.engine, self._engine_run = engine, uuid.uuid4().hex[:8]
        self.engine_seconds = 0.0  # the last rollout's weight reload, when an engine samples
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        if self.accelerator.state.deepspeed_plugin is not None:
            # Its engine steps the optimizer itself and partitions the gradients that this
            # loop clips and measures: untried here, so refused rather than run wrongly.
            raise ValueError(
                "PPO's loop runs under DDP, not DeepSpeed: launch it with "
                "docker/accelerate-ddp.yaml (ZeRO-2, docker/accelerate-zero2.yaml, is for "
                "the reward, DPO and SFT trainers)"
            )
        if engine is not None and self.accelerator.num_processes > 1:
            # Every process would push its weights to the one server and sample from it:
            # untried, so refused (the main process alone should serve and sample).
            raise ValueError(
                "PPO with vLLM rollouts runs in one process: launch it without accelerate, "
                "or set LS_RLHF_GENERATION_ENGINE=hf to sample in every process"
            )
        _check_float32(policy, "policy")
        if reference is not None:
            _check_float32(reference, "reference")
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
        if reference is None and config.lora_r == 0:
            reference = copy.deepcopy(policy)
        # None: the policy with its adapters disabled (LoRA, no other reference given).
        self.reference = reference
        if self.reference is not None:
            disable_dropout(self.reference)
            self.reference.requires_grad_(False)
        self.model = PolicyWithValueHead(policy)
        disable_dropout(self.model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # No weight decay: it would pull the shared trunk (and the value head) toward zero
        # on every step, a regularizer nobody asked for (CleanRL uses Adam, TRL's PPO had 0).
        self.optimizer = torch.optim.AdamW(
            trainable, lr=config.learning_rate, eps=1e-5, weight_decay=0.0
        )
        # Under `accelerate launch` this wraps the model for data parallelism (its gradients
        # averaged across processes at every backward pass; rank 0's weights broadcast).
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        if self.reference is not None:
            self.reference = self.reference.to(self.accelerator.device)
        world = self.accelerator.num_processes
        if (
            config.batch_size // config.samples_per_prompt
        ) % world or config.mini_batch_size % world:
            raise ValueError(
                f"with {world} processes, the prompts per rollout (batch_size / "
                f"samples_per_prompt = {config.batch_size // config.samples_per_prompt}) and "
                f"mini_batch_size ({config.mini_batch_size}) must be multiples of {world}: each "
                "process takes an equal share of both (raise --batch-size / --mini-batch-size)"
            )
        # batch_size and mini_batch_size count all processes' responses; each process samples
        # its own share, with a seed of its own (one seed would make N copies of one rollout).
        # One process keeps the stream seeded above, as before there were several.
        if world > 1:
            torch.manual_seed(config.seed + self.accelerator.process_index)
        self.kl = AdaptiveKLController(config.init_kl_coef, config.target_kl, config.horizon)
        self.score_moments = RunningMoments()
        self.history: list[dict[str, float]] = []

    @property
    def unwrapped(self) -> PolicyWithValueHead:
        return self.accelerator.unwrap_model(self.model)

    def _autocast(self):
        """bfloat16 compute where bf16 is set, the same for every pass (rollout, reference,
        update), so the ratio compares like with like."""
        return torch.autocast(
            self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.config.bf16
        )

    def _logprobs(self, logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # float32 whatever the compute dtype: differences of log-probs are what PPO uses
        return torch.gather(
            F.log_softmax(logits.float() / self.config.temperature, dim=-1),
            2,
            tokens.unsqueeze(-1),
        ).squeeze(-1)

    def _reference_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int
    ) -> torch.Tensor:
        policy = self.unwrapped.policy
        if self.reference is None:  # LoRA: the same model with its adapters disabled
            reference, context = policy, policy.disable_adapter()
        else:
            reference, context = self.reference, contextlib.nullcontext()
        with context:
            return reference(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids(attention_mask),
                use_cache=False,
                logits_to_keep=response_length + 1,
            ).logits[:, :-1]

    def _tokenize_prompts(self, prompts: Sequence[str]):
        c, tok = self.config, self.tokenizer
        rendered = [render_prompt(tok, p) for p in prompts]
        if needs_bos(tok):
            rendered = [r if r.startswith(tok.bos_token) else tok.bos_token + r for r in rendered]
        # Left padding and left truncation (the end of a prompt is what the answer follows),
        # set for this call only: the tokenizer is shared, and saved with the policy.
        saved = tok.padding_side, tok.truncation_side
        tok.padding_side, tok.truncation_side = "left", "left"
        try:
            return tok(
                rendered,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=c.max_prompt_length,
                add_special_tokens=False,
            ).to(self.accelerator.device)
        finally:
            tok.padding_side, tok.truncation_side = saved

    @torch.no_grad()
    def rollout(self, prompts: Sequence[str]) -> Rollout:
        c, tok = self.config, self.tokenizer
        queries = self._tokenize_prompts(prompts)
        policy = self.unwrapped.policy
        # An explicit configuration, and the model's own set aside: the behaviour policy must
        # be softmax(logits / T), the one every log-prob below is computed from.
        sampling = GenerationConfig(
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
        output = None
        if self.engine is not None:
            responses = self._engine_responses(queries)
        else:
            with plain_generation_config(policy), self._autocast():
                output = policy.generate(**queries, generation_config=sampling)
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
        r_len = response_ids.shape[1]

        if c.bf16 or output is None:
            # In bfloat16 the cached generation pass and a full forward pass round
            # differently; the update runs the latter, so the old log-probs and values do too.
            # So with an engine: it gave token ids only, and the trainer's own model scores them.
            with self._autocast():
                logits, values = self.model(input_ids, attention_mask, r_len)
            logprobs = self._logprobs(logits, response_ids)
        else:
            # The sampled tokens' log-probs and values come from the generation pass itself
            # (its raw logits and last hidden states): a second forward pass would recompute
            # them (tests/test_ppo.py checks that they agree).
            logprobs = self._logprobs(torch.stack(output.logits, dim=1), response_ids)
            # hidden_states holds, per generation step, every layer's output; the first
            # step's covers the whole prompt, its last position predicts the first token.
            steps = output.hidden_states
            last_hidden = torch.cat(
                [steps[0][-1][:, -1:]] + [step[-1] for step in steps[1:]], dim=1
            )
            values = self.unwrapped.value_head(last_hidden).squeeze(-1)
        values = values.float()
        with self._autocast():
            ref_logits = self._reference_logits(input_ids, attention_mask, r_len)
        ref_logprobs = self._logprobs(ref_logits, response_ids)

        texts = tok.batch_decode(response_ids, skip_special_tokens=True)
        scores = torch.tensor(
            self.reward_fn(list(prompts), [t.strip() for t in texts]),
            dtype=torch.float,
            device=logprobs.device,
        )
        final = scores
        if c.normalize_scores:
            # Every process's scores, so the running moments are the same in every process.
            self.score_moments.update(self.accelerator.gather(scores))
            final = self.score_moments.normalize(scores)
        if c.samples_per_prompt > 1:
            final = leave_one_out_baseline(final, c.samples_per_prompt)
        final = final - c.missing_eos_penalty * (~ended).float()
        mask = response_mask.float()
        # Past eos every per-token tensor is 0 (selected, not multiplied: 0 * -inf is nan).
        logprobs = torch.where(response_mask.bool(), logprobs, 0)
        ref_logprobs = torch.where(response_mask.bool(), ref_logprobs, 0)
        values = torch.where(response_mask.bool(), values, 0)
        rewards = -self.kl.value * kl_estimates(logprobs, ref_logprobs)["k1"] * mask
        rewards[torch.arange(len(prompts)), first_eos] += final
        return Rollout(
            input_ids,
            attention_mask,
            mask,
            logprobs,
            ref_logprobs,
            values,
            rewards,
            scores,
            final,
            texts,
        )

    def _engine_responses(self, queries) -> torch.Tensor:
        """The responses' token ids sampled by the engine, once it serves this update's
        weights (saved and reloaded: `engine_seconds`), right-padded to the longest."""
        c, tok, engine = self.config, self.tokenizer, self.engine
        assert engine is not None  # called only when one samples
        label = f"ppo:{self._engine_run}:{len(self.history)}"
        self.engine_seconds = engine.serve_model(self.policy_for_saving(), label)
        prompt_ids = [
            ids[mask.bool()].tolist()
            for ids, mask in zip(queries["input_ids"], queries["attention_mask"], strict=True)
        ]
        sampled = engine.sample(
            prompt_ids,
            1,
            c.max_new_tokens,
            c.temperature,
            top_p=1.0,
            seed=(c.seed * 1_000_003 + len(self.history) * len(prompt_ids)),
            stop_token_ids=[tok.eos_token_id],
        )
        rows = [answers[0] or [tok.pad_token_id] for answers in sampled]
        responses = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id)
        for i, row in enumerate(rows):
            responses[i, : len(row)] = torch.tensor(row)
        return responses.to(self.accelerator.device)

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
        advantages = masked_whiten(advantages, mask, total=self._total)
        world = self.accelerator.num_processes

        # Minibatch updates, in eval mode (no dropout: see the module's docstring).
        # Per-minibatch values under their metric names; each metric is their mean.
        stats: dict[str, list[float]] = defaultdict(list)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for _ in range(c.ppo_epochs):
            for idx in torch.randperm(len(prompts)).split(c.mini_batch_size):
                m = mask[idx]
                with self._autocast():
                    logits, new_values = self.model(
                        r.input_ids[idx], r.attention_mask[idx], mask.shape[1]
                    )
                new_values = new_values.float()
                # Past eos: the rollout's values, so that nothing there (a -inf log-prob of
                # a padding token, say) reaches a loss or its gradient.
                new_logprobs = torch.where(
                    m.bool(), self._logprobs(logits, r.input_ids[idx, q_len:]), r.logprobs[idx]
                )
                pg_loss, clipfrac = clipped_policy_loss(
                    new_logprobs, r.logprobs[idx], advantages[idx], m, c.cliprange
                )
                vf_loss = clipped_value_loss(
                    new_values, r.values[idx], returns[idx], m, c.cliprange_value
                )
                loss = pg_loss + c.vf_coef * vf_loss
                if c.kl_loss_coef:
                    kl_loss = masked_mean(
                        kl_estimates(new_logprobs, r.ref_logprobs[idx])[c.kl_estimator], m
                    )
                    loss = loss + c.kl_loss_coef * kl_loss
                    stats["loss/kl"].append(kl_loss.item())
                if world > 1:
                    # The processes' gradients are averaged: each weighs its loss (a mean
                    # over its tokens) by its share of the minibatch's tokens, so that the
                    # average is the gradient of the mean over all the tokens, as one
                    # process with the whole minibatch would compute it.
                    tokens = m.sum()
                    loss = loss * tokens * world / self._total(tokens).clamp(min=1)
                self.optimizer.zero_grad()
                self.accelerator.backward(loss)
                if c.max_grad_norm > 0:
                    norm = self.accelerator.clip_grad_norm_(trainable, c.max_grad_norm)
                    stats["policy/grad_norm"].append(float(norm))
                self.optimizer.step()
                with torch.no_grad():
                    stats["loss/policy"].append(pg_loss.item())
                    stats["loss/value"].append(vf_loss.item())
                    stats["policy/clipfrac"].append(clipfrac.item())
                    stats["policy/approx_kl"].append(
                        masked_mean(kl_estimates(new_logprobs, r.logprobs[idx])["k2"], m).item()
                    )
                    stats["policy/entropy"].append(entropy_from_logits(logits, m, c.temperature))
                del logits

        kl = (kl_estimates(r.logprobs, r.ref_logprobs)["k1"] * mask).sum(1).mean().item()
        local = {
            "objective/score": r.scores.mean().item(),
            "objective/kl": kl,
            "objective/kl_coef": self.kl.value,
            "objective/non_score_reward": (r.rewards.sum(1) - r.final_scores).mean().item(),
            **{name: sum(values) / len(values) for name, values in stats.items()},
            "val/explained_variance": explained_variance(
                returns, r.values, mask, total=self._total
            ),
            "val/response_length": mask.sum(1).mean().item(),
            "time/seconds": time.perf_counter() - started,
            **({"time/engine_reload_seconds": self.engine_seconds} if self.engine else {}),
        }
        # One set of figures for the run: means over the processes (each holds as many
        # responses, so a per-response mean of means is the mean over all of them).
        metrics = self._mean_across(local)
        if c.adaptive_kl:
            # The KL of all processes' responses, counted as all of them: every process's
            # controller takes the same step.
            self.kl.update(metrics["objective/kl"], len(prompts) * world)
        self.history.append(metrics)
        return metrics

    def _total(self, value: torch.Tensor) -> torch.Tensor:
        """The sum of `value` over the training processes (itself with one process)."""
        if self.accelerator.num_processes == 1:
            return value
        return self.accelerator.reduce(value, reduction="sum")

    def _mean_across(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.accelerator.num_processes == 1:
            return metrics
        names = sorted(metrics)  # the same names in every process
        values = torch.tensor(
            [metrics[n] for n in names], dtype=torch.float64, device=self.accelerator.device
        )
        reduced = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(names, reduced.tolist(), strict=True))

    def train(
        self, prompts: Sequence[str], progress: Callable[[float], None] | None = None
    ) -> list[dict[str, float]]:
        """`updates` PPO updates, cycling through the prompts in batches; with several
        processes, each takes its consecutive share of every batch."""
        c = self.config
        generator = torch.Generator().manual_seed(c.seed)  # the same order in every process
        order = torch.randperm(len(prompts), generator=generator).tolist()
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        bar = tqdm(
            range(c.updates),
            desc="ppo",
            unit="update",
            disable=not self.accelerator.is_main_process,
        )
        for update in bar:
            n = c.batch_size // c.samples_per_prompt
            start = (update * n) % len(order)
            batch = [prompts[order[(start + i) % len(order)]] for i in range(n)]
            share = n // world
            metrics = self.step(batch[rank * share : (rank + 1) * share])
            bar.set_postfix(
                score=f"{metrics['objective/score']:.3f}", kl=f"{metrics['objective/kl']:.3f}"
            )
            log.debug("update %d: %s", update, metrics)
            if progress:
                progress((update + 1) / c.updates)
        return self.history

    def policy_for_saving(self) -> Any:
        """The policy as a plain transformers model; with LoRA, the adapters merged into a
        copy (merging in place would leave the trainer without adapters to train)."""
        policy = self.unwrapped.policy
        if self.config.lora_r > 0:
            policy = copy.deepcopy(policy).merge_and_unload()  # a plain HF folder
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
    """Commit the trained policy as a new registry version with its curves and metrics;
    with several processes, the main process commits and every process returns its version
    (the weights are the same in all: their gradients were averaged)."""

    def commit():
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
                    "processes": trainer.accelerator.num_processes,
                    **metadata,
                },
                promote=promote,
            )

    return on_main_process(commit)


def train_policy_version(
    registry,
    start: str,
    prompts: Sequence[str],
    reward_fn: RewardFn,
    config: PPOConfig,
    metadata: dict[str, Any],
    reference: str | None = None,
    promote: bool = True,
    engine: Any | None = None,
):
    """The one PPO run of `ls-rlhf train ppo` and the loop's policy step: load the policy at
    `start` (and the `reference` to hold it to, when that is another model), train, commit a
    version. Returns (version, history)."""
    from training.models import load_causal_lm

    model, tokenizer = load_causal_lm(start)
    anchor = None
    if reference is not None and reference != start:
        anchor, _ = load_causal_lm(reference)
    trainer = PPOTrainer(model, tokenizer, reward_fn, config, reference=anchor, engine=engine)
    history = trainer.train(prompts)
    version = save_policy_version(
        trainer,
        registry,
        {**metadata, "started_from": start, "reference": reference or start},
        promote=promote,
    )
    return version, history
